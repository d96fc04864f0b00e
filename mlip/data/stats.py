"""Statistics of a training set that fix a model's per-species shifts and scales."""

import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import keys


@dataclass
class DatasetStatistics:
    """What a model needs to know about its training data (all in eV, Å)."""

    type_names: List[str]
    reference_energies: List[float]  # eV per atom of each type (least squares or isolated atoms)
    force_rms: float = 1.0  # eV/Å, RMS of the force components: the model's energy scale
    avg_num_neighbors: float = 1.0  # mean edges per atom within r_max: message normalization
    extra: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStatistics":
        return cls(**d)


def compute_statistics(
    data,
    type_names: Sequence[str],
    isolated_atom_energies: Optional[Dict[str, float]] = None,
    batch_size: int = 256,
    mean_binding_energy: bool = False,
) -> DatasetStatistics:
    """Reference energies, force scale and neighbor count of ``data``.

    ``data``: a :class:`mlip.data.dataset.GraphDataset` (read ``batch_size`` structures at a time,
    so a file larger than memory works) or a list of graph dicts.

    - reference energies (eV per atom of each type): least squares of the total energies on the
      per-type atom counts, or ``isolated_atom_energies`` (symbol -> eV) when given, each raised by the
      mean energy per atom the data has beyond them if ``mean_binding_energy`` (``extra``:
      ``mean_binding_energy_per_atom``);
    - force_rms (eV/Å): RMS over all force components; without forces, the standard deviation of
      the per-atom energy residuals (after the reference energies) takes its place;
    - avg_num_neighbors: edges per atom;
    - in ``extra``, for a property model's targets: their mean and standard deviation, per structure
      and per atom (``property_mean``, ``property_std``, ``property_per_atom_*``).
    """
    type_names = list(type_names)
    n_types = len(type_names)
    counts, energies, has_energy = [], [], []
    force_sq, force_n, n_atoms, n_edges = 0.0, 0, 0, 0
    properties, property_atoms = [], []  # a property model's targets and their structures' atom counts
    for graphs in _chunks(data, batch_size):
        for g in graphs:
            types = np.asarray(g[keys.ATOM_TYPES])
            if len(types) and (types.min() < 0 or types.max() >= n_types):
                raise ValueError(f"atom types {sorted(set(types.tolist()))} out of range for {type_names}")
            counts.append(np.bincount(types, minlength=n_types))
            has_energy.append(keys.ENERGY in g)
            energies.append(float(g[keys.ENERGY]) if keys.ENERGY in g else np.nan)
            if keys.FORCES in g:
                forces = np.asarray(g[keys.FORCES], dtype=np.float64)
                force_sq += float(np.square(forces).sum())
                force_n += forces.size
            if keys.PROPERTY in g:
                properties.append(float(g[keys.PROPERTY]))
                property_atoms.append(len(types))
            n_atoms += len(types)
            n_edges += int(np.asarray(g[keys.EDGE_INDEX]).shape[1])
    if n_atoms == 0:
        raise ValueError("no atoms in the data: cannot compute statistics")
    counts = np.array(counts, dtype=np.float64).reshape(-1, n_types)
    has_energy = np.array(has_energy, dtype=bool)
    energies = np.array(energies)[has_energy]
    counts_e = counts[has_energy]

    extra: Dict[str, float] = {"num_structures": float(len(counts)), "num_atoms": float(n_atoms)}
    if isolated_atom_energies is not None:
        missing = [t for t in type_names if t not in isolated_atom_energies]
        if missing:
            raise KeyError(f"isolated-atom energies missing for {missing} (given: {sorted(isolated_atom_energies)})")
        reference = np.array([float(isolated_atom_energies[t]) for t in type_names])
    elif len(energies):
        # Minimum-norm solution: a type absent from the data, or types always present in the same
        # ratio (one molecule), get a well-defined split instead of an arbitrary one.
        reference, _, rank, _ = np.linalg.lstsq(counts_e, energies, rcond=None)
        present = int((counts_e.sum(axis=0) > 0).sum())
        extra["composition_rank"] = float(rank)
        if rank < present:
            warnings.warn(
                f"per-type atom counts have rank {rank} < {present} types present: the reference energies "
                "are not determined by the data (minimum-norm solution used); consider isolated-atom energies"
            )
    else:
        reference = np.zeros(n_types)

    residual_per_atom = (energies - counts_e @ reference) / np.maximum(counts_e.sum(axis=1), 1.0)
    if mean_binding_energy:
        if isolated_atom_energies is None or not len(residual_per_atom):
            raise ValueError("mean_binding_energy shifts isolated-atom energies by the data's mean energy per atom "
                             "beyond them: give isolated_atom_energies and structures with energies")
        extra["mean_binding_energy_per_atom"] = float(residual_per_atom.mean())
        reference = reference + residual_per_atom.mean()
        residual_per_atom = residual_per_atom - residual_per_atom.mean()
    if len(residual_per_atom):
        extra["energy_residual_std_per_atom"] = float(np.std(residual_per_atom))
    if force_n:
        force_rms = float(np.sqrt(force_sq / force_n))
    elif len(residual_per_atom) > 1:
        force_rms = float(np.std(residual_per_atom))
    elif properties:
        force_rms = 1.0  # property data: no energy scale, and none needed
    else:
        raise ValueError("no forces and fewer than two energies: no scale can be estimated")
    if not force_rms > 0:
        raise ValueError(f"the energy/force scale of the data is {force_rms}: are all labels identical?")

    if properties:
        values, per_atom = np.array(properties), np.array(properties) / np.array(property_atoms)
        extra.update(property_mean=float(values.mean()), property_std=float(values.std()),
                     property_per_atom_mean=float(per_atom.mean()), property_per_atom_std=float(per_atom.std()))

    return DatasetStatistics(
        type_names=type_names,
        reference_energies=[float(e) for e in reference],
        force_rms=force_rms,
        avg_num_neighbors=n_edges / n_atoms,
        extra=extra,
    )


def _chunks(data, batch_size: int):
    if hasattr(data, "get_batch"):
        for start in range(0, len(data), batch_size):
            yield data.get_batch(np.arange(start, min(start + batch_size, len(data))))
    else:
        yield list(data)
