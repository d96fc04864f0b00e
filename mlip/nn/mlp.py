"""Plain scalar MLPs (torch.nn.Linear is faster than e3nn's FullyConnectedNet for scalars)."""

from typing import Sequence

from torch import nn


def mlp(sizes: Sequence[int], activation_last: bool = False, bias: bool = True) -> nn.Sequential:
    """Linear layers of the given widths with SiLU between them."""
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if k < len(sizes) - 2 or activation_last:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)
