"""Allegro (Musaelian et al., Nat. Commun. 14, 579 (2023)): strictly local, features on edges.

Every ordered pair (i, j) within r_max carries a scalar track x_ij and an equivariant track V_ij.
A layer builds the environment of the center, env_i = sum_k w(x_ik) Y(r_ik), takes the tensor
product V_ij (x) env_i channel by channel, feeds its scalars to an MLP that updates x_ij, and
mixes the product back into V_ij. Pair energies E_ij = MLP(x_ij) f_cut(r_ij) sum to E_i.
Nothing is exchanged between atoms, so E_i depends only on atoms within r_max of i.

Equivariant features are lists of blocks (2l+1, E, channels), l = 0..l_max with parity (-1)^l
(see mlip.nn.irreps).
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..nn import BesselBasis, PolynomialCutoff, mlp, scatter_sum
from ..nn.harmonics import SphericalHarmonics
from ..nn.irreps import IrrepsLinear, TensorProduct, gather_rows, scatter_rows, split_blocks


class AllegroLayer(nn.Module):
    def __init__(self, num_scalar: int, num_tensor: int, l_max: int, mlp_hidden: int, avg_num_neighbors: float,
                 update_tensor: bool = True):
        """update_tensor=False (last layer without a vector output): V_ij is not needed afterwards."""
        super().__init__()
        self.num_tensor = num_tensor
        self.l_max = l_max
        self.inv_sqrt_neighbors = avg_num_neighbors**-0.5
        irreps = [(l, (-1) ** l) for l in range(l_max + 1)]
        self.block_sizes: List[int] = [2 * l + 1 for l in range(l_max + 1)]
        # component -> its l, to spread per-l weights over the 2l+1 components in one gather
        self.register_buffer("component_l", torch.cat([torch.full((2 * l + 1,), l) for l in range(l_max + 1)]))

        self.env_weights = nn.Linear(num_scalar, num_tensor * (l_max + 1))
        self.tp = TensorProduct(irreps, irreps, irreps)
        channels_out = [num_tensor * n for n in self.tp.paths_per_out]
        self.latent_mlp = mlp([num_scalar + channels_out[0], mlp_hidden, num_scalar])
        self.tensor_linear: Optional[IrrepsLinear] = (
            IrrepsLinear(self.tp.irreps_out, channels_out, irreps, [num_tensor] * (l_max + 1)) if update_tensor else None
        )

    def forward(
        self,
        x: torch.Tensor,  # (E, num_scalar) scalar track
        v: List[torch.Tensor],  # [(2l+1, E, num_tensor)] equivariant track
        sh: torch.Tensor,  # ((l_max+1)^2, E, 1) edge harmonics
        cutoff: torch.Tensor,  # (E, 1) envelope
        edge_center: torch.Tensor,  # (E,)
        num_nodes: int,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        weighted = sh * per_component(self.env_weights(x) * cutoff, self.component_l, self.l_max)
        env = scatter_rows(weighted, edge_center, num_nodes) * self.inv_sqrt_neighbors  # (d, N, u)
        product = self.tp(v, split_blocks(gather_rows(env, edge_center), self.l_max))  # [(2l+1, E, u * paths)]
        scalars = product[0].squeeze(0)
        x = x + self.latent_mlp(torch.cat([x, scalars], dim=1)) * cutoff
        tensor_linear = self.tensor_linear
        if tensor_linear is None:
            return x, v
        return x, tensor_linear(product)


def per_component(weights: torch.Tensor, component_l: torch.Tensor, l_max: int) -> torch.Tensor:
    """Per-l channel weights (E, (l_max+1) * u) -> one row per harmonic component ((l_max+1)^2, E, u)."""
    channels = weights.shape[1] // (l_max + 1)
    return weights.view(weights.shape[0], l_max + 1, channels).transpose(0, 1).index_select(0, component_l)


class Allegro(nn.Module):
    """Edge vectors -> per-atom raw energies (N,) and an optional per-atom vector (N, 3)."""

    def __init__(
        self,
        num_types: int,
        r_max: float,
        l_max: int = 1,
        num_layers: int = 2,
        num_scalar: int = 32,
        num_tensor: int = 32,
        mlp_hidden: int = 64,
        readout_hidden: int = 32,
        num_basis: int = 8,
        cutoff_p: int = 6,
        avg_num_neighbors: float = 1.0,
        vector_output: bool = False,
    ):
        super().__init__()
        self.num_types = num_types
        self.num_tensor = num_tensor
        self.l_max = l_max
        self.spherical_harmonics = SphericalHarmonics(l_max)
        self.basis = BesselBasis(r_max, num_basis)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.two_body = mlp([2 * num_types + num_basis, mlp_hidden, num_scalar])
        self.initial_weights = nn.Linear(num_scalar, num_tensor * (l_max + 1))
        self.layers = nn.ModuleList(
            [
                AllegroLayer(num_scalar, num_tensor, l_max, mlp_hidden, avg_num_neighbors,
                             update_tensor=k < num_layers - 1 or vector_output)
                for k in range(num_layers)
            ]
        )
        self.num_invariant_features = num_scalar
        self.inv_sqrt_neighbors = avg_num_neighbors**-0.5
        self.readout = mlp([num_scalar, readout_hidden, 1])
        self.vector_readout: Optional[nn.Linear] = (
            nn.Linear(num_tensor, 1, bias=False) if vector_output and l_max >= 1 else None
        )
        self.register_buffer("component_l", torch.cat([torch.full((2 * l + 1,), l) for l in range(l_max + 1)]))

    def forward(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor, paired: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """paired (edge k + E/2 reverses edge k) is accepted and unused: every per-edge quantity
        here depends on the ordered species pair (center, neighbor), so the two directions differ."""
        num_nodes = atom_types.shape[0]
        x, v, cutoff = self.edge_features(edge_vectors, atom_types, edge_index)
        pair_energies = self.readout(x) * cutoff  # (E, 1)
        energies = scatter_sum(pair_energies, edge_index[0], num_nodes).squeeze(-1)
        vectors: Optional[torch.Tensor] = None
        vector_readout = self.vector_readout
        if vector_readout is not None:
            pair_vectors = vector_readout(v[1]).squeeze(-1).t() * cutoff  # (E, 3); the l=1 block is (x, y, z)
            vectors = scatter_sum(pair_vectors, edge_index[0], num_nodes)
        return energies, vectors

    def invariant_features(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor, paired: bool = False
    ) -> torch.Tensor:
        """(N, num_scalar): each atom's sum of its edges' scalar tracks (smoothly cut off), normalised
        like the environments: still a function of the atoms within r_max alone."""
        x, _, cutoff = self.edge_features(edge_vectors, atom_types, edge_index)
        return scatter_sum(x * cutoff, edge_index[0], atom_types.shape[0]) * self.inv_sqrt_neighbors

    def edge_features(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """The last layer's scalar track x_ij (E, num_scalar), equivariant track V_ij and envelope (E, 1)."""
        num_nodes = atom_types.shape[0]
        center, neighbor = edge_index[0], edge_index[1]
        lengths = torch.linalg.norm(edge_vectors, dim=-1)
        cutoff = self.cutoff(lengths).unsqueeze(-1)  # (E, 1)
        sh = self.spherical_harmonics(edge_vectors)  # ((l_max+1)^2, E, 1)

        species = torch.nn.functional.one_hot(atom_types, self.num_types).to(edge_vectors.dtype)
        pair = torch.cat([species[center], species[neighbor], self.basis(lengths) * cutoff], dim=1)
        x = self.two_body(pair) * cutoff  # (E, num_scalar)
        v = split_blocks(sh * per_component(self.initial_weights(x), self.component_l, self.l_max), self.l_max)
        for layer in self.layers:
            x, v = layer(x, v, sh, cutoff, center, num_nodes)
        return x, v, cutoff

