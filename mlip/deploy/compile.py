"""Eager potential -> one TorchScript file with metadata, checked against the eager model."""

import copy
import os
import warnings
from typing import Optional, Union

import numpy as np
import torch

from ..data import keys
from ..models import DeployedPotential, Potential, model_metadata
from .model_file import save_model


def script_model(model: Potential) -> torch.jit.ScriptModule:
    deployed = DeployedPotential(copy.deepcopy(model).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(deployed)


def deploy_model(
    model: Potential,
    path: Union[str, os.PathLike],
    training_data_hash: Optional[str] = None,
    check: bool = True,
) -> dict:
    """Compile ``model`` to TorchScript and write it with its metadata; returns the metadata.

    With ``check``, the compiled model must reproduce the eager one on a small random structure
    containing every species (else nothing is written). A full disk is an OSError
    (ENOSPC) naming ``path``, and leaves no file behind (``save_model`` writes from Python).
    """
    scripted = script_model(model)
    metadata = model_metadata(model)
    metadata["training_data_hash"] = training_data_hash
    if check:
        check_scripted(model, scripted)
    try:
        save_model(scripted, path, metadata)
    except OSError as error:
        raise OSError(error.errno, f"could not write the model file: {error.strerror or error}", os.fspath(path)) from error
    return metadata


def _probe_inputs(model: Potential, seed: int = 0):
    """A small periodic cluster with every species, as flat contract inputs."""
    from ..data.neighbors import neighbor_list

    num_types = len(model.statistics.type_names)
    r_max = model.config.hyperparameters()["r_max"]
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = grid * 1.6 + rng.normal(scale=0.1, size=grid.shape)
    cell = np.eye(3) * 4.8
    edge_index, cell_shifts = neighbor_list(positions, cell, True, r_max)
    dtype = next(model.energy_model.parameters()).dtype
    device = next(model.energy_model.parameters()).device
    return (
        torch.tensor(positions, dtype=dtype, device=device),
        torch.tensor(np.arange(len(positions)) % num_types, device=device),
        torch.tensor(edge_index, device=device),
        torch.tensor(cell_shifts @ cell, dtype=dtype, device=device),
        len(positions),
    )


def check_scripted(model: Potential, scripted: torch.jit.ScriptModule) -> None:
    inputs = _probe_inputs(model)
    eager = DeployedPotential(copy.deepcopy(model).eval())(*inputs)
    compiled = scripted(*inputs)
    # float32: eager and TorchScript may sum in different orders; 1e-5 refused a valid 3-epoch model
    # (1.2e-5). A wrong compilation differs at O(1).
    tolerance = 1e-4 if inputs[0].dtype == torch.float32 else 1e-10
    for key in eager:
        scale = max(float(eager[key].abs().max()), 1.0)
        difference = float((eager[key] - compiled[key]).abs().max()) / scale
        if difference > tolerance:
            raise RuntimeError(f"compiled model differs from the eager model in {key} by {difference:.2e} (relative)")
    if keys.FORCES not in compiled:
        raise RuntimeError("compiled model returns no forces")
