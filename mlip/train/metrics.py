"""Error metrics (MAE, RMSE) accumulated over batches, overall and per group (config type).

Units: energy eV per structure, energy_per_atom eV/atom, forces eV/Å per Cartesian component,
stress eV/Å^3 per component of the 3x3 tensor,
property (a property model's target) in its own unit. Only labelled values count (masks keys.HAS_*):
a structure without forces adds no force error, and no zero either.
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import keys

QUANTITIES = ("energy", "energy_per_atom", "forces", "stress", "property")
ALL = "all"


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


class ErrorMetrics:
    def __init__(self):
        # (group, quantity) -> [sum |error|, sum error^2, number of values]
        self._sums: Dict[Tuple[str, str], np.ndarray] = {}

    def add(self, quantity: str, errors: np.ndarray, group: str = ALL) -> None:
        errors = np.asarray(errors, dtype=np.float64).reshape(-1)
        if errors.size:
            self._add((group, quantity), (np.abs(errors).sum(), np.square(errors).sum(), errors.size))

    def merge(self, other: "ErrorMetrics") -> None:
        """Add the errors ``other`` saw (another process's share of a data set)."""
        for key, sums in other._sums.items():
            self._add(key, sums)

    def _add(self, key: Tuple[str, str], sums) -> None:
        self._sums[key] = self._sums.get(key, np.zeros(3)) + sums

    def update(self, prediction: Dict, batch: Dict, groups: Optional[Sequence[str]] = None) -> None:
        """Errors of one batch. ``groups``: a name per structure (e.g. config types), or None."""
        num_atoms = _numpy(batch[keys.NUM_ATOMS])
        structure_of_atom = _numpy(batch[keys.BATCH]).astype(np.int64)
        errors = {}  # quantity -> (errors, structure of each error)
        # Only labelled values count (keys.HAS_*): a placeholder zero is not a label.
        if keys.ENERGY in batch:
            has = _numpy(batch[keys.HAS_ENERGY]).astype(bool)
            e = (_numpy(prediction[keys.ENERGY]) - _numpy(batch[keys.ENERGY]))[has]
            index = np.flatnonzero(has)
            errors["energy"] = (e, index)
            errors["energy_per_atom"] = (e / num_atoms[has], index)
        if keys.FORCES in batch:
            has = _numpy(batch[keys.HAS_FORCES]).astype(bool)
            f = (_numpy(prediction[keys.FORCES]) - _numpy(batch[keys.FORCES]))[has]
            errors["forces"] = (f, np.repeat(structure_of_atom[has], 3))
        if keys.STRESS in batch and keys.STRESS in prediction:
            has = _numpy(batch[keys.HAS_STRESS]).astype(bool)
            s = (_numpy(prediction[keys.STRESS]) - _numpy(batch[keys.STRESS]))[has]
            errors["stress"] = (s, np.repeat(np.flatnonzero(has), 9))
        if keys.PROPERTY in batch and keys.PROPERTY in prediction:
            has = _numpy(batch[keys.HAS_PROPERTY]).astype(bool)
            errors["property"] = ((_numpy(prediction[keys.PROPERTY]) - _numpy(batch[keys.PROPERTY]))[has],
                                  np.flatnonzero(has))
        for quantity, (values, owner) in errors.items():
            values = values.reshape(-1)
            self.add(quantity, values)
            if groups is not None:
                group_of_value = np.asarray(groups, dtype=object)[owner]
                for group in sorted(set(group_of_value)):
                    self.add(quantity, values[group_of_value == group], group or "(none)")

    def groups(self):
        return sorted({g for g, _ in self._sums if g != ALL})

    def summary(self, group: str = ALL) -> Dict[str, float]:
        """{quantity_mae, quantity_rmse, quantity_count} for the quantities seen."""
        out = {}
        for quantity in QUANTITIES:
            total_abs, total_sq, n = self._sums.get((group, quantity), (0.0, 0.0, 0))
            if n:
                out[f"{quantity}_mae"] = float(total_abs / n)
                out[f"{quantity}_rmse"] = float(np.sqrt(total_sq / n))
                out[f"{quantity}_count"] = int(n)
        return out

    def mean_squared(self, quantity: str, group: str = ALL) -> Optional[float]:
        total_abs, total_sq, n = self._sums.get((group, quantity), (0.0, 0.0, 0))
        return float(total_sq / n) if n else None


def scores(reference: np.ndarray, predicted: np.ndarray) -> Dict[str, float]:
    """MAE, RMSE, R² (1 - SSE / total sum of squares) and count of per-structure predictions (a property
    model's), in their unit."""
    error = predicted - reference
    variance = float(np.square(reference - reference.mean()).sum())
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt(np.square(error).mean())),
            "r2": 1.0 - float(np.square(error).sum()) / variance if variance > 0 else float("nan"),
            "count": int(len(error))}
