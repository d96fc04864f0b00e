"""Radial functions of edge lengths: Bessel basis and a smooth polynomial cutoff envelope."""

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/r_max) sin(n pi r / r_max) / r, n = 1..num_basis (DimeNet, NequIP); trainable frequencies."""

    def __init__(self, r_max: float, num_basis: int = 8, trainable: bool = True):
        super().__init__()
        self.r_max = float(r_max)
        self.prefactor = math.sqrt(2.0 / r_max)
        frequencies = torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi
        self.frequencies = nn.Parameter(frequencies, requires_grad=trainable)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # (E,) Å -> (E, num_basis)
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies * r / self.r_max) / r


class PolynomialCutoff(nn.Module):
    """Envelope that goes to zero at r_max with p continuous derivatives' worth of smoothness.

    f(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2), x = r / r_max; 0 beyond r_max.
    Energies built from it are continuous with continuous forces as a neighbor crosses r_max.
    """

    def __init__(self, r_max: float, p: int = 6):
        super().__init__()
        self.r_max = float(r_max)
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # (E,) -> (E,)
        x = r / self.r_max
        p = self.p
        envelope = (
            1.0
            - (p + 1.0) * (p + 2.0) / 2.0 * torch.pow(x, p)
            + p * (p + 2.0) * torch.pow(x, p + 1.0)
            - p * (p + 1.0) / 2.0 * torch.pow(x, p + 2.0)
        )
        return envelope * (x < 1.0).to(r.dtype)
