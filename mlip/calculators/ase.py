"""ASE calculator for deployed mlip models.

    from mlip import MLIPCalculator
    atoms.calc = MLIPCalculator("model.pt")            # or device="cuda", dtype from the file

Results in ASE units: energy / free_energy (eV), energies (eV per atom, reference energies
included), forces (eV/Å), stress (eV/Å^3, Voigt xx yy zz yz xz xy, ASE sign; periodic cells only).
A committee file (`mlip deploy A B ...`) also gives committee_energies (eV, one per model; "energy"
is their mean), energy_uncertainty (eV, their standard deviation) and force_uncertainty (eV/Å per
atom, the spread of the models' forces on it): large where the models disagree, i.e. where the
structure is unlike the training data.

Speed in MD: the neighbor list is built with a skin and reused until an atom has moved more than
half the skin or the cell changed; each step only filters the candidate edges to r_max on the
device. Threads: torch's own setting (all cores by default); pass ``threads=N`` or call
``torch.set_num_threads(N)`` to change it.
"""

import os
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..allocator import reuse_freed_memory
from ..data import keys
from ..data.atoms import DEFAULT_MIN_DISTANCE, TypeMapper, check_min_distance, check_structure, matrix_to_voigt
from ..data.neighbors import neighbor_list, pair_edges
from ..deploy.model_file import DTYPES, accepts_paired_edges, load_model
from ..device import check_device
from ..models.committee import force_uncertainty

ModelLike = Union[str, os.PathLike, Tuple[torch.nn.Module, Dict[str, Any]], torch.nn.Module]

# Systems larger than this are evaluated by spatial domains (bounded memory) unless told otherwise.
DEFAULT_DOMAIN_THRESHOLD = 20000


def resolve_model(model: ModelLike, device: Union[str, torch.device]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A deployed file path, a (module, metadata) pair from load_model, or an eager Potential."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device)
    if isinstance(model, tuple):
        module, metadata = model
        return module.to(device), metadata
    from ..models import DeployedPotential, Potential, model_metadata

    if isinstance(model, Potential):
        return DeployedPotential(model).to(device).eval(), model_metadata(model)
    raise TypeError(f"MLIPCalculator takes a model file path, load_model()'s result or a Potential, not {type(model)}")


class MLIPCalculator(Calculator):
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
        **kwargs,
    ):
        """
        skin: Å added to r_max for the reused neighbor list (0 rebuilds it every call).
        min_distance: Å; closer atoms raise an error (overlap or wrong units).
        domain_threshold: systems with more atoms are evaluated by spatial domains of about
            ``domain_atoms`` owned atoms each (identical results, bounded memory); None disables.
        threads: if given, sets torch's (process-wide) intra-op thread count.
        reuse_memory: let glibc recycle large freed blocks (process-wide; ~2x faster steps for
            thousands of atoms, higher peak RSS; see mlip.allocator).
        """
        super().__init__(**kwargs)
        self.device = check_device(device)
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
        self.skin = float(skin)
        self.min_distance = float(min_distance)
        self.domain_threshold = domain_threshold
        self.domain_atoms = int(domain_atoms)
        if threads is not None:
            torch.set_num_threads(int(threads))
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
            if 2.0 * displacement <= self.skin:
                return cached
        edge_index, cell_shifts = neighbor_list(positions, atoms.cell.array, atoms.pbc, self.r_max + self.skin)
        if self.paired:
            edge_index, cell_shifts = pair_edges(edge_index, cell_shifts)
        self._neighbors = {
            "numbers": atoms.numbers.copy(),
            "pbc": atoms.pbc.copy(),
            "cell": atoms.cell.array.copy(),
            "positions": positions.copy(),
            "edge_index": torch.as_tensor(edge_index, device=self.device),
            "shifts": torch.as_tensor(cell_shifts @ atoms.cell.array, dtype=self.dtype, device=self.device),
            "atom_types": torch.as_tensor(self.type_mapper(atoms.numbers), device=self.device),
        }
        return self._neighbors

    def _evaluate_whole(self, atoms) -> Dict[str, torch.Tensor]:
        graph = self._candidate_edges(atoms)
        positions = torch.as_tensor(atoms.positions, dtype=self.dtype, device=self.device)
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
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
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
        check_structure(atoms)
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
        energy = float(out["energy"])
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
