"""A potential = an energy model + per-species shift/scale + a force head.

One autograd path: the energy model sees only edge vectors r_ij, so forces, virial and stress
all follow from g_ij = dE/dr_ij (F_i += g_ij, F_j -= g_ij, W = -sum r_ij (x) g_ij). The same code
serves batched training, the ASE calculator and LAMMPS ghost atoms.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..data import keys
from ..nn import scatter_sum


class Potential(nn.Module):
    """Reads positions, atom_types, edge_index, edge_shifts, batch, cell, pbc, num_atoms;
    writes energy, atomic_energies, forces (+ virial, stress for the gradient head).

    The energy model maps edge vectors to raw per-atom energies (N,), or (N, M) for a committee of
    M models (mlip.models.committee), whose mean is the energy."""

    def __init__(
        self,
        energy_model: nn.Module,
        reference_energies: torch.Tensor,  # (num_types,) eV, kept in float64
        energy_scale: float,  # eV: raw model outputs are O(1)
        gradient_head: bool,
    ):
        super().__init__()
        self.energy_model = energy_model
        self.register_buffer("reference_energies", reference_energies.clone())
        self.energy_scale = float(energy_scale)
        self.gradient_head = gradient_head

    def energies_and_forces(
        self,
        positions: torch.Tensor,  # (N, 3)
        atom_types: torch.Tensor,  # (N,)
        edge_index: torch.Tensor,  # (2, E)
        edge_shifts: torch.Tensor,  # (E, 3)
        num_local: int,
        create_graph: bool,
        paired: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Per-atom energies of the first ``num_local`` nodes, forces on all nodes,
        edge vectors, (gradient head) dE/dr_ij and (committee) each member's per-atom energies
        (num_local, M), detached: forces come from the mean energy only.

        paired: edge k + E/2 is the reverse of edge k (mlip.data.pair_edges); the model may then
        compute what depends on the pair distance alone once per pair. Forces and virial stay
        exact: r_ji = -r_ij as functions of the positions, so the chain rule through either
        direction gives the same total.
        """
        center, neighbor = edge_index[0], edge_index[1]
        edge_vectors = (positions[neighbor] - positions[center] + edge_shifts).detach()
        if self.gradient_head:
            edge_vectors.requires_grad_(True)
        raw_energies, raw_vectors = self.energy_model(edge_vectors, atom_types, edge_index, paired)
        # Reference energies are ~1e3 eV per atom: add them in float64 so float32 models keep meV.
        reference = self.reference_energies.to(torch.float64)[atom_types]
        member_energies: Optional[torch.Tensor] = None
        if raw_energies.dim() == 2:  # a committee: (N, M)
            member_raw = raw_energies.detach()[:num_local]
            member_energies = (self.energy_scale * member_raw).to(torch.float64) + reference[:num_local].unsqueeze(1)
            raw_energies = raw_energies.mean(dim=1)
        atomic_energies = ((self.energy_scale * raw_energies).to(torch.float64) + reference)[:num_local]

        if self.gradient_head:
            grad_outputs: List[Optional[torch.Tensor]] = [torch.ones_like(atomic_energies)]
            edge_grad = torch.autograd.grad(
                [atomic_energies], [edge_vectors], grad_outputs=grad_outputs, create_graph=create_graph,
                allow_unused=True,
            )[0]
            if edge_grad is None:  # no edges reach the local atoms: forces are truly zero
                edge_grad = torch.zeros_like(edge_vectors)
            forces = torch.zeros_like(positions)
            forces = forces.index_add(0, center, edge_grad).index_add(0, neighbor, -edge_grad)
            return atomic_energies, forces, edge_vectors, edge_grad, member_energies

        if raw_vectors is None:
            raise RuntimeError("direct-force head needs an energy model built with vector_output=True")
        forces = self.energy_scale * raw_vectors
        # Ghost nodes see an incomplete environment: their direct forces are not predictions.
        local = (torch.arange(forces.shape[0], device=forces.device) < num_local).unsqueeze(-1)
        return atomic_energies, forces * local.to(forces.dtype), edge_vectors, None, member_energies

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = data[keys.POSITIONS]
        batch = data[keys.BATCH]
        num_graphs = data[keys.NUM_ATOMS].shape[0]
        atomic_energies, forces, edge_vectors, edge_grad, _ = self.energies_and_forces(
            positions, data[keys.ATOM_TYPES], data[keys.EDGE_INDEX], data[keys.EDGE_SHIFTS],
            positions.shape[0], self.training, keys.EDGES_PAIRED in data and bool(data[keys.EDGES_PAIRED]),
        )
        out = {
            keys.ATOMIC_ENERGIES: atomic_energies,
            keys.ENERGY: scatter_sum(atomic_energies, batch, num_graphs),
        }
        if edge_grad is None:
            # Direct forces: remove each structure's net force so it cannot drive a drift.
            net = scatter_sum(forces, batch, num_graphs) / data[keys.NUM_ATOMS].unsqueeze(-1).to(forces.dtype)
            out[keys.FORCES] = forces - net[batch]
            return out
        out[keys.FORCES] = forces
        edge_graph = batch[data[keys.EDGE_INDEX][0]]
        virial = scatter_sum(-edge_vectors.unsqueeze(2) * edge_grad.unsqueeze(1), edge_graph, num_graphs)
        out[keys.VIRIAL] = virial  # (B, 3, 3)
        out[keys.STRESS] = stress_from_virial(virial, data[keys.CELL], data[keys.PBC])
        return out


def stress_from_virial(virial: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """sigma = -W^T / V for fully periodic structures; zero (not a fake-volume number) otherwise."""
    periodic = pbc.all(dim=1)
    volume = torch.linalg.det(cell).abs()
    volume = torch.where(periodic, volume, torch.ones_like(volume))
    stress = -virial.transpose(1, 2) / volume.view(-1, 1, 1)
    return stress * periodic.view(-1, 1, 1).to(stress.dtype)


class DeployedPotential(nn.Module):
    """The file-level contract (see mlip.deploy.model_file): flat tensors in, dict out."""

    def __init__(self, potential: Potential):
        super().__init__()
        self.potential = potential

    def forward(
        self,
        positions: torch.Tensor,
        atom_types: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shifts: torch.Tensor,
        num_local: int,
        paired: bool = False,
    ) -> Dict[str, torch.Tensor]:
        atomic_energies, forces, edge_vectors, edge_grad, member_energies = self.potential.energies_and_forces(
            positions, atom_types, edge_index, edge_shifts, num_local, False, paired
        )
        out = {
            keys.ATOMIC_ENERGIES: atomic_energies.detach(),
            keys.ENERGY: atomic_energies.detach().sum(),
            keys.FORCES: forces.detach(),
        }
        if edge_grad is not None:
            out[keys.VIRIAL] = -(edge_vectors.detach().t() @ edge_grad)  # (3, 3)
        if member_energies is not None:
            out[keys.MEMBER_ATOMIC_ENERGIES] = member_energies
        return out
