"""NequIP-style message passing (Batzner et al., Nat. Commun. 13, 2453 (2022)).

Per-atom energies from edge vectors. Each interaction layer sends messages
m_ij = TP(h_j, Y(r_ij); w(|r_ij|)) from neighbor j to center i, sums them, mixes them with a
species-dependent self-connection, applies a gated nonlinearity and adds a residual. After L
layers an atom's energy depends on atoms up to L * r_max away (``message_passing_layers``).

With ``correlation`` nu > 1 each layer also feeds the gate with channel-wise products of an atom's
summed messages (its neighbor density A) with itself, A x A, ..., up to nu factors: MACE's
higher-body-order node update (Batatia et al., NeurIPS 2022; there with species-dependent weights,
a symmetric contraction and no gate). The products are per atom, not per edge (their cost grows
with the number of irreps, not of neighbors: keep l_max small, or parity off), and they leave the
receptive field unchanged. Why: body order per layer buys data efficiency (MACE with invariant
messages, L=0, reaches 14.6 meV/Å on 3BPA; NequIP needs l_max 3 and 5 layers for 10.8). Measured
here on 3BPA with equal settings and cost per epoch: validation force RMSE 42 meV/Å after 30 epochs
with correlation 3 (2 layers) against 68 without (3 layers); see benchmarks/README.md, "Runs not shipped".

Each layer builds only the irreps from which a path leads to what the readouts read
(``irreps_reaching``): with both parities and 3 layers of l_max 2, the middle layer makes no 1e or 2o,
which the last layer (Y of 0e, 1o, 2e) could not turn into a scalar: 21 % fewer weights, forces
~15 % faster (3BPA, one thread, eager).

Equivariant features are lists of blocks (2l+1, N, channels) (see mlip.nn.irreps).
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn import BesselBasis, PolynomialCutoff, mlp, scatter_sum
from ..nn.harmonics import SphericalHarmonics
from ..nn.irreps import Irrep, IrrepsLinear, TensorProduct, gather_rows, scatter_rows, split_blocks


def hidden_irreps(l_max: int, parity: bool) -> List[Irrep]:
    """Every l <= l_max (both parities if ``parity``), scalars first."""
    return [(l, p) for l in range(l_max + 1) for p in ((1, -1) if parity else ((-1) ** l,))]


def irreps_reaching(candidates: List[Irrep], keep: List[Irrep], l_max: int, correlation: int) -> List[Irrep]:
    """The irreps among ``candidates`` that a layer keeping ``keep`` can use as input: those with a
    convolution path into a kept irrep or the 0e gates (Y has the irreps (l, (-1)^l), l <= l_max), or
    with a self-connection (same irrep). With density products every input is used: A x A couples
    any irreps to a scalar. E.g. with l_max 2 and both parities, the input of a last layer keeping only
    0e needs 0e, 1o and 2e: from 1e or 2o, no path to 0e exists, so the layer before need not make them."""
    if correlation > 1:
        return list(candidates)
    targets = list(keep) + [(0, 1)]
    return [ir for ir in candidates if ir in targets or any(out in targets for out in couplings(ir, l_max))]


def couplings(irrep: Irrep, l_max: int) -> List[Irrep]:
    """The irreps in irrep x Y_l for l <= l_max (Y_l has parity (-1)^l)."""
    l1, p1 = irrep
    return [(l3, p1 * (-1) ** l2) for l2 in range(l_max + 1) for l3 in range(abs(l1 - l2), l1 + l2 + 1)]


class SpeciesLinear(nn.Module):
    """Self-connection: a linear map per species of the center atom (e3nn's FCTP with one-hot types).

    Output block ``targets[k]`` gets a contribution from the input block of the same irrep;
    output blocks whose irrep the input lacks get none.
    """

    def __init__(self, irreps_in: List[Irrep], channels_in: List[int], irreps_out: List[Irrep],
                 channels_out: List[int], num_types: int):
        super().__init__()
        self.num_types = num_types
        self.targets: List[int] = []
        self.sources: List[int] = []
        self.channels_out: List[int] = []
        weights = []
        for target, (irrep, mul_out) in enumerate(zip(irreps_out, channels_out)):
            if irrep in irreps_in:
                source = irreps_in.index(irrep)
                self.targets.append(target)
                self.sources.append(source)
                self.channels_out.append(mul_out)
                mul_in = channels_in[source]
                weights.append(nn.Parameter(torch.randn(mul_in, num_types * mul_out) / math.sqrt(mul_in)))
        self.weights = nn.ParameterList(weights)

    def forward(self, blocks: List[torch.Tensor], species: torch.Tensor) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for k, weight in enumerate(self.weights):
            x = blocks[self.sources[k]]  # (d, N, c_in)
            y = torch.matmul(x, weight).view(x.shape[0], x.shape[1], self.num_types, self.channels_out[k])
            out.append((y * species.view(1, -1, self.num_types, 1)).sum(dim=2))  # (d, N, c_out)
        return out


class DensityProduct(nn.Module):
    """One more factor of an atom's neighbor density A: mix(B) x A, channel by channel ('uuu')."""

    def __init__(self, irreps_left: List[Irrep], channels_left: List[int], irreps_density: List[Irrep],
                 irreps_allowed: List[Irrep], channels: int):
        super().__init__()
        self.mix = IrrepsLinear(irreps_left, channels_left, irreps_left, [channels] * len(irreps_left))
        self.tp = TensorProduct(irreps_left, irreps_density, irreps_allowed)

    def forward(self, left: List[torch.Tensor], density: List[torch.Tensor]) -> List[torch.Tensor]:
        return self.tp(self.mix(left), density)  # [(2l+1, N, c * paths)]


class Interaction(nn.Module):
    """One NequIP layer: convolution, (optional) density products, self-connection, gate, residual."""

    residual_sources: List[int]  # declared here: TorchScript cannot type an empty list from its value

    def __init__(
        self,
        irreps_in: List[Irrep],
        channels_in: List[int],
        irreps_hidden: List[Irrep],
        num_features: int,
        l_max: int,
        num_types: int,
        num_basis: int,
        radial_hidden: int,
        radial_layers: int,
        avg_num_neighbors: float,
        correlation: int,
        keep: List[Irrep],
        residual: Optional[bool] = None,
    ):
        """correlation: number of density factors in the node update (1: plain NequIP).
        keep: irreps of the output that are used afterwards. The last layer keeps only what the
        readouts read, the layers before only what reaches that (``irreps_reaching``), so no work is
        spent on blocks that cannot reach the energy.
        residual: add each input block to the output block of its irrep (None: if input and output
        irreps are the same)."""
        super().__init__()
        if correlation < 1:
            raise ValueError(f"correlation (number of density factors) must be >= 1, got {correlation}")
        self.inv_sqrt_neighbors = avg_num_neighbors**-0.5
        irreps_all = irreps_hidden
        irreps_hidden = [ir for ir in irreps_hidden if ir in keep]
        self.num_features = num_features
        irreps_sh = [(l, (-1) ** l) for l in range(l_max + 1)]
        # With density products, a last layer's messages keep every irrep: A x A couples them to scalars.
        irreps_messages = (irreps_hidden if correlation == 1 else irreps_all) + [(0, 1)]
        self.tp = TensorProduct(irreps_in, irreps_sh, irreps_messages, right_scalar_is_one=True)
        if len(set(channels_in)) != 1:
            raise ValueError("all input blocks must have the same number of channels")
        self.channels_tp = channels_in[0]
        channels_mid = [self.channels_tp * n for n in self.tp.paths_per_out]
        # Products of the density A (the summed messages mixed to num_features channels per irrep):
        # A x A, (A x A) x A, ...; the gate's input mixes the messages and every product. Products
        # pass through every hidden irrep; only the last one is restricted to the kept irreps.
        irreps_density = self.tp.irreps_out
        irreps_mix, channels_mix = list(irreps_density), list(channels_mid)
        self.to_density: Optional[IrrepsLinear] = None
        products: List[DensityProduct] = []
        if correlation > 1:
            self.to_density = IrrepsLinear(irreps_density, channels_mid, irreps_density,
                                           [num_features] * len(irreps_density))
            irreps_left, channels_left = irreps_density, [num_features] * len(irreps_density)
            for k in range(correlation - 1):
                irreps_product = (irreps_all if k < correlation - 2 else irreps_hidden) + [(0, 1)]
                product = DensityProduct(irreps_left, channels_left, irreps_density, irreps_product, num_features)
                products.append(product)
                irreps_left = product.tp.irreps_out
                channels_left = [num_features * n for n in product.tp.paths_per_out]
                irreps_mix, channels_mix = irreps_mix + irreps_left, channels_mix + channels_left
        self.products = nn.ModuleList(products)
        # Only irreps the convolution (or a product) can produce (the first layer, fed scalars, makes no 0o/1e).
        reachable = [ir for ir in irreps_hidden if ir in irreps_mix]
        scalars = [ir for ir in reachable if ir[0] == 0]
        self.gated: List[Irrep] = [ir for ir in reachable if ir[0] > 0]
        self.num_scalars = len(scalars)
        self.num_gated = len(self.gated)
        # Gate input blocks: scalars, one 0e gate block, then the gated blocks.
        irreps_gate_in = scalars + ([(0, 1)] if self.gated else []) + self.gated
        channels_gate_in = [num_features] * len(scalars) + ([num_features * len(self.gated)] if self.gated else [])
        channels_gate_in += [num_features] * len(self.gated)
        self.irreps_out: List[Irrep] = scalars + self.gated
        self.channels_out: List[int] = [num_features] * len(self.irreps_out)
        self.odd_scalars: List[bool] = [ir[1] == -1 for ir in scalars]

        self.irreps_in: List[Irrep] = irreps_in
        self.linear_in = IrrepsLinear(irreps_in, channels_in, irreps_in, channels_in)
        # Only 'uvu' paths from blocks with num_features channels; weights per path and channel.
        # No biases: a zero radial input (an edge at or beyond r_max) must give a zero message, so
        # edges past the cutoff (e.g. kept in a neighbor list with a skin) contribute nothing.
        self.radial = mlp([num_basis] + [radial_hidden] * radial_layers + [self.tp.num_paths * self.channels_tp],
                          bias=False)
        self.linear_out = IrrepsLinear(irreps_mix, channels_mix, irreps_gate_in, channels_gate_in)
        self.self_connection = SpeciesLinear(irreps_in, channels_in, irreps_gate_in, channels_gate_in, num_types)
        if residual is None:
            residual = irreps_in == self.irreps_out
        # the input block added to each output block (empty: no residual)
        self.residual_sources = [irreps_in.index(ir) for ir in self.irreps_out] if residual else []

    def forward(
        self,
        features: List[torch.Tensor],  # [(2l+1, N, c)]
        species: torch.Tensor,  # (N, num_types) one-hot
        sh: List[torch.Tensor],  # [(2l+1, E, 1)]
        edge_radial: torch.Tensor,  # (E, num_basis) or (E/2, num_basis) for paired edges; cutoff included
        edge_index: torch.Tensor,  # (2, E)
    ) -> List[torch.Tensor]:
        center, neighbor = edge_index[0], edge_index[1]
        num_nodes = species.shape[0]
        h = self.linear_in(features)
        h_neighbor = [gather_rows(block, neighbor) for block in h]
        # (num_paths, E or E/2, c): one contiguous slab of radial weights per path
        weights = self.radial(edge_radial).view(-1, self.tp.num_paths, self.channels_tp).transpose(0, 1).contiguous()
        # Summed over neighbors path by path, then concatenated per atom rather than per edge: in the
        # force loss's double backward, every slice of a concatenation zero-fills the whole of it.
        messages = self.tp.forward_paths(h_neighbor, sh, weights)  # per irrep [(2l+1, E, c)] per path
        aggregated = [torch.cat([scatter_rows(m, center, num_nodes) for m in paths], dim=2) * self.inv_sqrt_neighbors
                      for paths in messages]  # [(2l+1, N, c * paths)]
        mix_in = aggregated
        to_density = self.to_density
        if to_density is not None:  # correlation > 1
            density = to_density(aggregated)  # [(2l+1, N, c)]
            product = density
            for step in self.products:
                product = step(product, density)
                mix_in = mix_in + product
        gate_in = self.linear_out(mix_in)
        self_connection = self.self_connection(features, species)
        for k, target in enumerate(self.self_connection.targets):
            gate_in[target] = gate_in[target] + self_connection[k]
        out = self.gate(gate_in)
        if len(self.residual_sources) > 0:
            out = [block + features[source] for block, source in zip(out, self.residual_sources)]
        return out

    def gate(self, blocks: List[torch.Tensor]) -> List[torch.Tensor]:
        """Even scalars SiLU, odd scalars tanh; each gated channel times sigmoid(its gate)."""
        out: List[torch.Tensor] = []
        for k in range(self.num_scalars):
            x = blocks[k]
            out.append(torch.tanh(x) if self.odd_scalars[k] else torch.nn.functional.silu(x))
        if self.num_gated > 0:
            gates = torch.sigmoid(blocks[self.num_scalars])  # (1, N, c * num_gated)
            for k in range(self.num_gated):
                gate = gates[:, :, k * self.num_features : (k + 1) * self.num_features]
                out.append(blocks[self.num_scalars + 1 + k] * gate)
        return out


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
        correlation: int = 1,
        num_basis: int = 8,
        cutoff_p: int = 6,
        radial_hidden: int = 64,
        radial_layers: int = 2,
        avg_num_neighbors: float = 1.0,
        vector_output: bool = False,
        prune: bool = True,
    ):
        """prune: build only the irreps that can reach the readouts (``irreps_reaching``). False keeps
        every hidden irrep in every layer but the last: the layout of models trained before
        2026-12-02, built only to read their weights (``weights_for_pruned``)."""
        super().__init__()
        # The arguments, to rebuild this architecture unpruned (a plain attribute: TorchScript skips it).
        self.unpruned_arguments = dict(
            num_types=num_types, r_max=r_max, l_max=l_max, parity=parity, num_features=num_features,
            num_layers=num_layers, correlation=correlation, num_basis=num_basis, cutoff_p=cutoff_p,
            radial_hidden=radial_hidden, radial_layers=radial_layers, avg_num_neighbors=avg_num_neighbors,
            vector_output=vector_output, prune=False)
        self.num_types = num_types
        self.l_max = l_max
        self.spherical_harmonics = SphericalHarmonics(l_max)
        self.basis = BesselBasis(r_max, num_basis)
        self.cutoff = PolynomialCutoff(r_max, cutoff_p)
        self.embedding = nn.Linear(num_types, num_features, bias=False)

        # What each layer keeps, from the last one (what the readouts read) back to the first.
        hidden = hidden_irreps(l_max, parity)
        keeps = [[(0, 1)] + ([(1, -1)] if vector_output else [])]
        for _ in range(num_layers - 1):
            keeps.insert(0, irreps_reaching(hidden, keeps[0], l_max, correlation) if prune else hidden)
        # Residuals where the unpruned layout has them, so pruning leaves the model's function as it
        # was: there a layer makes the hidden irreps its convolution reaches (the last one only those
        # it keeps). Density products prune nothing: each layer then decides on its own irreps.
        irreps, channels = [(0, 1)], [num_features]
        unpruned_in = irreps
        layers: List[Interaction] = []
        for k, keep in enumerate(keeps):
            residual: Optional[bool] = None
            if correlation == 1:
                unpruned_out = [ir for ir in hidden if any(ir in couplings(source, l_max) for source in unpruned_in)
                                and (k < num_layers - 1 or ir in keep)]
                residual, unpruned_in = unpruned_in == unpruned_out, unpruned_out
            layer = Interaction(irreps, channels, hidden, num_features, l_max, num_types, num_basis, radial_hidden,
                                radial_layers, avg_num_neighbors, correlation, keep, residual)
            layers.append(layer)
            irreps, channels = layer.irreps_out, layer.channels_out
        self.layers = nn.ModuleList(layers)
        self.num_invariant_features = num_features
        self.readout = nn.Linear(num_features, 1, bias=False)  # on the 0e block
        self.vector_index = irreps.index((1, -1)) if (1, -1) in irreps else -1
        self.vector_readout: Optional[nn.Linear] = (
            nn.Linear(num_features, 1, bias=False) if vector_output and self.vector_index >= 0 else None
        )
        if vector_output and self.vector_readout is None:
            raise ValueError("a direct-force head needs l_max >= 1")

    def forward(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor, paired: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """paired: edge k + E/2 is the reverse of edge k. The radial weights depend on the pair
        distance only, so they are computed for the first half and shared by each pair: the radial
        MLPs are most of the cost (~65 % at 4000 atoms), and this halves them exactly."""
        features = self.node_features(edge_vectors, atom_types, edge_index, paired)
        energies = self.readout(features[0]).view(-1)
        vectors: Optional[torch.Tensor] = None
        vector_readout = self.vector_readout
        if vector_readout is not None:
            vectors = vector_readout(features[self.vector_index]).squeeze(-1).t()  # (N, 3): 1o block is (x, y, z)
        return energies, vectors

    def invariant_features(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor, paired: bool = False
    ) -> torch.Tensor:
        """(N, num_features): the last layer's 0e block, what the energy readout reads."""
        return self.node_features(edge_vectors, atom_types, edge_index, paired)[0].squeeze(0)

    def node_features(
        self, edge_vectors: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor, paired: bool = False
    ) -> List[torch.Tensor]:
        """The last layer's blocks [(2l+1, N, num_features)], 0e first."""
        sh = split_blocks(self.spherical_harmonics(edge_vectors), self.l_max)
        if paired:
            if edge_vectors.shape[0] % 2 != 0:
                raise ValueError("paired edges need an even number of edges")
            edge_vectors = edge_vectors[: edge_vectors.shape[0] // 2]
        lengths = torch.linalg.norm(edge_vectors, dim=-1)
        edge_radial = self.basis(lengths) * self.cutoff(lengths).unsqueeze(-1)  # (E or E/2, num_basis)
        species = torch.nn.functional.one_hot(atom_types, self.num_types).to(edge_vectors.dtype)
        features = [self.embedding(species).unsqueeze(0)]  # [(1, N, c)]
        for layer in self.layers:
            features = layer(features, species, sh, edge_radial, edge_index)
        return features


def weights_for_pruned(model: NequIP, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``weights`` of ``model``'s architecture built unpruned (the layout before 2026-12-02), mapped
    onto ``model``: the blocks and paths it lacks have no route to the energy, so the energies stay
    the same. Weights that fit ``model`` or do not fit the unpruned layout come back unchanged."""
    if _fits(model, weights):
        return weights
    with torch.random.fork_rng(devices=[]):  # its initial weights are never used: leave the global RNG alone
        unpruned = NequIP(**model.unpruned_arguments)
    if not _fits(unpruned, weights):
        return weights
    mapped = dict(weights)
    for k, (new, old) in enumerate(zip(model.layers, unpruned.layers)):
        prefix = f"layers.{k}."
        # linear_in: one block per input irrep
        for j, irrep in enumerate(new.irreps_in):
            mapped[f"{prefix}linear_in.weights.{j}"] = weights[f"{prefix}linear_in.weights.{old.irreps_in.index(irrep)}"]
        # the radial MLP's last layer: num_features rows per path
        last = f"{prefix}radial.{len(new.radial) - 1}.weight"
        old_paths = [_path_key(old, path) for path in old.tp.paths]
        rows = [weights[last][c * old.channels_tp : (c + 1) * old.channels_tp]
                for c in (old_paths.index(_path_key(new, path)) for path in new.tp.paths)]
        mapped[last] = torch.cat(rows)
        # linear_out and the self-connection: one weight per gate input block; the 0e gate block
        # has num_features columns per gated irrep
        new_labels, old_labels = _gate_input_labels(new), _gate_input_labels(old)
        gated = [old.gated.index(irrep) for irrep in new.gated]
        for j, label in enumerate(new_labels):
            weight = weights[f"{prefix}linear_out.weights.{old_labels.index(label)}"]
            mapped[f"{prefix}linear_out.weights.{j}"] = _gate_columns(weight, 1, gated, new) if label == "gates" else weight
        old_targets = [old_labels[t] for t in old.self_connection.targets]
        for j, target in enumerate(new.self_connection.targets):
            label = new_labels[target]
            weight = weights[f"{prefix}self_connection.weights.{old_targets.index(label)}"]
            mapped[f"{prefix}self_connection.weights.{j}"] = (
                _gate_columns(weight, new.self_connection.num_types, gated, new) if label == "gates" else weight)
    return {name: mapped[name] for name in model.state_dict()}


def _fits(model: nn.Module, weights: Dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(weights) and all(own[name].shape == weights[name].shape for name in own)


def _path_key(layer: Interaction, path: List[int]) -> Tuple[Irrep, int, Irrep]:
    """A convolution path by what it couples: input irrep, harmonic l, output irrep."""
    return layer.irreps_in[path[0]], path[1], layer.tp.irreps_out[path[5]]


def _gate_input_labels(layer: Interaction) -> List[object]:
    """The gate input blocks of a layer by meaning: scalar irreps, "gates", gated irreps."""
    scalars = layer.irreps_out[: layer.num_scalars]
    return list(scalars) + (["gates"] if layer.gated else []) + [("gated",) + irrep for irrep in layer.gated]


def _gate_columns(weight: torch.Tensor, num_types: int, gated: List[int], layer: Interaction) -> torch.Tensor:
    """The columns of the gates of the ``gated`` irreps (old positions) in a weight whose columns
    are (type, gated irrep, channel)."""
    blocks = weight.view(weight.shape[0], num_types, -1, layer.num_features)
    return blocks[:, :, gated, :].reshape(weight.shape[0], -1)
