"""Data layer: field names, ASE conversion, neighbor lists, batching, datasets, statistics."""

from . import keys
from .atoms import LabelKeys, TypeMapper, atoms_to_graph, check_structure, graph_to_atoms, read_labels
from .batch import collate
from .dataset import BatchLoader, GraphDataset, convert_to_hdf5, iter_structures, split_indices
from .neighbors import neighbor_list, pair_edges
from .stats import DatasetStatistics, compute_statistics

__all__ = [
    "keys",
    "LabelKeys",
    "TypeMapper",
    "atoms_to_graph",
    "check_structure",
    "graph_to_atoms",
    "read_labels",
    "collate",
    "neighbor_list",
    "pair_edges",
    "BatchLoader",
    "GraphDataset",
    "convert_to_hdf5",
    "iter_structures",
    "split_indices",
    "DatasetStatistics",
    "compute_statistics",
]
