"""The training loss: weighted mean squared errors of energy per atom, forces and stress."""

from typing import Dict, Tuple

import torch

from ..data import keys
from .config import LossConfig


def loss_terms(
    prediction: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], weights: LossConfig
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss (a differentiable scalar) and its parts (floats, for the log).

    Energy enters per atom so that large and small cells weigh alike and the error is
    comparable to the force error. Terms whose labels a batch lacks are left out.
    """
    total = torch.zeros((), dtype=torch.float64, device=batch[keys.POSITIONS].device)
    parts: Dict[str, float] = {}
    if weights.energy_per_atom > 0 and keys.ENERGY in batch:
        num_atoms = batch[keys.NUM_ATOMS].to(torch.float64)
        error = (prediction[keys.ENERGY] - batch[keys.ENERGY]) / num_atoms
        term = error.square().mean()
        total = total + weights.energy_per_atom * term
        parts["energy_per_atom"] = float(term.detach())
    if weights.forces > 0 and keys.FORCES in batch:
        term = (prediction[keys.FORCES] - batch[keys.FORCES]).square().mean().to(torch.float64)
        total = total + weights.forces * term
        parts["forces"] = float(term.detach())
    if weights.stress > 0 and keys.STRESS in batch and keys.STRESS in prediction:
        has = batch[keys.HAS_STRESS]
        if bool(has.any()):
            term = (prediction[keys.STRESS][has] - batch[keys.STRESS][has]).square().mean().to(torch.float64)
            total = total + weights.stress * term
            parts["stress"] = float(term.detach())
    return total, parts
