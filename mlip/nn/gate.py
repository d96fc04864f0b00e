"""Gated nonlinearity (Weiler et al. 2018) written to script without tracing.

Input layout [scalars | gates | gated]: even scalars pass SiLU, odd scalars tanh (odd functions
keep their parity), each channel of an l > 0 block is multiplied by sigmoid(its gate scalar).
"""

from typing import List

import torch
from e3nn import o3
from torch import nn


class Gate(nn.Module):
    def __init__(self, irreps_out: o3.Irreps):
        super().__init__()
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
        num_gates = gated.num_irreps
        self.irreps_in = scalars + o3.Irreps(f"{num_gates}x0e") + gated if num_gates else scalars
        self.irreps_out = scalars + gated
        self.num_scalars = scalars.dim
        self.num_gates = num_gates
        # Boolean mask over scalar channels: odd scalars take tanh.
        odd = torch.cat([torch.full((mul,), ir.p == -1) for mul, ir in scalars])
        self.register_buffer("odd_scalars", odd)
        self.blocks: List[List[int]] = [[mul, ir.dim] for mul, ir in gated]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, irreps_in) -> (N, irreps_out)
        scalars = x[:, : self.num_scalars]
        scalars = torch.where(self.odd_scalars, torch.tanh(scalars), torch.nn.functional.silu(scalars))
        gates = torch.sigmoid(x[:, self.num_scalars : self.num_scalars + self.num_gates])
        outputs = [scalars]
        start = self.num_scalars + self.num_gates
        gate_start = 0
        for block in self.blocks:
            mul, dim = block[0], block[1]
            values = x[:, start : start + mul * dim].reshape(-1, mul, dim)
            gate = gates[:, gate_start : gate_start + mul].unsqueeze(-1)
            outputs.append((values * gate).reshape(-1, mul * dim))
            start += mul * dim
            gate_start += mul
        return torch.cat(outputs, dim=1)
