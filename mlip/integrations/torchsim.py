"""A deployed mlip model as a torch-sim model (``pip install "mlip[torchsim]"``).

    import torch_sim as ts
    from mlip.integrations.torchsim import MLIPModel

    model = MLIPModel("potentials/si-allegro/model.pt")
    relaxed = ts.optimize(system=structures, model=model, optimizer=ts.frechet_cell_fire)

torch-sim's batched optimisers and integrators call ``model(state)`` on many systems at once; the
evaluation is mlip's batched engine (mlip.calculators.batched.BatchedModel): one model call per
batch, per-system energies, per-atom forces and per-system stresses from per-system virials.
Stress is ASE's (eV/Å^3, negative under compression), which torch-sim uses too. torch-sim's
``state.cell`` holds lattice vectors as columns; ``state.row_vector_cell`` is ASE's layout.
"""

from typing import Dict, Union

import torch

try:
    from torch_sim.models.interface import ModelInterface
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError('mlip.integrations.torchsim needs torch-sim: pip install "mlip[torchsim]"') from error

from ..calculators.ase import ModelLike
from ..calculators.batched import BatchedModel
from ..data import keys


class MLIPModel(ModelInterface):
    """torch-sim ModelInterface over a deployed mlip file (or load_model()'s result, or a Potential).

    Works in the file's dtype (metadata "dtype"): build torch-sim states with ``model.dtype``.
    Stress is computed where the model has a gradient head (``compute_stress``).
    """

    def __init__(self, model: ModelLike, device: Union[str, torch.device] = "cpu", compute_stress: bool = True):
        super().__init__()
        self.engine = BatchedModel(model, device=device)
        self._device = self.engine.device
        self._dtype = self.engine.dtype
        self._compute_forces = True
        self._compute_stress = bool(compute_stress) and self.engine.has_stress
        self._memory_scales_with = "n_atoms_x_density"  # radial cutoff: neighbors grow with density

    def forward(self, state, **kwargs) -> Dict[str, torch.Tensor]:
        """energy (n_systems,) eV, forces (n_atoms, 3) eV/Å[, stress (n_systems, 3, 3) eV/Å^3]."""
        get = state.get if isinstance(state, dict) else lambda name, default=None: getattr(state, name, default)
        positions = get("positions")
        system_idx = get("system_idx")
        if system_idx is None:  # torch-sim < 0.3 called it "batch"
            system_idx = get("batch")
        atomic_numbers = get("atomic_numbers")
        if atomic_numbers is None:
            raise ValueError("torch-sim state has no atomic_numbers: mlip models need the species of every atom")
        cell = get("row_vector_cell")
        if cell is None:
            cell = get("cell").transpose(-1, -2)  # torch-sim stores lattice vectors as columns
        cell = cell.reshape(-1, 3, 3)
        if len(system_idx) > 1 and bool((system_idx[1:] < system_idx[:-1]).any()):
            raise ValueError("torch-sim state: atoms must be grouped by system (system_idx non-decreasing)")
        num_systems = cell.shape[0]
        num_atoms = torch.bincount(system_idx, minlength=num_systems)
        pbc = torch.as_tensor(get("pbc"), dtype=torch.bool, device=positions.device)
        pbc = pbc.expand(num_systems, 3) if pbc.dim() <= 1 else pbc
        types = torch.as_tensor(self.engine.type_mapper(atomic_numbers.cpu().numpy()), device=self._device)
        out = self.engine.evaluate(positions, types, cell, pbc, num_atoms)
        results = {"energy": out[keys.ENERGY].to(self._dtype), "forces": out[keys.FORCES].to(self._dtype)}
        if self._compute_stress:
            results["stress"] = out[keys.STRESS].to(self._dtype)
        return results
