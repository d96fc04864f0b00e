"""Real spherical harmonics of edge directions, in e3nn's basis and normalization, components first.

Y_0 = 1, Y_1 = sqrt(3) r̂ (x, y, z), and Y_{l+1} = Clebsch-Gordan(1, l -> l+1) contraction of
Y_1 (x) Y_l, scaled once per l to e3nn's ``SphericalHarmonics(normalize=True,
normalization="component")`` (by Schur's lemma the recursion gives e3nn's polynomials up to that
factor; the factor is measured against e3nn when the module is built and tested for l <= 6).

Why not e3nn's module: its TorchScript code holds explicit polynomials for every l up to 11
(100 kB of source); loading a deployed file compiled it into ~190 MB of resident memory per
process (measured: a model file's load went from 412 MB to 222 MB RSS) for the l <= 3 in use.
"""

from typing import Final, List

import torch
from e3nn import o3
from torch import nn

from .irreps import clebsch_gordan, device_of


class SphericalHarmonics(nn.Module):
    """(E, 3) edge vectors -> ((l_max+1)^2, E, 1): blocks of 2l+1 components, l = 0..l_max."""

    tables: List[torch.Tensor]  # declared: TorchScript cannot infer the type of an empty list
    # A constant of the scripted type: modules with different l_max get separate compiled graphs
    # (with a plain int, the profiling executor reused l_max=0's graph, which ignores the input's
    # requires_grad, for a later l_max=1 module).
    l_max: Final[int]

    def __init__(self, l_max: int):
        super().__init__()
        self.l_max = l_max
        # Recursion tables (3 * (2l+1), 2l+3) in float64, kept outside the buffers (like the
        # tensor product's table) so checkpoints have no extra keys and float32 models still
        # get exact coefficients; cast to the input's dtype when used.
        tables: List[torch.Tensor] = []
        probe = torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64)
        reference = o3.spherical_harmonics(list(range(l_max + 1)), probe, normalize=True, normalization="component")
        y = [torch.ones(1, 1, dtype=torch.float64), (3.0**0.5) * (probe / probe.norm()).t()]
        for l in range(1, l_max):
            table = clebsch_gordan(1, l, l + 1).reshape(3 * (2 * l + 1), 2 * l + 3)
            raw = table.t() @ (y[1].unsqueeze(1) * y[l].unsqueeze(0)).reshape(-1, 1)  # (2l+3, 1)
            want = reference[0, (l + 1) ** 2 : (l + 2) ** 2].view(-1, 1)
            scale = float((want * raw).sum() / (raw * raw).sum())
            tables.append(table.t().contiguous() * scale)  # (2l+3, 3 (2l+1))
            y.append(tables[-1] @ (y[1].unsqueeze(1) * y[l].unsqueeze(0)).reshape(-1, 1))
            if not torch.allclose(y[-1], want, atol=1e-10):
                raise RuntimeError(f"harmonics recursion does not reproduce e3nn's basis at l={l + 1}")
        self.tables: List[torch.Tensor] = tables

    def _apply(self, fn, *args, **kwargs):
        # The tables follow the module's device, not its dtype (see above).
        self.tables = [table.to(device_of(fn)) for table in self.tables]
        return super()._apply(fn, *args, **kwargs)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        unit = vectors / torch.linalg.norm(vectors, dim=-1, keepdim=True)
        blocks = [torch.ones_like(unit[:, :1]).t()]  # (1, E)
        if self.l_max >= 1:
            blocks.append((3.0**0.5) * unit.t())  # (3, E): x, y, z
        for l in range(1, self.l_max):
            table = self.tables[l - 1].to(device=vectors.device, dtype=vectors.dtype)
            outer = (blocks[1].unsqueeze(1) * blocks[l].unsqueeze(0)).reshape(3 * (2 * l + 1), -1)
            blocks.append(torch.matmul(table, outer))  # (2l+3, E)
        return torch.cat(blocks, dim=0).unsqueeze(-1)
