"""Where a model runs: the device argument of the ASE calculator and load_model, checked once."""

import os
from typing import Union

import torch


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1", a torch.device) as a torch.device, or a ValueError that
    says why this torch cannot run on it (a CPU-only build, no GPU visible, a GPU index too high)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device (use 'cpu', 'cuda' or 'cuda:N'): {error}") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.backends.cuda.is_built():
        raise ValueError(f"device={device!r}: torch {torch.__version__} is a CPU-only build; install a CUDA "
                         f"build of torch, or use device='cpu'")
    count = torch.cuda.device_count()
    if count == 0 or (resolved.index or 0) >= count:
        raise ValueError(f"device={device!r}: torch sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); use device='cpu' or a visible GPU")
    return resolved
