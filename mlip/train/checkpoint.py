"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``
(tensors, numbers, strings, lists and dicts only: loading one never runs pickled code).

Contents: format, format_version, config (TrainConfig as a dict), statistics, type_names,
training_data_hash, model (state_dict), ema (shadow weights or None), optimizer, scheduler,
rng (torch / numpy / python states), position (epoch, step, batch_in_epoch, seed),
progress (best metric, epochs without improvement, elapsed seconds, partial epoch sums).
"""

import os
import random
import zipfile
from typing import Any, Dict, Union

import numpy as np
import torch

from ..files import atomic_output

FORMAT_NAME = "mlip-checkpoint"
FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or not an mlip training checkpoint."""


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Write to a temporary file in the same directory, then rename: a kill never leaves half a
    file. Written through a Python file object, so a full disk is an OSError naming ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **state}, f)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """A checkpoint file, or the ``last.pt`` of a run directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_model_file(path):
        raise CheckpointError(f"{path} is a deployed model file (TorchScript), not an mlip training checkpoint: "
                              "checkpoints are the last.pt/best.pt of a run directory")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # zip, pickle and unpickler errors all mean "not readable"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {first_line}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an mlip training checkpoint (deployed models are read by load_model)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('format_version')} is not supported "
                              f"(this mlip reads version {FORMAT_VERSION})")
    return state


def is_model_file(path: str) -> bool:
    """A deployed model (TorchScript archive) is a zip with a code/ folder; a torch.save checkpoint has none."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def rng_state() -> Dict[str, Any]:
    """States of every random generator a training step could touch, in weights_only-loadable form."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
