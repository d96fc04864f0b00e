"""Optimizer, learning-rate schedule and exponential moving average (EMA) of the weights."""

import math
from contextlib import contextmanager
from typing import Any, Dict, Optional

import torch

from .config import OptimizerConfig, ScheduleConfig

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    # foreach: one multi-tensor op per update stage instead of ~10 small ops per parameter tensor
    # (torch picks it by default only on CUDA); 1.65 -> 1.24 ms per NequIP small step here.
    return OPTIMIZERS[config.name](model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                   amsgrad=config.amsgrad, foreach=True)


class LearningRateSchedule:
    """plateau: lr x factor when the validation metric stalls (torch's ReduceLROnPlateau);
    cosine: linear warm-up then cosine decay to min_lr, a pure function of the position in
    the run (nothing to restore on resume); constant: lr throughout."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, lr: float):
        self.optimizer = optimizer
        self.config = config
        self.lr = lr
        self.plateau = None
        if config.name == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=config.factor, patience=config.patience, min_lr=config.min_lr
            )

    def before_step(self, epoch_position: float) -> None:
        """Set the lr for the step at ``epoch_position`` (epochs done, fractional)."""
        if self.config.name != "cosine":
            return
        warmup = self.config.warmup_epochs
        if epoch_position < warmup:
            lr = self.lr * (epoch_position + 1e-3) / warmup
        else:
            span = max((self.config.cosine_epochs or 0) - warmup, 1e-9)
            progress = min((epoch_position - warmup) / span, 1.0)
            lr = self.config.min_lr + (self.lr - self.config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def after_epoch(self, metric: float) -> None:
        if self.plateau is not None and math.isfinite(metric):
            self.plateau.step(metric)

    def current(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.plateau.state_dict() if self.plateau is not None else None

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if self.plateau is not None and state is not None:
            self.plateau.load_state_dict(state)


class ExponentialMovingAverage:
    """Shadow weights w_ema <- d w_ema + (1 - d) w after each step.

    Validation, best.pt and deployment use the shadow weights: they are smoother than the last
    step's. The decay ramps up as (1 + n) / (10 + n) so the average does not drag the random
    initial weights along for thousands of steps.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        names, params = zip(*[(name, p.detach()) for name, p in model.named_parameters()])
        torch._foreach_lerp_([self.shadow[name] for name in names], list(params), 1.0 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily put the shadow weights into ``model``."""
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(saved[name])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
