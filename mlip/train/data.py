"""Training data of a run: structure files -> HDF5 graph files in the run directory, split, statistics.

Structure files (extxyz, anything ``ase.io`` reads) are converted once to ``RUN_DIR/data/*.h5``
at the model's r_max; a resumed run reads those files back, so it trains on exactly the same
graphs even if the source files changed meanwhile. Given ``.h5`` graph files are used directly.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..data import (GraphDataset, LabelKeys, TypeMapper, compute_statistics, convert_to_hdf5, iter_structures, keys,
                    split_indices)
from ..data.stats import DatasetStatistics
from .config import ConfigError, DataConfig, TrainConfig

# loss term (and prefix of its validation metrics) -> the label it needs
TERM_LABELS = {"energy_per_atom": keys.ENERGY, "forces": keys.FORCES, "stress": keys.STRESS,
               "property": keys.PROPERTY}


@dataclass
class TrainingData:
    train: GraphDataset  # the training source (all of it; ``train_indices`` selects)
    train_indices: np.ndarray
    validation: GraphDataset  # the validation source (may be ``train`` itself)
    val_indices: np.ndarray
    type_names: List[str]
    content_hash: str  # of the training source file: the deployed model's training_data_hash


class Subset:
    """Some structures of a GraphDataset, with the ``len``/``get_batch`` interface of one."""

    def __init__(self, dataset: GraphDataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, indices: Sequence[int]):
        return self.dataset.get_batch(self.indices[np.asarray(indices, dtype=np.int64)])


def prepare_data(
    config: DataConfig,
    r_max: float,
    data_dir: str,
    seed: int,
    type_names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> TrainingData:
    """Open (converting where needed) the training and validation data of a run.

    ``type_names`` (from a checkpoint being resumed or fine-tuned) wins over ``config.type_names``;
    without either, the elements of the training files are used, by atomic number.
    """
    label_keys = LabelKeys(**config.keys)
    type_names = list(type_names or config.type_names or _elements(config.train))
    train = _open(config.train, os.path.join(data_dir, "train.h5"), r_max, type_names, label_keys, progress)
    if config.validation:
        validation = _open(config.validation, os.path.join(data_dir, "validation.h5"), r_max, type_names,
                           label_keys, progress)
        train_indices, val_indices = np.arange(len(train)), np.arange(len(validation))
    else:
        validation = train
        split_seed = seed if config.split_seed is None else config.split_seed
        train_indices, val_indices = split_indices(len(train), config.val_fraction, split_seed)
    if len(train_indices) == 0:
        raise ValueError("no training structures left after the validation split")
    return TrainingData(train, train_indices, validation, val_indices, type_names, train.content_hash)


def check_labels(config: TrainConfig, data: TrainingData) -> None:
    """Refuse a run that would silently fit or select on nothing: a positive loss weight whose label
    no training structure carries (e.g. a ``data.keys`` name found in no frame), or a
    ``stop.monitor`` that the validation structures cannot measure."""
    def carried(dataset, indices):  # label -> whether any of these structures carries it
        return {field: bool(dataset.has_label(field)[indices].any()) for field in TERM_LABELS.values()}

    trained = carried(data.train, data.train_indices)
    for term, field in TERM_LABELS.items():
        weight = getattr(config.loss, term)
        if weight > 0 and not trained[field]:
            name = config.data.keys.get(field, field)
            raise ConfigError(
                f"loss.{term}: weight {weight}, but no training structure carries {field} under {name!r} "
                f"(data.keys.{field}): map the label's name with data.keys.{field}, or set loss.{term}: 0 to train "
                "without it")
    if len(data.val_indices) == 0:
        return  # no validation: the training loss picks best.pt
    validated = carried(data.validation, data.val_indices)
    monitor = config.stop.monitor
    if monitor == "loss":
        weighted = [field for term, field in TERM_LABELS.items() if getattr(config.loss, term) > 0]
        if not any(validated[field] for field in weighted):
            raise ConfigError(f"stop.monitor: 'loss' would be 0 throughout: the validation structures carry none of "
                              f"the weighted labels {weighted}")
    else:
        field = TERM_LABELS[monitor.rsplit("_", 1)[0]]
        if not validated[field]:
            raise ConfigError(f"stop.monitor: {monitor!r} needs {field} labels, which no validation structure carries")


def training_statistics(data: TrainingData, isolated_atom_energies=None, mean_binding_energy: bool = False
                        ) -> DatasetStatistics:
    """Reference energies, force RMS and neighbor count of the training part only."""
    return compute_statistics(Subset(data.train, data.train_indices), data.type_names, isolated_atom_energies,
                              mean_binding_energy=mean_binding_energy)


def _open(paths: List[str], cache: str, r_max, type_names, label_keys, progress) -> GraphDataset:
    graph_files = [p for p in paths if p.endswith((".h5", ".hdf5"))]
    if graph_files:
        if len(paths) != 1:
            raise ValueError(f"give either one .h5 graph file or structure files, not {paths}")
        dataset = GraphDataset.from_hdf5(paths[0])
        if abs(dataset.r_max - r_max) > 1e-9:
            raise ValueError(f"{paths[0]} holds graphs built at r_max = {dataset.r_max} Å but the model's r_max is "
                             f"{r_max} Å: convert the structures again at the model's cutoff")
        if list(dataset.type_names) != list(type_names):
            raise ValueError(f"{paths[0]} has type names {dataset.type_names}, the model {list(type_names)}")
        return dataset
    if not os.path.exists(cache):  # a resumed run reuses its converted files
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        # A property model's structures must each carry the target; a potential's, an energy.
        require = (keys.PROPERTY,) if label_keys.property else (keys.ENERGY,)
        convert_to_hdf5(paths, cache, r_max, type_names, label_keys, require=require, progress=progress)
    return GraphDataset.from_hdf5(cache)


def _elements(paths: List[str]) -> List[str]:
    graph_files = [p for p in paths if p.endswith((".h5", ".hdf5"))]
    if graph_files:
        return list(GraphDataset.from_hdf5(graph_files[0]).type_names)
    return TypeMapper.from_atoms(iter_structures(paths)).type_names
