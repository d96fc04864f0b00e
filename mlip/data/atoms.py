"""ase.Atoms <-> mlip graphs, with explicit names for where the labels live.

A *graph* here is a dict of numpy arrays for one structure (keys from :mod:`mlip.data.keys`);
:func:`mlip.data.batch.collate` turns a list of them into one batch of torch tensors.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from . import keys
from .neighbors import DEFAULT_BACKEND, lattice_images, neighbor_list

# Two atoms closer than this (Å) are almost certainly a broken input (duplicated atom, wrong
# units), not physics: refuse them rather than predict a meaningless energy.
DEFAULT_MIN_DISTANCE = 0.3


@dataclass(frozen=True)
class LabelKeys:
    """Where a structure's reference labels are stored.

    extxyz files name them differently (``energy``, ``REF_energy``, ``dft_energy``...). A name is
    looked up in ``atoms.info`` (energy, stress) or ``atoms.arrays`` (forces) first, then in the
    results of an attached calculator (ASE's reader puts ``energy``/``forces``/``stress`` there).
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    property: Optional[str] = None  # atoms.info key of a property model's per-structure target (a scalar)


class TypeMapper:
    """Chemical symbols <-> the model's type indices."""

    def __init__(self, type_names: Sequence[str]):
        unknown = [s for s in type_names if s not in atomic_numbers]
        if unknown:
            raise ValueError(f"type names must be chemical symbols, got {unknown}")
        if len(set(type_names)) != len(type_names):
            raise ValueError(f"type names repeat: {list(type_names)}")
        self.type_names: List[str] = list(type_names)
        self._index = np.full(len(chemical_symbols), -1, dtype=np.int64)
        for t, symbol in enumerate(type_names):
            self._index[atomic_numbers[symbol]] = t

    def __call__(self, numbers: np.ndarray) -> np.ndarray:
        types = self._index[np.asarray(numbers)]
        if (types < 0).any():
            missing = sorted({chemical_symbols[z] for z in np.asarray(numbers)[types < 0]})
            raise ValueError(f"element(s) {missing} not known to this model; it knows {self.type_names}")
        return types

    @classmethod
    def from_atoms(cls, structures: Sequence[Atoms]) -> "TypeMapper":
        numbers = sorted({int(z) for atoms in structures for z in atoms.numbers})
        return cls([chemical_symbols[z] for z in numbers])


# Beyond this (Å) float64 itself resolves positions only to ~2e-3 Å: no edge vector can be trusted.
MAX_COORDINATE = 1e13


def check_structure(atoms: Atoms, min_distance: float = DEFAULT_MIN_DISTANCE) -> None:
    """Raise a clear error for input no potential can evaluate meaningfully, before any neighbor
    list is built: NaN/inf or absurdly far positions, a NaN/inf or degenerate periodic cell, and
    (for ``min_distance`` > 0) a cell that forces overlaps: a lattice vector shorter than
    ``min_distance`` (every atom overlaps its own image) or a number density above that of
    spheres of diameter ``min_distance`` in the densest packing, sqrt(2) / d^3 (some pair must be
    closer). Such cells would otherwise cost a neighbor list of millions of images per atom
    (a 0.1 Å cell with r_max 4 Å: ~10^8 edges) before the overlap check refuses them.
    """
    positions = atoms.positions
    if not np.isfinite(positions).all():
        bad = np.where(~np.isfinite(positions).all(axis=1))[0]
        raise ValueError(f"positions of atoms {bad[:10].tolist()} are NaN or infinite")
    if len(positions) and np.abs(positions).max() > MAX_COORDINATE:
        bad = np.where(np.abs(positions).max(axis=1) > MAX_COORDINATE)[0]
        raise ValueError(
            f"positions of atoms {bad[:10].tolist()} are beyond {MAX_COORDINATE:.0e} Å from the origin, "
            f"where float64 no longer resolves interatomic distances (wrap them into the cell)"
        )
    if not atoms.pbc.any():
        return
    cell = atoms.cell.array
    periodic = cell[atoms.pbc]
    if not np.isfinite(cell).all():
        raise ValueError(f"cell has NaN or infinite entries: {cell.tolist()}")
    if abs(np.linalg.det(periodic @ periodic.T)) < 1e-12:
        raise ValueError(
            f"structure is periodic along {atoms.pbc.tolist()} but its cell has zero volume there: "
            f"{cell.tolist()}"
        )
    if min_distance <= 0:
        return
    from ase.geometry import minkowski_reduce

    reduced = minkowski_reduce(cell, pbc=atoms.pbc)[0]  # its first periodic row: the shortest lattice vector
    shortest = float(np.linalg.norm(np.asarray(reduced)[atoms.pbc], axis=1).min())
    if shortest < min_distance:
        raise ValueError(
            f"the periodic cell has a lattice vector only {shortest:.3g} Å long (< min_distance {min_distance} Å): "
            f"every atom overlaps its own periodic image (cell {cell.tolist()}; wrong units or scale?)"
        )
    if atoms.pbc.all():
        density = len(atoms) / abs(np.linalg.det(cell))
        if density > np.sqrt(2.0) / min_distance**3:
            raise ValueError(
                f"{len(atoms)} atoms in a cell of {abs(np.linalg.det(cell)):.3g} Å^3 ({density:.3g} atoms/Å^3): "
                f"denser than spheres {min_distance} Å apart can pack (min_distance), so atoms overlap "
                f"(wrong units or scale of the cell?)"
            )


def check_min_distance(edge_lengths: np.ndarray, edge_index: np.ndarray, min_distance: float) -> None:
    if min_distance > 0 and len(edge_lengths) and edge_lengths.min() < min_distance:
        k = int(np.argmin(edge_lengths))
        raise ValueError(
            f"atoms {edge_index[0, k]} and {edge_index[1, k]} are {edge_lengths[k]:.3g} Å apart "
            f"(< {min_distance} Å): overlapping atoms or positions in the wrong units?"
        )


def read_labels(atoms: Atoms, label_keys: LabelKeys, require: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Energy (eV), forces (N, 3) eV/Å, stress (3, 3) eV/Å^3 and a property model's target where present."""
    calc_results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    labels: Dict[str, np.ndarray] = {}
    for field, name, store in (
        (keys.ENERGY, label_keys.energy, atoms.info),
        (keys.FORCES, label_keys.forces, atoms.arrays),
        (keys.STRESS, label_keys.stress, atoms.info),
    ):
        value = store.get(name, calc_results.get(name))
        if value is None and field == keys.ENERGY and name == "energy":
            value = calc_results.get("free_energy")
        if value is None:
            if field in require:
                where = "atoms.arrays" if field == keys.FORCES else "atoms.info"
                raise KeyError(
                    f"structure {atoms.get_chemical_formula()} has no {field} under the key {name!r} "
                    f"(looked in {where} and the calculator results; info keys: {sorted(atoms.info)}, "
                    f"arrays keys: {sorted(atoms.arrays)}). Set the key mapping (LabelKeys / data.keys)."
                )
            continue
        value = np.asarray(value, dtype=np.float64)
        if field == keys.STRESS:
            value = stress_to_matrix(value)
        if field == keys.FORCES and value.shape != (len(atoms), 3):
            raise ValueError(f"forces under {name!r} have shape {value.shape}, expected {(len(atoms), 3)}")
        if not np.isfinite(value).all():
            raise ValueError(f"{field} label under {name!r} contains NaN or infinite values")
        labels[field] = value.reshape(()) if field == keys.ENERGY else value
    if label_keys.property is not None:
        labels.update(_read_property(atoms, label_keys.property, keys.PROPERTY in require))
    return labels


def _read_property(atoms: Atoms, name: str, required: bool) -> Dict[str, np.ndarray]:
    """A property model's target: one finite number under ``atoms.info[name]``."""
    value = atoms.info.get(name)
    if value is None:
        if required:
            raise KeyError(f"structure {atoms.get_chemical_formula()} has no property under the info key {name!r} "
                           f"(info keys: {sorted(atoms.info)}); set data.keys.property")
        return {}
    try:
        value = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"property {name!r} is {value!r}, not a number") from None
    if value.size != 1:
        raise ValueError(f"property {name!r} has {value.size} values; a property model predicts one scalar")
    if not np.isfinite(value).all():
        raise ValueError(f"property {name!r} is {float(value.reshape(-1)[0])}, not a finite number")
    return {keys.PROPERTY: value.reshape(())}


def stress_to_matrix(stress: np.ndarray) -> np.ndarray:
    """Voigt (xx, yy, zz, yz, xz, xy), 9 numbers or 3x3 -> symmetric 3x3."""
    stress = np.asarray(stress, dtype=np.float64).reshape(-1)
    if stress.size == 6:
        xx, yy, zz, yz, xz, xy = stress
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if stress.size == 9:
        return stress.reshape(3, 3)
    raise ValueError(f"a stress has 6 (Voigt) or 9 components, got {stress.size}")


def matrix_to_voigt(stress: np.ndarray) -> np.ndarray:
    """3x3 -> ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(stress)
    return np.stack([s[..., 0, 0], s[..., 1, 1], s[..., 2, 2], s[..., 1, 2], s[..., 0, 2], s[..., 0, 1]], axis=-1)


def atoms_to_graph(
    atoms: Atoms,
    r_max: float,
    type_mapper: TypeMapper,
    label_keys: Optional[LabelKeys] = None,
    require: Sequence[str] = (),
    min_distance: float = DEFAULT_MIN_DISTANCE,
    backend: str = DEFAULT_BACKEND,
) -> Dict[str, np.ndarray]:
    """One structure as a dict of numpy arrays: positions (wrapped into the cell along periodic
    directions), types, cell, edges (+ labels)."""
    check_structure(atoms, min_distance)
    atom_types = type_mapper(atoms.numbers)
    cell = atoms.cell.array.astype(np.float64)
    pbc = atoms.pbc.copy()
    # Wrapped into the cell (float64): neighbor-list shifts stay small, so that float32 batches
    # keep the edge vectors of unwrapped trajectories (atoms diffused over many cells) accurate.
    positions = atoms.positions - lattice_images(atoms.positions, cell, pbc) @ cell
    edge_index, cell_shifts = neighbor_list(positions, cell, pbc, r_max, backend=backend)
    vectors = positions[edge_index[1]] - positions[edge_index[0]] + cell_shifts @ cell
    check_min_distance(np.linalg.norm(vectors, axis=1), edge_index, min_distance)

    graph = {
        keys.POSITIONS: positions,
        keys.ATOM_TYPES: atom_types,
        keys.CELL: cell,
        keys.PBC: pbc,
        keys.EDGE_INDEX: edge_index,
        keys.EDGE_CELL_SHIFTS: cell_shifts,
    }
    if label_keys is not None:
        labels = read_labels(atoms, label_keys, require)
        if keys.STRESS in labels and not pbc.all():
            del labels[keys.STRESS]  # a stress needs a volume: only for fully periodic cells
        graph.update(labels)
    return graph


def graph_to_atoms(graph: Dict[str, np.ndarray], type_names: Sequence[str]) -> Atoms:
    """Inverse of :func:`atoms_to_graph`, up to its wrapping of atoms into the cell (labels
    attached as a SinglePointCalculator)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    symbols = [type_names[t] for t in np.asarray(graph[keys.ATOM_TYPES])]
    atoms = Atoms(symbols, positions=graph[keys.POSITIONS], cell=graph[keys.CELL], pbc=graph[keys.PBC])
    results = {}
    if keys.ENERGY in graph:
        results["energy"] = float(graph[keys.ENERGY])
    if keys.FORCES in graph:
        results["forces"] = np.asarray(graph[keys.FORCES])
    if keys.STRESS in graph:
        results["stress"] = matrix_to_voigt(graph[keys.STRESS])
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
