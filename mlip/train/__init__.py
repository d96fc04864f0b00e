"""Training: YAML config, loss, metrics, the loop with exact resumption, checkpoints, evaluation."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict, load_config, load_stages
from .trainer import TrainResult, Trainer, model_from_checkpoint, resume, train, train_stages

__all__ = [
    "CheckpointError",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "config_from_dict",
    "load_checkpoint",
    "load_config",
    "load_stages",
    "model_from_checkpoint",
    "resume",
    "save_checkpoint",
    "train",
    "train_stages",
]
