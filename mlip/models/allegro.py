"""Allegro (Musaelian et al., Nat. Commun. 14, 579 (2023)): strictly local, features on edges.

Every ordered pair (i, j) within r_max carries a scalar track x_ij and an equivariant track V_ij.
A layer builds the environment of the center, env_i = sum_k w(x_ik) Y(r_ik), takes the tensor
product V_ij (x) env_i channel by channel, feeds its scalars to an MLP that updates x_ij, and
mixes the product back into V_ij. Pair energies E_ij = MLP(x_ij) f_cut(r_ij) sum to E_i.
Nothing is exchanged between atoms, so E_i depends only on atoms within r_max of i.
"""

from typing import List, Optional, Tuple

import torch
from e3nn import o3
from torch import nn

from ..nn import BesselBasis, PolynomialCutoff, mlp, scatter_sum


def weighted_harmonics(weights: torch.Tensor, sh_blocks: List[torch.Tensor]) -> torch.Tensor:
    """Channel-wise weighted harmonics in e3nn layout.

    weights (E, channels, num_l), sh_blocks[l] (E, 2l+1) -> (E, channels x (0e + 1o + ...)).
    """
    parts = [(weights[:, :, l, None] * block[:, None, :]).flatten(1) for l, block in enumerate(sh_blocks)]
    return torch.cat(parts, dim=1)


class AllegroLayer(nn.Module):
    def __init__(self, num_scalar: int, num_tensor: int, l_max: int, mlp_hidden: int, avg_num_neighbors: float):
        super().__init__()
        self.num_tensor = num_tensor
        self.l_max = l_max
        self.inv_sqrt_neighbors = avg_num_neighbors**-0.5
        self.irreps_tensor = o3.Irreps([(num_tensor, (l, (-1) ** l)) for l in range(l_max + 1)])

        self.env_weights = nn.Linear(num_scalar, num_tensor * (l_max + 1))
        # Channel-wise ('uuu') products V_ij (x) env_i, keeping l <= l_max of SH parity.
        irreps_out, instructions = [], []
        for i1, (_, ir1) in enumerate(self.irreps_tensor):
            for i2, (_, ir2) in enumerate(self.irreps_tensor):
                for ir_out in ir1 * ir2:
                    if ir_out.l <= l_max and ir_out.p == (-1) ** ir_out.l:
                        instructions.append((i1, i2, len(irreps_out), "uuu", False))
                        irreps_out.append((num_tensor, ir_out))
        irreps_out = o3.Irreps(irreps_out)
        self.tp = o3.TensorProduct(self.irreps_tensor, self.irreps_tensor, irreps_out, instructions)
        scalar_slices = [s for (mul, ir), s in zip(irreps_out, irreps_out.slices()) if ir.l == 0]
        self.register_buffer("scalar_index", torch.cat([torch.arange(s.start, s.stop) for s in scalar_slices]))
        self.latent_mlp = mlp([num_scalar + len(self.scalar_index), mlp_hidden, num_scalar])
        self.tensor_linear = o3.Linear(irreps_out, self.irreps_tensor)

    def forward(
        self,
        x: torch.Tensor,  # (E, num_scalar) scalar track
        v: torch.Tensor,  # (E, irreps_tensor) equivariant track
        sh_blocks: List[torch.Tensor],  # [(E, 2l+1)] edge harmonics
        cutoff: torch.Tensor,  # (E, 1) envelope
        edge_center: torch.Tensor,  # (E,)
        num_nodes: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        w = (self.env_weights(x) * cutoff).view(-1, self.num_tensor, self.l_max + 1)
        env = scatter_sum(weighted_harmonics(w, sh_blocks), edge_center, num_nodes) * self.inv_sqrt_neighbors
        product = self.tp(v, env[edge_center])  # (E, irreps_out)
        scalars = product.index_select(1, self.scalar_index)
        x = x + self.latent_mlp(torch.cat([x, scalars], dim=1)) * cutoff
        v = self.tensor_linear(product)
        return x, v


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
        self.irreps_sh = o3.Irreps.spherical_harmonics(l_max)
        self.spherical_harmonics = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.basis = BesselBasis(r_max, num_basis)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.two_body = mlp([2 * num_types + num_basis, mlp_hidden, num_scalar])
        self.initial_weights = nn.Linear(num_scalar, num_tensor * (l_max + 1))
        self.layers = nn.ModuleList(
            [AllegroLayer(num_scalar, num_tensor, l_max, mlp_hidden, avg_num_neighbors) for _ in range(num_layers)]
        )
        self.readout = mlp([num_scalar, readout_hidden, 1])
        irreps_tensor = self.layers[0].irreps_tensor
        self.vector_readout: Optional[o3.Linear] = o3.Linear(irreps_tensor, "1x1o") if vector_output else None

    def forward(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        num_nodes = atom_types.shape[0]
        center, neighbor = edge_index[0], edge_index[1]
        lengths = torch.linalg.norm(edge_vectors, dim=-1)
        cutoff = self.cutoff(lengths).unsqueeze(-1)  # (E, 1)
        sh = self.spherical_harmonics(edge_vectors)  # (E, sum 2l+1)
        sh_blocks = [sh[:, l * l : (l + 1) * (l + 1)] for l in range(self.l_max + 1)]

        species = torch.nn.functional.one_hot(atom_types, self.num_types).to(edge_vectors.dtype)
        pair = torch.cat([species[center], species[neighbor], self.basis(lengths) * cutoff], dim=1)
        x = self.two_body(pair) * cutoff  # (E, num_scalar)
        w = self.initial_weights(x).view(-1, self.num_tensor, self.l_max + 1)
        v = weighted_harmonics(w, sh_blocks)  # (E, irreps_tensor)
        for layer in self.layers:
            x, v = layer(x, v, sh_blocks, cutoff, center, num_nodes)

        pair_energies = self.readout(x) * cutoff  # (E, 1)
        energies = scatter_sum(pair_energies, center, num_nodes).squeeze(-1)
        vectors: Optional[torch.Tensor] = None
        vector_readout = self.vector_readout
        if vector_readout is not None:
            pair_vectors = vector_readout(v) * cutoff  # e3nn >= 0.6 orders l=1 as (x, y, z)
            vectors = scatter_sum(pair_vectors, center, num_nodes)
        return energies, vectors
