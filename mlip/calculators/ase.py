"""ASE calculator for deployed mlip models.

    from mlip import MLIPCalculator
    atoms.calc = MLIPCalculator("model.pt")            # or device="cuda", dtype from the file

Results in ASE units: energy / free_energy (eV), energies (eV per atom, reference energies
included), forces (eV/Å), stress (eV/Å^3, Voigt xx yy zz yz xz xy, ASE sign; periodic cells only).
A committee file (`mlip deploy A B ...`) also gives committee_energies (eV, one per model; "energy"
is their mean), energy_uncertainty (eV, their standard deviation) and force_uncertainty (eV/Å per
atom, the spread of the models' forces on it): large where the models disagree, i.e. where the
structure is unlike the training data.

Threads: one calculator may be shared by several Python threads; calls are serialized by a lock
(each thread gets the results of its own structure, one at a time). For parallel evaluation give
each thread its own calculator.

Speed in MD: the neighbor list is built with a skin and reused until an atom has moved more than
half the skin or the cell changed; each step only filters the candidate edges to r_max on the
device. Threads: torch's own setting (all cores by default); pass ``threads=N`` or call
``torch.set_num_threads(N)`` to change it.
"""

import math
import os
import threading
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..allocator import reuse_freed_memory
from ..data import keys
from ..data.atoms import DEFAULT_MIN_DISTANCE, TypeMapper, check_min_distance, check_structure, matrix_to_voigt
from ..data.neighbors import skin_exceeded, skin_list
from ..deploy.model_file import (DTYPES, accepts_paired_edges, check_model_fields, load_model, require_potential,
                                 usable_device)
from ..models.committee import force_uncertainty

ModelLike = Union[str, os.PathLike, Tuple[torch.nn.Module, Dict[str, Any]], torch.nn.Module]

# Systems larger than this are evaluated by spatial domains (bounded memory) unless told otherwise.
DEFAULT_DOMAIN_THRESHOLD = 20000


def resolve_model(model: ModelLike, device: Union[str, torch.device]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A deployed file path, a (module, metadata) pair from load_model, or an eager Potential; a
    property model (file or eager) is refused: it has no energy, forces or stress."""
    from ..models import DeployedPotential, Potential, model_metadata
    from ..models.property import is_property_model

    if isinstance(model, (str, os.PathLike)):
        module, metadata = load_model(model, device=device)
        require_potential(metadata, os.fspath(model))
        return module, metadata
    if isinstance(model, tuple):
        module, metadata = model
        check_model_fields(metadata, "metadata given with the model")  # as a file's would be
        require_potential(metadata, "the model given")
        return module.to(device), metadata
    if is_property_model(model):
        require_potential(model_metadata(model), "the model given")
    if isinstance(model, Potential):
        return DeployedPotential(model).to(device).eval(), model_metadata(model)
    raise TypeError(f"MLIPCalculator takes a model file path, load_model()'s result or a Potential, not {type(model)}")


def _number(name: str, value, low: float, integer: bool = False):
    """``value`` checked to be a finite number (an integer if asked) >= ``low``; the error names it."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
        integer and not float(value).is_integer()
    ):
        raise TypeError(f"MLIPCalculator: {name} must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"MLIPCalculator: {name} must be {kind} >= {low}, got {value!r}")
    return int(value) if integer else float(value)


class MLIPCalculator(Calculator):
    """ASE calculator of a deployed mlip model (see the module docstring).

    Thread safety: a lock serializes calculations and the reading of their results, so one
    calculator shared by threads gives each thread the results of its own structure.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: ModelLike,
        device: Union[str, torch.device] = "cpu",
        skin: float = 1.0,
        min_distance: float = DEFAULT_MIN_DISTANCE,
        domain_threshold: Optional[int] = DEFAULT_DOMAIN_THRESHOLD,
        domain_atoms: int = 4000,
        threads: Optional[int] = None,
        reuse_memory: bool = True,
        label: Optional[str] = None,
        atoms=None,
    ):
        """
        skin: Å (>= 0) added to r_max for the reused neighbor list (0 rebuilds it every call).
        min_distance: Å (>= 0); closer atoms raise an error (overlap or wrong units); 0 disables
            it and the cell checks built on it.
        domain_threshold: systems with more atoms (>= 1) are evaluated by spatial domains of about
            ``domain_atoms`` (>= 1) owned atoms each (identical results, bounded memory); None disables.
        threads: if given (>= 1), sets torch's (process-wide) intra-op thread count.
        reuse_memory: let glibc recycle large freed blocks (process-wide; ~2x faster steps for
            thousands of atoms, higher peak RSS; see mlip.allocator).
        label, atoms: ASE's own Calculator arguments. No other keyword is accepted (a misspelt
            one is an error, not an ignored "parameter"); the dtype is the model file's.
        """
        self.skin = _number("skin", skin, 0.0)
        self.min_distance = _number("min_distance", min_distance, 0.0)
        self.domain_threshold = None if domain_threshold is None else _number(
            "domain_threshold", domain_threshold, 1, integer=True)
        self.domain_atoms = _number("domain_atoms", domain_atoms, 1, integer=True)
        if threads is not None:
            threads = _number("threads", threads, 1, integer=True)
        self.device = usable_device(device)
        super().__init__(label=label, atoms=atoms)
        self._lock = threading.RLock()
        self.model, self.metadata = resolve_model(model, self.device)
        self.dtype = DTYPES[self.metadata["dtype"]]
        self.r_max = float(self.metadata["r_max"])
        self.type_mapper = TypeMapper(self.metadata["type_names"])
        # Edges ordered as [one direction; reverses] let NequIP compute radial weights once per pair.
        self.paired = accepts_paired_edges(self.model)
        self.gradient_head = self.metadata["force_head"] == "gradient"
        if not self.gradient_head:
            self.implemented_properties = ["energy", "free_energy", "energies", "forces"]
        if "members" in self.metadata.get("hyperparameters", {}):
            self.implemented_properties = self.implemented_properties + [
                "committee_energies", keys.ENERGY_UNCERTAINTY, keys.FORCE_UNCERTAINTY]
        if threads is not None:
            torch.set_num_threads(threads)
        if reuse_memory:
            reuse_freed_memory()
        self._neighbors: Optional[Dict[str, Any]] = None

    # --- neighbor list with a skin ------------------------------------------------------------
    def _candidate_edges(self, atoms) -> Dict[str, Any]:
        positions = atoms.positions
        cached = self._neighbors
        if cached is not None and (
            cached["numbers"].shape == atoms.numbers.shape
            and (cached["numbers"] == atoms.numbers).all()
            and (cached["pbc"] == atoms.pbc).all()
            and np.array_equal(cached["cell"], atoms.cell.array)
        ):
            displacement = np.sqrt(((positions - cached["positions"]) ** 2).sum(axis=1).max())
            if not skin_exceeded(displacement, 1.0, self.r_max, self.skin):
                return cached
        cell = atoms.cell.array
        built = skin_list(positions, cell, atoms.pbc, self.r_max + self.skin, self.paired)
        self._neighbors = {
            "numbers": atoms.numbers.copy(),
            "pbc": atoms.pbc.copy(),
            "cell": cell.copy(),
            "positions": positions.copy(),
            "translations": built["images"] @ cell,  # (N, 3) Å, lattice vectors, frozen with the list
            "origin": built["origin"],
            "edge_index": torch.as_tensor(built["edge_index"], device=self.device),
            "shifts": torch.as_tensor(built["cell_shifts"] @ cell, dtype=self.dtype, device=self.device),
            "atom_types": torch.as_tensor(self.type_mapper(atoms.numbers), device=self.device),
        }
        return self._neighbors

    def _evaluate_whole(self, atoms) -> Dict[str, torch.Tensor]:
        graph = self._candidate_edges(atoms)
        # Two float64 subtractions, the large one first: exact for atoms a lattice vector apart.
        relative = (atoms.positions - graph["translations"]) - graph["origin"]  # (N, 3) Å
        positions = torch.as_tensor(relative, dtype=self.dtype, device=self.device)
        edge_index, shifts = graph["edge_index"], graph["shifts"]
        if self.skin > 0:
            vectors = positions[edge_index[1]] - positions[edge_index[0]] + shifts
            inside = (vectors * vectors).sum(dim=1) < self.r_max**2
            if self.paired:  # keep or drop both directions of a pair together
                inside = inside[: len(inside) // 2].repeat(2)
            edge_index, shifts = edge_index[:, inside], shifts[inside]
            lengths = vectors[inside].norm(dim=1)
        else:
            lengths = (positions[edge_index[1]] - positions[edge_index[0]] + shifts).norm(dim=1)
        # One device-side min per step; the arrays leave the device only to build the error.
        if self.min_distance > 0 and lengths.numel() and float(lengths.min()) < self.min_distance:
            check_min_distance(lengths.cpu().numpy(), edge_index.cpu().numpy(), self.min_distance)
        if self.paired:
            return self.model(positions, graph["atom_types"], edge_index, shifts, len(atoms), True)
        return self.model(positions, graph["atom_types"], edge_index, shifts, len(atoms))

    # --- ASE interface ----------------------------------------------------------------------------
    def get_property(self, name, atoms=None, allow_calculation=True):
        # ASE calculates into self.results, then reads from it: both under the lock, or another
        # thread's calculation could replace the results in between.
        with self._lock:
            return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        with self._lock:
            self._calculate(atoms, properties, system_changes)

    def _calculate(self, atoms, properties, system_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if "stress" in properties:
            if not self.gradient_head:
                raise PropertyNotImplementedError(
                    "this model has a direct-force head: it predicts no stress (deploy a gradient-head model)"
                )
            if not atoms.pbc.all():
                raise PropertyNotImplementedError(
                    f"stress needs a structure periodic in all three directions (pbc={atoms.pbc.tolist()}): "
                    "a non-periodic cell has no volume to divide by"
                )
        check_structure(atoms, self.min_distance)
        self.type_mapper(atoms.numbers)  # clear error for unknown elements before anything else

        if self.domain_threshold is not None and len(atoms) > self.domain_threshold:
            from .domains import evaluate_by_domains

            out = evaluate_by_domains(self, atoms)
        else:
            out = self._evaluate_whole(atoms)

        energies = out["atomic_energies"].detach().cpu().numpy().astype(np.float64)
        forces = out["forces"].detach().cpu().numpy().astype(np.float64)
        if not self.gradient_head:
            forces = forces - forces.mean(axis=0)  # direct forces: no net force, no drift
        energy = float(out["energy"].detach())
        self.results = {"energy": energy, "free_energy": energy, "energies": energies, "forces": forces}
        if keys.MEMBER_ATOMIC_ENERGIES in out:
            committee_energies = out[keys.MEMBER_ATOMIC_ENERGIES].detach().cpu().numpy().sum(axis=0)  # (M,) eV
            self.results["committee_energies"] = committee_energies
            self.results[keys.ENERGY_UNCERTAINTY] = float(committee_energies.std())
        if keys.MEMBER_FORCES in out:  # committee files deployed before 2026-12 lack it (re-deploy them)
            member_forces = out[keys.MEMBER_FORCES].detach().to(torch.float64)  # (N, 3, M)
            if not self.gradient_head:
                member_forces = member_forces - member_forces.mean(dim=0)
            self.results[keys.FORCE_UNCERTAINTY] = force_uncertainty(member_forces).cpu().numpy()
        if self.gradient_head and atoms.pbc.all():
            virial = out["virial"].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = matrix_to_voigt(-virial.T / atoms.get_volume())
