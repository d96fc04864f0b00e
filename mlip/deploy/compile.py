"""Eager model -> one model file with metadata (TorchScript or AOTInductor), checked against the eager model.

A potential becomes a DeployedPotential (the contract of mlip.deploy.model_file); a property model a
DeployedProperty (TorchScript only), checked and written by the same functions."""

import copy
import os
import warnings
from typing import Optional, Union

import numpy as np
import torch

from ..data import keys
from ..models import DeployedPotential, DeployedProperty, Potential, model_metadata
from ..models.property import is_property_model
from .model_file import DTYPES, save_model


def file_module(model: torch.nn.Module) -> torch.nn.Module:
    """The file-level form of an eager model: flat tensors in, dict out (a copy, in eval mode)."""
    model = copy.deepcopy(model).eval()
    return DeployedProperty(model) if is_property_model(model) else DeployedPotential(model)


def script_model(model: Potential) -> torch.jit.ScriptModule:
    deployed = file_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(deployed)


FORMATS = ("torchscript", "aoti")


def deploy_model(
    model: Potential,
    path: Union[str, os.PathLike],
    training_data_hash: Optional[str] = None,
    check: bool = True,
    dtype: Optional[str] = None,
    format: str = "torchscript",
    device: Union[str, torch.device] = "cpu",
) -> dict:
    """Compile ``model`` and write it with its metadata; returns the metadata.

    dtype: 'float32' or 'float64' to deploy the weights cast to that precision (None keeps the
        model's); one trained model serves both.
    format: 'torchscript' (a ``.pt`` TorchScript archive) or 'aoti' (a ``.pt2`` AOTInductor
        package for ``device``, see :mod:`mlip.deploy.aoti`).
    With ``check``, the compiled model must reproduce the eager one on two small random structures
    of different sizes containing every species (else nothing is written).
    ``model``: a Potential, or a PropertyModel (TorchScript only: its file predicts one number per
    structure, see mlip.deploy.model_file).
    A full disk is an OSError (ENOSPC) naming ``path``, and leaves no file behind (TorchScript:
    ``save_model`` writes from Python).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown model file format {format!r}; choose one of {FORMATS}")
    if format == "aoti" and is_property_model(model):
        raise ValueError(f"{os.fspath(path)}: property models deploy to TorchScript only (a .pt file), not as "
                         "AOTInductor packages")
    if dtype is not None:
        model = cast_model(model, dtype)
    metadata = model_metadata(model)
    metadata["training_data_hash"] = training_data_hash
    if format == "aoti":
        from .aoti import export_package

        model = copy.deepcopy(model).to(device).eval()

        def check_package(compiled):
            check_compiled(model, compiled, os.fspath(path))

        return export_package(DeployedPotential(model), _probe_inputs(model, ghosts=2), path, metadata, device,
                              check=check_package if check else None)
    scripted = script_model(model)
    if check:
        check_compiled(model, scripted)
    try:
        save_model(scripted, path, metadata)
    except OSError as error:
        raise OSError(error.errno, f"could not write the model file: {error.strerror or error}", os.fspath(path)) from error
    return metadata


def cast_model(model: Potential, dtype: str) -> Potential:
    """A copy of ``model`` with its weights in ``dtype`` ('float32' or 'float64'); per-species
    reference energies stay float64 (see Potential)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    cast = copy.deepcopy(model).to(DTYPES[dtype])
    if isinstance(cast, Potential):
        cast.reference_energies = cast.reference_energies.to(torch.float64)
    return cast


def _probe_inputs(model: Potential, seed: int = 0, cells: int = 3, ghosts: int = 0):
    """A small periodic cluster of cells**3 atoms with every species, as flat contract inputs; the
    last ``ghosts`` atoms count as ghosts (num_local = N - ghosts). For a property model: the
    inputs of DeployedProperty, the cluster split into two structures (the first ``ghosts`` + 1
    atoms, the rest), so that batches of several structures are checked too."""
    from ..data.neighbors import neighbor_list

    num_types = len(model.statistics.type_names)
    r_max = model.config.hyperparameters()["r_max"]
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(cells)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = grid * 1.6 + rng.normal(scale=0.1, size=grid.shape)
    cell = np.eye(3) * 1.6 * cells
    edge_index, cell_shifts = neighbor_list(positions, cell, True, r_max)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    inputs = (
        torch.tensor(positions, dtype=dtype, device=device),
        torch.tensor(np.arange(len(positions)) % num_types, device=device),
        torch.tensor(edge_index, device=device),
        torch.tensor(cell_shifts @ cell, dtype=dtype, device=device),
    )
    if not is_property_model(model):
        return inputs + (len(positions) - ghosts,)
    # Two structures: edges between them are dropped, so each is a cluster of its own.
    first = ghosts + 1
    structure = (torch.arange(len(positions), device=device) >= first).long()
    within = structure[inputs[2][0]] == structure[inputs[2][1]]
    num_atoms = torch.tensor([first, len(positions) - first], device=device)
    return inputs[0], inputs[1], inputs[2][:, within], inputs[3][within], structure, num_atoms


def check_compiled(model: Potential, compiled: torch.nn.Module, what: str = "compiled model") -> None:
    """``compiled`` (TorchScript or AOTInductor) reproduces the eager ``model`` on two structures
    of different sizes (a compiled file that specialized on one input size fails the second),
    the second with ghost atoms (a property model: two batches of two structures each)."""
    eager_model = file_module(model)
    for inputs in (_probe_inputs(model), _probe_inputs(model, seed=1, cells=2, ghosts=3)):
        eager = eager_model(*inputs)
        try:
            result = compiled(*inputs)
        except RuntimeError as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RuntimeError(f"{what} fails on a structure of {inputs[0].shape[0]} atoms and "
                               f"{inputs[2].shape[1]} edges: {first_line}") from None
        # float32: eager and compiled code may sum in different orders; 1e-5 refused a valid 3-epoch
        # model (1.2e-5). A wrong compilation differs at O(1).
        tolerance = 1e-4 if inputs[0].dtype == torch.float32 else 1e-10
        if set(result) != set(eager):
            raise RuntimeError(f"{what} returns {sorted(result)}, the eager model {sorted(eager)}")
        for key in eager:
            if result[key].shape != eager[key].shape:
                raise RuntimeError(f"{what} returns {key} of shape {tuple(result[key].shape)}, the eager model "
                                   f"{tuple(eager[key].shape)}")
            scale = max(float(eager[key].abs().max()), 1.0)
            difference = float((eager[key] - result[key]).abs().max()) / scale
            if difference > tolerance:
                raise RuntimeError(f"{what} differs from the eager model in {key} by {difference:.2e} (relative)")
    wanted = keys.PROPERTY if is_property_model(model) else keys.FORCES
    if wanted not in result:
        raise RuntimeError(f"{what} returns no {wanted}")
