"""The training loss: weighted mean squared errors of energy per atom, forces and stress."""

from typing import Dict, Optional, Tuple

import torch

from ..data import keys
from .config import LossConfig

TERMS = ("energy_per_atom", "forces", "stress")


def squared_errors(
    prediction: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], weights: LossConfig
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per loss term with a positive weight and labels in the batch: (sum of squared errors, number
    of labelled values), both 0-d tensors on the batch's device, the sum in the prediction's dtype.

    Sums and counts, not means, so that data-parallel training can divide by the counts of the
    whole global batch (mlip.train.distributed). Energy enters per atom so that large and small
    cells weigh alike and the error is comparable to the force error.
    """
    terms = {}
    if weights.energy_per_atom > 0 and keys.ENERGY in batch:
        num_atoms = batch[keys.NUM_ATOMS].to(torch.float64)
        error = (prediction[keys.ENERGY] - batch[keys.ENERGY]) / num_atoms
        terms["energy_per_atom"] = (error.square().sum(), _count(error.numel(), error))
    if weights.forces > 0 and keys.FORCES in batch:
        error = prediction[keys.FORCES] - batch[keys.FORCES]
        terms["forces"] = (error.square().sum(), _count(error.numel(), error))
    if weights.stress > 0 and keys.STRESS in batch and keys.STRESS in prediction:
        # A mask, not a selection: selecting rows would need the mask's values on the host
        # (a device synchronisation per step on a GPU). The zeros add nothing to the sum.
        has = batch[keys.HAS_STRESS]
        error = (prediction[keys.STRESS] - batch[keys.STRESS]) * has[:, None, None]
        terms["stress"] = (error.square().sum(), 9 * has.sum().to(error.dtype))
    return terms


def weighted_loss(
    terms: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
    weights: LossConfig,
    counts: Optional[Dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """sum_t weight_t * squared_error_sum_t / count_t, float64. ``counts``: the denominators (the
    global batch's counts in data-parallel training); default the batch's own. A term with no
    labelled value counts zero. The division is in the errors' dtype, then cast: for one process
    this is bit for bit the per-term ``mean()`` mlip has always used."""
    device = next(iter(terms.values()))[0].device if terms else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    for name in TERMS:
        if name in terms:
            squared, count = terms[name]
            if counts is not None:
                count = counts[name]
            mean = squared / count.to(squared.dtype).clamp(min=1)
            total = total + getattr(weights, name) * mean.to(torch.float64)
    return total


def loss_terms(
    prediction: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], weights: LossConfig
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total loss of one batch (a differentiable float64 scalar) and its parts (detached mean
    squared errors, 0-d tensors: reading them is left to the caller, once per log interval).
    Terms whose labels a batch lacks are left out."""
    terms = squared_errors(prediction, batch, weights)
    parts = {name: (squared / count.to(squared.dtype).clamp(min=1)).detach().to(torch.float64)
             for name, (squared, count) in terms.items()}
    return weighted_loss(terms, weights), parts


def _count(n: int, like: torch.Tensor) -> torch.Tensor:
    # torch.full launches a fill kernel; torch.tensor(n, device=...) would copy from the host and wait.
    return torch.full((), float(n), dtype=like.dtype, device=like.device)
