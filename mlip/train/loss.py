"""The training loss: weighted mean squared errors of energy per atom, forces and stress.

Each term is the mean over the values that carry a label (masks ``keys.HAS_*``): a structure
without forces adds nothing to the force term and does not dilute it. ``loss_sums`` gives each
term before the division, as (sum of squared errors, number of labelled values), so that a
distributed run can add both over its ranks and divide once: the mean over the global batch.
"""

from typing import Dict, Optional, Tuple

import torch

from ..data import keys
from .config import LossConfig

# term -> (label key, mask key, values per masked entry)
TERMS = {
    "energy_per_atom": (keys.ENERGY, keys.HAS_ENERGY, 1),
    "forces": (keys.FORCES, keys.HAS_FORCES, 3),
    "stress": (keys.STRESS, keys.HAS_STRESS, 9),
    "property": (keys.PROPERTY, keys.HAS_PROPERTY, 1),
}


def loss_sums(
    prediction: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], weights: LossConfig
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """term -> (sum of squared errors (), number of labelled values () int64), for the terms with a
    positive weight whose label the batch carries (the count may be 0 when no structure has it).

    Units of the sums: eV^2/atom^2 (energy per atom), (eV/Å)^2, (eV/Å^3)^2. Energy sums are float64,
    force and stress sums in the model's dtype (so a fully labelled batch gives exactly the plain
    mean it always gave). Energy enters per atom so that large and small cells weigh alike.
    """
    sums = {}
    for term, (label, mask_key, width) in TERMS.items():
        if getattr(weights, term) <= 0 or label not in batch or label not in prediction:
            continue
        error = prediction[label] - batch[label]
        if term == "energy_per_atom":
            error = error / batch[keys.NUM_ATOMS].to(torch.float64)
        mask = batch[mask_key].view((-1,) + (1,) * (error.dim() - 1))
        # The property term may be an L1 loss: then this "squared" sum is the sum of absolute errors.
        squared = error.abs() if term == "property" and weights.property_loss == "l1" else error.square()
        # where, not indexing: no host sync, same shape, and a placeholder never reaches the sum
        squared = torch.where(mask, squared, torch.zeros((), dtype=error.dtype, device=error.device))
        sums[term] = (squared.sum(), batch[mask_key].sum() * width)
    return sums


def weighted_loss(
    sums: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
    weights: LossConfig,
    counts: Optional[Dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """sum_t weight_t * squared_error_sum_t / count_t (float64) of ``loss_sums``' terms, read
    nowhere on the host (no device synchronisation). ``counts``: the denominators, by default the
    batch's own; in data-parallel training the global batch's, summed over the ranks. A term with
    no labelled value adds 0. The division is in the errors' dtype, then cast, as in loss_terms."""
    device = next(iter(sums.values()))[0].device if sums else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    for term in (t for t in TERMS if t in sums):  # a fixed order of the additions
        squared_sum, count = sums[term]
        count = count if counts is None else counts[term]
        mean = (squared_sum / count.to(squared_sum.dtype).clamp(min=1)).to(torch.float64)
        total = total + getattr(weights, term) * mean
    return total


def loss_terms(
    prediction: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], weights: LossConfig
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss (a differentiable float64 scalar) and its parts (floats, for the log): each
    term's sum of squared errors divided by its number of labelled values, weighted. Terms that
    no structure of the batch carries are left out."""
    total = torch.zeros((), dtype=torch.float64, device=batch[keys.POSITIONS].device)
    parts: Dict[str, float] = {}
    for term, (squared_sum, count) in loss_sums(prediction, batch, weights).items():
        mean = (squared_sum / count.clamp(min=1)).to(torch.float64)  # 0, not 0/0, when nothing is labelled
        total = total + getattr(weights, term) * mean
        if int(count):
            parts[term] = float(mean.detach())
    return total, parts
