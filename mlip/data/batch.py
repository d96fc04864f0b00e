"""Many structures -> one disconnected graph (torch tensors), without per-atom Python loops."""

from typing import Dict, List, Optional

import numpy as np
import torch

from . import keys
from .neighbors import pair_edges


def collate(
    graphs: List[Dict[str, np.ndarray]],
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    paired: bool = True,
) -> Dict[str, torch.Tensor]:
    """Concatenate structures; node indices of edges are offset, a ``batch`` index is added.

    Float fields are cast to ``dtype`` except the energy, kept in float64 (totals of thousands of
    atoms lose meV in float32). ``paired``: edges reordered as [one direction; reverses]
    (mlip.data.pair_edges), flagged by ``edges_paired``, so models can share per-pair work.
    A label (energy, forces, stress) is present when any structure carries it, with a mask
    (``has_energy`` (B,), ``has_forces`` (N,), ``has_stress`` (B,)); unlabelled rows hold zeros.
    """
    num_atoms = np.array([len(g[keys.ATOM_TYPES]) for g in graphs], dtype=np.int64)
    node_offsets = np.concatenate([[0], np.cumsum(num_atoms)[:-1]])
    node_graph = np.repeat(np.arange(len(graphs)), num_atoms)

    cell = np.stack([g[keys.CELL] for g in graphs])  # (B, 3, 3)
    edge_index = np.concatenate([g[keys.EDGE_INDEX] + off for g, off in zip(graphs, node_offsets)], axis=1)
    cell_shifts = np.concatenate([g[keys.EDGE_CELL_SHIFTS] for g in graphs])  # (E, 3)
    if paired:
        edge_index, cell_shifts = pair_edges(edge_index, cell_shifts)
    edge_graph = node_graph[edge_index[0]]
    edge_shifts = np.einsum("ek,ekc->ec", cell_shifts.astype(np.float64), cell[edge_graph])

    def to(array, tensor_dtype):
        return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=tensor_dtype)

    batch = {
        # Each structure relative to its first atom, in float64 before the cast (float32 keeps the
        # edge vectors of a molecule at x = 1e6 Å; models depend on position differences only).
        keys.POSITIONS: to(np.concatenate([g[keys.POSITIONS] - g[keys.POSITIONS][:1] for g in graphs]), dtype),
        keys.ATOM_TYPES: to(np.concatenate([g[keys.ATOM_TYPES] for g in graphs]), torch.int64),
        keys.CELL: to(cell, dtype),
        keys.PBC: to(np.stack([g[keys.PBC] for g in graphs]), torch.bool),
        keys.BATCH: to(node_graph, torch.int64),
        keys.NUM_ATOMS: to(num_atoms, torch.int64),
        keys.EDGE_INDEX: to(edge_index, torch.int64),
        keys.EDGE_CELL_SHIFTS: to(cell_shifts, torch.int64),
        keys.EDGE_SHIFTS: to(edge_shifts, dtype),
    }
    if paired:
        batch[keys.EDGES_PAIRED] = torch.tensor(True)  # a flag read on the host: no device synchronisation
    # Each label is kept wherever it exists, with a mask (keys.HAS_*): a mixed batch (single points
    # without forces next to MD frames with them) must not lose the labels its other structures carry.
    has_energy = np.array([keys.ENERGY in g for g in graphs])
    if has_energy.any():
        energy = np.array([g[keys.ENERGY] if keys.ENERGY in g else 0.0 for g in graphs], dtype=np.float64)
        batch[keys.ENERGY] = to(energy, torch.float64)
        batch[keys.HAS_ENERGY] = to(has_energy, torch.bool)
    has_forces = np.array([keys.FORCES in g for g in graphs])
    if has_forces.any():
        forces = np.concatenate([g[keys.FORCES] if keys.FORCES in g else np.zeros((n, 3))
                                 for g, n in zip(graphs, num_atoms)])
        batch[keys.FORCES] = to(forces, dtype)
        batch[keys.HAS_FORCES] = to(has_forces[node_graph], torch.bool)
    has_stress = np.array([keys.STRESS in g for g in graphs])
    if has_stress.any():
        stress = np.stack([g[keys.STRESS] if keys.STRESS in g else np.zeros((3, 3)) for g in graphs])
        batch[keys.STRESS] = to(stress, dtype)
        batch[keys.HAS_STRESS] = to(has_stress, torch.bool)
    has_property = np.array([keys.PROPERTY in g for g in graphs])
    if has_property.any():
        values = np.array([g[keys.PROPERTY] if keys.PROPERTY in g else 0.0 for g in graphs], dtype=np.float64)
        batch[keys.PROPERTY] = to(values, torch.float64)
        batch[keys.HAS_PROPERTY] = to(has_property, torch.bool)
    return batch
