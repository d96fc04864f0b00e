"""NequIP-style message passing (Batzner et al., Nat. Commun. 13, 2453 (2022)).

Per-atom energies from edge vectors. Each interaction layer sends messages
m_ij = TP(h_j, Y(r_ij); w(|r_ij|)) from neighbor j to center i, sums them, mixes them with a
species-dependent self-connection, applies a gated nonlinearity and adds a residual. After L
layers an atom's energy depends on atoms up to L * r_max away (``message_passing_layers``).
"""

from typing import List, Optional, Tuple

import torch
from e3nn import o3
from torch import nn

from ..nn import BesselBasis, Gate, PolynomialCutoff, mlp, scatter_sum


def hidden_irreps(num_features: int, l_max: int, parity: bool) -> o3.Irreps:
    """num_features channels of every l <= l_max (both parities if ``parity``), scalars first."""
    irreps = []
    for l in range(l_max + 1):
        for p in (1, -1) if parity else ((-1) ** l,):
            irreps.append((num_features, (l, p)))
    return o3.Irreps(irreps).sort().irreps.simplify()


class Interaction(nn.Module):
    """One NequIP layer: convolution, self-connection, gate, residual."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_types: int,
        num_basis: int,
        radial_hidden: int,
        radial_layers: int,
        avg_num_neighbors: float,
    ):
        super().__init__()
        self.inv_sqrt_neighbors = avg_num_neighbors**-0.5

        self.gate = Gate(irreps_out)
        irreps_gate_in = self.gate.irreps_in

        self.linear_in = o3.Linear(irreps_in, irreps_in)
        # 'uvu' paths: every (feature l1, harmonic l2) -> l_out present in the gate input.
        irreps_mid, instructions = [], []
        for i1, (mul, ir1) in enumerate(irreps_in):
            for i2, (_, ir2) in enumerate(irreps_sh):
                for ir_out in ir1 * ir2:
                    if ir_out in irreps_gate_in:
                        instructions.append((i1, i2, len(irreps_mid), "uvu", True))
                        irreps_mid.append((mul, ir_out))
        irreps_mid = o3.Irreps(irreps_mid)
        irreps_mid_sorted, permutation, _ = irreps_mid.sort()
        instructions = [(i1, i2, permutation[i_out], mode, w) for i1, i2, i_out, mode, w in instructions]
        self.tp = o3.TensorProduct(
            irreps_in, irreps_sh, irreps_mid_sorted, instructions, shared_weights=False, internal_weights=False
        )
        # No biases: zero radial input (an edge at or beyond r_max) must give a zero message, so
        # edges past the cutoff (e.g. kept in a neighbor list with a skin) contribute nothing.
        self.radial = mlp([num_basis] + [radial_hidden] * radial_layers + [self.tp.weight_numel], bias=False)
        self.linear_out = o3.Linear(irreps_mid_sorted, irreps_gate_in)
        self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, f"{num_types}x0e", irreps_gate_in)
        self.residual = irreps_in == irreps_out

    def forward(
        self,
        features: torch.Tensor,  # (N, irreps_in)
        species: torch.Tensor,  # (N, num_types) one-hot
        edge_sh: torch.Tensor,  # (E, irreps_sh)
        edge_radial: torch.Tensor,  # (E, num_basis), cutoff envelope included
        edge_index: torch.Tensor,  # (2, E)
    ) -> torch.Tensor:
        center, neighbor = edge_index[0], edge_index[1]
        h = self.linear_in(features)
        messages = self.tp(h[neighbor], edge_sh, self.radial(edge_radial))  # (E, irreps_mid)
        aggregated = scatter_sum(messages, center, features.shape[0]) * self.inv_sqrt_neighbors
        out = self.gate(self.linear_out(aggregated) + self.self_connection(features, species))
        return features + out if self.residual else out


class NequIP(nn.Module):
    """Edge vectors -> per-atom raw energies (N,) and an optional per-atom vector (N, 3)."""

    def __init__(
        self,
        num_types: int,
        r_max: float,
        l_max: int = 1,
        parity: bool = True,
        num_features: int = 32,
        num_layers: int = 2,
        num_basis: int = 8,
        cutoff_p: int = 6,
        radial_hidden: int = 64,
        radial_layers: int = 2,
        avg_num_neighbors: float = 1.0,
        vector_output: bool = False,
    ):
        super().__init__()
        self.num_types = num_types
        self.irreps_sh = o3.Irreps.spherical_harmonics(l_max, p=-1 if parity else 1)
        self.spherical_harmonics = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.basis = BesselBasis(r_max, num_basis)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)

        irreps_scalars = o3.Irreps(f"{num_features}x0e")
        self.embedding = o3.Linear(f"{num_types}x0e", irreps_scalars)
        irreps_hidden = hidden_irreps(num_features, l_max, parity)
        layers: List[Interaction] = []
        irreps = irreps_scalars
        for _ in range(num_layers):
            layers.append(
                Interaction(
                    irreps, irreps_hidden, self.irreps_sh, num_types, num_basis, radial_hidden, radial_layers,
                    avg_num_neighbors,
                )
            )
            irreps = layers[-1].gate.irreps_out
        self.layers = nn.ModuleList(layers)
        self.readout = o3.Linear(irreps, "1x0e")
        self.vector_readout: Optional[o3.Linear] = o3.Linear(irreps, "1x1o") if vector_output else None

    def forward(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        lengths = torch.linalg.norm(edge_vectors, dim=-1)
        edge_sh = self.spherical_harmonics(edge_vectors)
        edge_radial = self.basis(lengths) * self.cutoff(lengths).unsqueeze(-1)
        species = torch.nn.functional.one_hot(atom_types, self.num_types).to(edge_vectors.dtype)
        features = self.embedding(species)
        for layer in self.layers:
            features = layer(features, species, edge_sh, edge_radial, edge_index)
        energies = self.readout(features).squeeze(-1)
        vectors: Optional[torch.Tensor] = None
        vector_readout = self.vector_readout
        if vector_readout is not None:
            vectors = vector_readout(features)  # e3nn >= 0.6 orders l=1 as (x, y, z)
        return energies, vectors
