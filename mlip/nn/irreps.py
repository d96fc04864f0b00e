"""Equivariant features as lists of blocks, and the few operations the models need on them.

A feature is a list of tensors, one per irrep (l, p): block k has shape (2l+1, rows, channels)
(components first). Compared with e3nn's flat (rows, mul x (2l+1)) layout this lets every path
of a tensor product be a broadcast product, a dot or a cross product on whole contiguous slabs,
and every equivariant linear layer one matmul over channels. (Components first rather than
(rows, 2l+1, channels): slicing and broadcasting over the first dimension keeps every operand
contiguous, measured 2-4x faster per elementwise op here.) Clebsch-Gordan coefficients are e3nn's
(``o3.wigner_3j``), in e3nn's real basis (l=1 components ordered x, y, z), the basis of the
harmonics in mlip.nn.harmonics (identical to e3nn's SphericalHarmonics).

Why not e3nn's TensorProduct: profiled on this machine, its generated code spent most of a
force evaluation zero-filling per-path gradient slices and forming full outer products for
l=1 (x) l=1; these blocks avoid both.
"""

import math
from typing import List, Optional, Tuple

import torch
from e3nn import o3
from torch import nn

Irrep = Tuple[int, int]  # (l, parity +1/-1)

# How a path (l1, l2 -> l3) is computed; each kind is a special case of the Clebsch-Gordan contraction.
LEFT_SCALAR, RIGHT_SCALAR, DOT, CROSS, GENERAL = 0, 1, 2, 3, 4


def clebsch_gordan(l1: int, l2: int, l3: int) -> torch.Tensor:
    """(2l1+1, 2l2+1, 2l3+1), normalized so that unit-variance inputs give unit-variance outputs."""
    return o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)


def _path_kind(l1: int, l2: int, l3: int, cg: torch.Tensor) -> Tuple[int, float]:
    """The cheapest exact way to contract this path, and its constant factor."""
    d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
    candidates = []
    if l1 == 0:
        candidates.append((LEFT_SCALAR, torch.eye(d2, dtype=torch.float64).view(1, d2, d3)))
    if l2 == 0:
        candidates.append((RIGHT_SCALAR, torch.eye(d1, dtype=torch.float64).view(d1, 1, d3)))
    if l3 == 0 and l1 == l2:
        candidates.append((DOT, torch.eye(d1, dtype=torch.float64).view(d1, d2, 1)))
    if l1 == l2 == l3 == 1:
        levi_civita = torch.zeros(3, 3, 3, dtype=torch.float64)
        for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
            levi_civita[i, j, k], levi_civita[j, i, k] = 1.0, -1.0
        candidates.append((CROSS, levi_civita))
    for kind, pattern in candidates:
        factor = float((cg * pattern).sum() / (pattern * pattern).sum())
        if torch.allclose(cg, factor * pattern, atol=1e-10):
            return kind, factor
    return GENERAL, 1.0


class TensorProduct(nn.Module):
    """Channel-wise products of two block features, grouped by output irrep.

    left blocks (2l+1, rows, u); right blocks (2l+1, rows, u) or (2l+1, rows, 1) (broadcast over
    channels). With ``weights`` (num_paths, rows, u) every path is scaled per row and channel
    (NequIP's 'uvu' with radial weights); without, it is Allegro's 'uuu' product. Weights of
    (num_paths, rows/2, u) scale rows k and k + rows/2 alike (paired edges share radial weights).
    Output: one block per irrep of ``self.irreps_out``, shape (2l+1, rows, u * paths into it).

    right_scalar_is_one: the right operand's 0e block is the constant 1 (spherical harmonics,
    Y_0 = 1), so paths through it pass the left block on as it is: no multiply, and no gradient
    computed for a constant (that saves three edge-sized ops per such path in every backward).
    """

    def __init__(self, irreps_left: List[Irrep], irreps_right: List[Irrep], irreps_allowed: List[Irrep],
                 right_scalar_is_one: bool = False):
        super().__init__()
        self.right_scalar_is_one = right_scalar_is_one
        paths, irreps_out = [], []
        for i1, (l1, p1) in enumerate(irreps_left):
            for i2, (l2, p2) in enumerate(irreps_right):
                for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                    if (l3, p1 * p2) in irreps_allowed:
                        if (l3, p1 * p2) not in irreps_out:
                            irreps_out.append((l3, p1 * p2))
                        paths.append((i1, i2, l1, l2, l3, irreps_out.index((l3, p1 * p2))))
        order = sorted(range(len(irreps_out)), key=lambda k: irreps_allowed.index(irreps_out[k]))
        self.irreps_out: List[Irrep] = [irreps_out[k] for k in order]
        rank = {old: new for new, old in enumerate(order)}
        max_dim = 2 * max(l for path in paths for l in path[2:5]) + 1
        cg_table = torch.zeros(len(paths), max_dim, max_dim, max_dim, dtype=torch.float64)
        self.paths: List[List[int]] = []
        factors: List[float] = []
        for k, (i1, i2, l1, l2, l3, out) in enumerate(paths):
            cg = clebsch_gordan(l1, l2, l3)
            cg_table[k, : 2 * l1 + 1, : 2 * l2 + 1, : 2 * l3 + 1] = cg
            kind, factor = _path_kind(l1, l2, l3, cg)
            self.paths.append([i1, i2, 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1, rank[out], kind])
            factors.append(factor)
        self.factors: List[float] = factors
        self.num_paths = len(paths)
        self.num_out = len(self.irreps_out)
        self.paths_per_out: List[int] = [sum(1 for p in self.paths if p[5] == k) for k in range(self.num_out)]
        # Kept in float64 and outside the buffers, so that converting a float32-built model to
        # float64 does not carry float32-rounded coefficients (cast to the input dtype when used).
        # It follows the module's device (_apply): on a GPU nothing is copied from the host per call.
        self.cg_table = cg_table

    def _apply(self, fn, *args, **kwargs):
        self.cg_table = self.cg_table.to(device_of(fn))
        return super()._apply(fn, *args, **kwargs)

    def forward(
        self, left: List[torch.Tensor], right: List[torch.Tensor], weights: Optional[torch.Tensor] = None
    ) -> List[torch.Tensor]:
        grouped = self.forward_paths(left, right, weights)
        return [torch.cat(paths, dim=2) if len(paths) > 1 else paths[0] for paths in grouped]

    def forward_paths(
        self, left: List[torch.Tensor], right: List[torch.Tensor], weights: Optional[torch.Tensor] = None
    ) -> List[List[torch.Tensor]]:
        """``forward`` before concatenating: per output irrep, one (2l+1, rows, u) tensor per path."""
        grouped: List[List[torch.Tensor]] = [[] for _ in range(self.num_out)]
        # unbind, not weights[k]: the backward of one unbind is one stack, while each index would
        # zero-fill a gradient the size of all the weights (num_paths times per backward)
        path_weights: List[torch.Tensor] = weights.unbind(0) if weights is not None else []
        for k, path in enumerate(self.paths):
            a, b = left[path[0]], right[path[1]]
            d1, d2, d3, out, kind = path[2], path[3], path[4], path[5], path[6]
            factor = self.factors[k]
            # The product is linear in the left operand and the weights are per row and channel,
            # so they (and the constant factor) go on whichever of left operand and result has
            # fewer components: e.g. 0e x 1o -> 1o weights a (1, rows, c), not c (3, rows, c).
            scale: Optional[torch.Tensor] = None
            if weights is not None:
                scale = path_weights[k] * factor if factor != 1.0 else path_weights[k]
                factor = 1.0
            if scale is not None and d1 < d3:
                a = scale_rows(a, scale)
                scale = None
            # kinds (literals: TorchScript cannot read module globals): 0/1 scalar x block, 2 dot, 3 cross
            if d2 == 1 and self.right_scalar_is_one:  # a path through the right scalar: kind 0 or 1
                c = a
            elif kind == 0 or kind == 1:
                c = a * b
            elif kind == 2:
                c = (a * b).sum(dim=0, keepdim=True)
            elif kind == 3:
                c = torch.linalg.cross(a, b.expand_as(a), dim=0)
            elif b.shape[2] == 1 and a.shape[2] > 1:
                # Right operand shared by all channels (NequIP's harmonics): contract it with the
                # coefficients first, (d1, d3, rows, 1), then d1 broadcast products: d2 times less
                # work and memory than forming the channel-wide outer product.
                cg = self.cg_table[k, :d1, :d2, :d3].to(device=a.device, dtype=a.dtype)
                rows = b.shape[1]
                mixed = torch.matmul(cg.transpose(1, 2).reshape(d1 * d3, d2), b.view(d2, rows)).view(d1, d3, rows, 1)
                # unbind, not indexing: the backward of one unbind is one stack, while each index
                # would zero-fill a gradient the size of the whole operand
                mixed_rows, a_rows = mixed.unbind(0), a.unbind(0)
                c = mixed_rows[0] * a_rows[0]
                for i in range(1, d1):
                    c = c + mixed_rows[i] * a_rows[i]
            else:
                rows, channels = a.shape[1], max(a.shape[2], b.shape[2])
                outer = (a.unsqueeze(1) * b.unsqueeze(0)).reshape(d1 * d2, rows * channels)
                cg = self.cg_table[k, :d1, :d2, :d3].reshape(d1 * d2, d3).to(device=a.device, dtype=a.dtype)
                c = torch.matmul(cg.t(), outer).view(d3, rows, channels)
            if scale is not None:
                c = scale_rows(c, scale)
            grouped[out].append(c * factor if factor != 1.0 else c)
        return grouped


def device_of(fn) -> torch.device:
    """The device that nn.Module._apply's ``fn`` (from .to(), .cuda(), .cpu(), ...) moves tensors to.
    For constants kept outside the buffers: they follow the module's device, not its dtype."""
    return fn(torch.zeros(0, dtype=torch.float64)).device


def scale_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(d, rows, u) * (rows, u), or * (rows/2, u) applied to both halves of the rows (a broadcast:
    the shared weights are never copied)."""
    if scale.shape[0] == x.shape[1]:
        return x * scale
    if 2 * scale.shape[0] != x.shape[1]:
        raise ValueError(f"weights for {scale.shape[0]} rows do not fit {x.shape[1]} rows (or pairs of them)")
    return (x.reshape(x.shape[0], 2, scale.shape[0], x.shape[2]) * scale).view(x.shape)


class IrrepsLinear(nn.Module):
    """Equivariant linear map: each output block mixes the channels of all input blocks of its irrep.

    Output blocks may repeat an irrep (e.g. scalars and gates are both 0e): each gets its own weights.
    """

    def __init__(self, irreps_in: List[Irrep], channels_in: List[int], irreps_out: List[Irrep], channels_out: List[int]):
        super().__init__()
        self.sources: List[List[int]] = []
        weights = []
        for irrep, mul_out in zip(irreps_out, channels_out):
            sources = [k for k, ir in enumerate(irreps_in) if ir == irrep]
            if not sources:
                raise ValueError(f"no input block of irrep {irrep} for an output block")
            fan_in = sum(channels_in[k] for k in sources)
            self.sources.append(sources)
            weights.append(nn.Parameter(torch.randn(fan_in, mul_out) / math.sqrt(fan_in)))
        self.weights = nn.ParameterList(weights)

    def forward(self, blocks: List[torch.Tensor]) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for k, weight in enumerate(self.weights):
            sources = self.sources[k]
            x = blocks[sources[0]] if len(sources) == 1 else torch.cat([blocks[s] for s in sources], dim=2)
            out.append(torch.matmul(x, weight))
        return out


def split_blocks(x: torch.Tensor, l_max: int) -> List[torch.Tensor]:
    """((l_max+1)^2, rows, c) -> blocks (2l+1, rows, c); slices of the first dimension stay contiguous."""
    return list(torch.split(x, [2 * l + 1 for l in range(l_max + 1)], dim=0))


# Gathers and scatters of blocks run as one index_select / scatter_add_ over the rows of a flat
# (d * rows, c) view, not over dim 1 of the (d, rows, c) block: torch's CPU kernels take a much
# faster path on dim 0 of a 2-D tensor (measured here, 2 threads, 171 k edges -> 4000 atoms, a
# scatter of (1, E, 32) 26 -> 6 ms, of (3, E, 32) 39 -> 28 ms; the backward of index_select is
# such a scatter too).


def flat_rows(index: torch.Tensor, components: int, rows: int) -> torch.Tensor:
    """(E,) row index -> (components * E,) index into a (components * rows, c) view of a block."""
    if components == 1:
        return index
    offsets = torch.arange(components, dtype=index.dtype, device=index.device) * rows
    return (offsets.view(-1, 1) + index.view(1, -1)).view(-1)


def gather_rows(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(d, N, c) -> (d, E, c): out[:, e] = blocks[:, index[e]]."""
    d, c = blocks.shape[0], blocks.shape[2]
    flat = blocks.reshape(d * blocks.shape[1], c).index_select(0, flat_rows(index, d, blocks.shape[1]))
    return flat.view(d, index.shape[0], c)


def scatter_rows(blocks: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(d, E, c) -> (d, num_rows, c): out[:, index[e]] += blocks[:, e]."""
    d, c = blocks.shape[0], blocks.shape[2]
    out = torch.zeros((d * num_rows, c), dtype=blocks.dtype, device=blocks.device)
    # scatter_add_, not index_add_ (which runs the same kernel here): autograd saves only the
    # index for its backward, while index_add_ keeps the whole (d, E, c) source alive until then.
    rows = flat_rows(index, d, num_rows).view(-1, 1).expand(-1, c)
    out.scatter_add_(0, rows, blocks.reshape(d * blocks.shape[1], c))
    return out.view(d, num_rows, c)
