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

    The energy model maps edge vectors (E, 3) to raw per-atom energies (N,); a committee of M models
    (mlip.models.committee) maps (M, E, 3) to (N, M), whose mean is the energy."""

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
        self.num_members = int(getattr(energy_model, "num_members", 0))  # M of a committee, 0 for one model

    def energies_and_forces(
        self,
        positions: torch.Tensor,  # (N, 3)
        atom_types: torch.Tensor,  # (N,)
        edge_index: torch.Tensor,  # (2, E)
        edge_shifts: torch.Tensor,  # (E, 3)
        num_local: int,
        create_graph: bool,
        paired: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """Per-atom energies of the first ``num_local`` nodes, forces on all nodes,
        edge vectors, (gradient head) dE/dr_ij and, for a committee, each member's own per-atom
        energies (num_local, M) and forces (N, 3, M) (detached; empty dict for one model).

        paired: edge k + E/2 is the reverse of edge k (mlip.data.pair_edges); the model may then
        compute what depends on the pair distance alone once per pair. Forces and virial stay
        exact: r_ji = -r_ij as functions of the positions, so the chain rule through either
        direction gives the same total.
        """
        center, neighbor = edge_index[0], edge_index[1]
        edge_vectors = (positions[neighbor] - positions[center] + edge_shifts).detach()
        if self.gradient_head:
            edge_vectors.requires_grad_(True)
        model_edges = edge_vectors
        if self.num_members > 0:
            # Each member reads its own copy (M, E, 3): the one backward pass of the mean energy then
            # yields every member's dE/dr separately, at no extra cost.
            model_edges = edge_vectors.unsqueeze(0).repeat(self.num_members, 1, 1)
        raw_energies, raw_vectors = self.energy_model(model_edges, atom_types, edge_index, paired)
        # Reference energies are ~1e3 eV per atom: add them in float64 so float32 models keep meV.
        reference = self.reference_energies.to(torch.float64)[atom_types]
        committee: Dict[str, torch.Tensor] = {}
        if self.num_members > 0:  # raw energies (N, M)
            member_raw = raw_energies.detach()[:num_local]
            committee[keys.MEMBER_ATOMIC_ENERGIES] = (
                (self.energy_scale * member_raw).to(torch.float64) + reference[:num_local].unsqueeze(1))
            raw_energies = raw_energies.mean(dim=1)
        atomic_energies = ((self.energy_scale * raw_energies).to(torch.float64) + reference)[:num_local]

        if self.gradient_head:
            grad_outputs: List[Optional[torch.Tensor]] = [torch.ones_like(atomic_energies)]
            model_grad = torch.autograd.grad(
                [atomic_energies], [model_edges], grad_outputs=grad_outputs, create_graph=create_graph,
                allow_unused=True,
            )[0]
            if model_grad is None:  # no edges reach the local atoms: forces are truly zero
                model_grad = torch.zeros_like(model_edges)
            edge_grad = model_grad
            if self.num_members > 0:  # (M, E, 3): member m's share (1/M) dE_m/dr of the mean's gradient
                edge_grad = model_grad.sum(dim=0)
                member_grad = (self.num_members * model_grad.detach()).permute(1, 2, 0)  # (E, 3, M)
                member_forces = positions.new_zeros(positions.shape[0], 3, self.num_members)
                member_forces = member_forces.index_add(0, center, member_grad).index_add(0, neighbor, -member_grad)
                committee[keys.MEMBER_FORCES] = member_forces
            forces = torch.zeros_like(positions)
            forces = forces.index_add(0, center, edge_grad).index_add(0, neighbor, -edge_grad)
            return atomic_energies, forces, edge_vectors, edge_grad, committee

        if raw_vectors is None:
            raise RuntimeError("direct-force head needs an energy model built with vector_output=True")
        # Ghost nodes see an incomplete environment: their direct forces are not predictions.
        local = (torch.arange(positions.shape[0], device=positions.device) < num_local).to(positions.dtype)
        if self.num_members > 0:  # raw vectors (N, 3, M)
            committee[keys.MEMBER_FORCES] = (self.energy_scale * raw_vectors.detach()) * local.view(-1, 1, 1)
            raw_vectors = raw_vectors.mean(dim=2)
        forces = self.energy_scale * raw_vectors
        return atomic_energies, forces * local.unsqueeze(-1), edge_vectors, None, committee

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
        atomic_energies, forces, edge_vectors, edge_grad, committee = self.potential.energies_and_forces(
            positions, atom_types, edge_index, edge_shifts, num_local, False, paired
        )
        out = {
            keys.ATOMIC_ENERGIES: atomic_energies.detach(),
            keys.ENERGY: atomic_energies.detach().sum(),
            keys.FORCES: forces.detach(),
        }
        if edge_grad is not None:
            out[keys.VIRIAL] = -(edge_vectors.detach().t() @ edge_grad)  # (3, 3)
        out.update(committee)
        return out
