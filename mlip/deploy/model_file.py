"""The deployed model file: one TorchScript archive that carries its own metadata.

Contract shared by ASE, domain decomposition and the LAMMPS pair style
(see the README, "Deployed model contract"):

    forward(positions: (N, 3) float   Å, owned atoms first, then ghosts/images
            atom_types: (N,) int64    index into metadata["type_names"]
            edge_index: (2, E) int64  row 0 center i, row 1 neighbor j
            edge_shifts: (E, 3) float Å, r_ij = x_j - x_i + shift_ij (zeros where images are ghosts)
            num_local: int            atoms with index < num_local own their energy
            paired: bool = False      edge k + E/2 is the reverse of edge k (mlip.data.pair_edges);
                                      lets the model share per-pair work. Only for symmetric lists.
    ) -> Dict[str, Tensor]:
            "atomic_energies": (num_local,) float64, eV, reference energies included
            "energy":          ()  float64, eV, sum of atomic_energies
            "forces":          (N, 3) eV/Å on every node (ghost forces go back to their owners)
            "virial":          (3, 3) eV, W = -sum_edges r_ij (x) dE/dr_ij   [gradient head only]
            "member_atomic_energies": (num_local, M) float64, eV, each member's atomic_energies
            "member_forces":   (N, 3, M) eV/Å, each member's forces (same conventions as "forces")
                               [these two: committees of M models only; their means are
                                atomic_energies and forces]

Floating inputs are in the model's dtype (metadata["dtype"]). Edges must reach every center
whose energy is needed, including ghost centers up to (message_passing_layers - 1) * r_max from
owned atoms for message-passing models.
For a direct-force head the forces of ghosts are zero and the net force is NOT removed in the
file: the caller subtracts the mean force over the whole system (it alone sees all of it).

A property model's file (metadata "task": "property") has another forward, that of
mlip.models.property.DeployedProperty: a batch of whole structures in, one number per structure out

    forward(positions (N, 3), atom_types (N,), edge_index (2, E), edge_shifts (E, 3),
            batch (N,) int64 structure of each atom, num_atoms (B,) int64) -> {"property": (B,) float64}

and no energy, forces or stress: the engines refuse it (:func:`require_potential`).

Metadata (JSON in the archive's extra file ``mlip/metadata.json``): see :data:`REQUIRED_METADATA`.
"""

import io
import json
import os
import warnings
import zipfile
from typing import Any, Dict, List, Tuple, Union

import torch

import mlip

from ..files import atomic_output

FORMAT_NAME = "mlip-torchscript"
FORMAT_VERSION = 1
METADATA_FILE = "mlip/metadata.json"

# key -> meaning. Every deployed file has all of them.
REQUIRED_METADATA = {
    "format": f"{FORMAT_NAME!r} (TorchScript) or 'mlip-aoti' (AOTInductor package, which adds 'torch_version', "
              f"'device' and 'aoti_outputs')",
    "format_version": "int; a loader refuses versions it does not know",
    "mlip_version": "mlip version that wrote the file",
    "model_family": "'allegro' (strictly local) or 'nequip' (message passing)",
    "type_names": "list of chemical symbols; atom_types index into it",
    "r_max": "cutoff radius, Å",
    "message_passing_layers": "receptive field = this x r_max; ghost depth for domains (1 if strictly local)",
    "force_head": "'gradient' (conservative, virial available), 'direct' (forces predicted, no virial) or 'none' "
                  "(a property model)",
    "dtype": "'float32' or 'float64': dtype of floating inputs and of forces/virial (energies are float64)",
    "units": "{'energy': 'eV', 'length': 'Å'}",
    "hyperparameters": "dict of the architecture's settings",
    "training_data_hash": "sha256 of the training set, or null",
}
# Optional: "task" ('potential' when absent, or 'property': see TASKS), "property" (a property
# model's head), "statistics" and "model_config" (to rebuild the model: fine-tuning, re-deploying).

# The two containers of one contract: a TorchScript archive, an AOTInductor package (mlip.deploy.aoti).
AOTI_FORMAT_NAME = "mlip-aoti"
FORMAT_NAMES = (FORMAT_NAME, AOTI_FORMAT_NAME)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ModelFileError(RuntimeError):
    """A model file that is corrupt, not an mlip model, or of an incompatible version."""


def save_model(scripted: torch.jit.ScriptModule, path: Union[str, os.PathLike], metadata: Dict[str, Any]) -> None:
    """Write atomically (temporary file + rename): a crash never leaves a half-written model."""
    metadata = complete_metadata(metadata, FORMAT_NAME)
    # Serialized in memory, written by Python: a full disk is then an OSError naming the file, not
    # an abort inside torch's C++ writer (which ends the process and leaves its temporary file).
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def complete_metadata(metadata: Dict[str, Any], format_name: str) -> Dict[str, Any]:
    """A model's metadata with what every file states (format, versions, units) filled in."""
    metadata = dict(metadata)
    metadata.setdefault("format", format_name)
    metadata.setdefault("format_version", FORMAT_VERSION)
    metadata.setdefault("mlip_version", mlip.__version__)
    metadata.setdefault("units", {"energy": "eV", "length": "Å"})
    metadata.setdefault("training_data_hash", None)
    missing = sorted(set(REQUIRED_METADATA) - set(metadata))
    if missing:
        raise ValueError(f"metadata lacks {missing}")
    return metadata


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Metadata of a model file, checked, without loading the TorchScript code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            # torch.jit.load does not check the CRC-32 that the zip format stores per member: a
            # flipped bit in the weights would load and give wrong energies. Reading every member
            # once costs ~10 ms for a 200 kB model (the LAMMPS plugin does the same check).
            damaged = archive.testzip()
            if damaged is not None:
                raise ModelFileError(
                    f"{path} is damaged: its member {damaged!r} fails the zip CRC-32 check (a corrupted "
                    f"copy or a disk error; copy or deploy the model again)"
                )
            names = [n for n in archive.namelist() if n.endswith("extra/" + METADATA_FILE)]
            if not names:
                raise ModelFileError(
                    f"{path} is a TorchScript/zip file but carries no mlip metadata: not a model written by "
                    f"`mlip deploy`"
                )
            metadata = json.loads(archive.read(names[0]).decode())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as error:
        raise ModelFileError(f"{path} is not a readable mlip model file (corrupt or truncated?): {error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: metadata is not valid JSON: {error}") from None
    check_metadata(metadata, path)
    return metadata


def check_metadata(metadata: Dict[str, Any], path: str = "model") -> None:
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: metadata is a JSON {type(metadata).__name__}, not an object")
    if metadata.get("format") not in FORMAT_NAMES:
        raise ModelFileError(f"{path}: not an mlip model file (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {version} is not supported by mlip {mlip.__version__} "
            f"(supports {FORMAT_VERSION}); written by mlip {metadata.get('mlip_version')}. "
            f"Re-deploy the checkpoint with this version (`mlip deploy`)."
        )
    missing = sorted(set(REQUIRED_METADATA) - set(metadata))
    if missing:
        raise ModelFileError(f"{path}: metadata lacks {missing}")
    check_model_fields(metadata, path)


# The metadata every caller computes with (the LAMMPS plugin checks the same ones).
MODEL_FIELDS = ("dtype", "force_head", "r_max", "message_passing_layers", "type_names")
# "task" (absent in files written before property models: "potential"): a potential predicts
# energies, forces and stress (the contract above); a property model one number per structure
# (mlip.models.property.DeployedProperty, metadata "property": {name, unit, pooling, hidden}).
TASKS = ("potential", "property")


def check_model_fields(metadata: Dict[str, Any], path: str = "model") -> None:
    """The fields of :data:`MODEL_FIELDS` present and valid (also for metadata not read from a file)."""
    missing = [key for key in MODEL_FIELDS if key not in metadata]
    if missing:
        raise ModelFileError(f"{path}: metadata lacks {missing}")
    if metadata["dtype"] not in DTYPES:
        raise ModelFileError(f"{path}: unknown dtype {metadata['dtype']!r}")
    task = metadata.get("task", "potential")  # files written before property models have no "task"
    if task not in TASKS:
        raise ModelFileError(f"{path}: unknown task {task!r} in its metadata (known: {list(TASKS)})")
    force_heads = ("none",) if task == "property" else ("gradient", "direct")
    if metadata["force_head"] not in force_heads:
        raise ModelFileError(f"{path}: force head {metadata['force_head']!r} does not fit a {task} model "
                             f"(expected {' or '.join(map(repr, force_heads))})")
    if task == "property" and not (isinstance(metadata.get("property"), dict) and "name" in metadata["property"]):
        raise ModelFileError(f"{path}: a property model's metadata lacks its property head (name, unit, pooling)")
    r_max, layers, type_names = metadata["r_max"], metadata["message_passing_layers"], metadata["type_names"]
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not 0 < r_max < float("inf"):
        raise ModelFileError(f"{path}: metadata r_max must be a positive number of Å, got {r_max!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ModelFileError(f"{path}: metadata message_passing_layers must be an integer >= 1, got {layers!r}")
    if not isinstance(type_names, list) or not type_names or not all(isinstance(t, str) for t in type_names):
        raise ModelFileError(f"{path}: metadata type_names must be a non-empty list of symbols, got {type_names!r}")


def require_potential(metadata: Dict[str, Any], path: str = "model") -> None:
    """Engines that need energies, forces or stress (ASE, the batched engines, torch-sim) refuse a
    property model's file here, by name."""
    if metadata.get("task", "potential") == "property":
        head = metadata.get("property", {})
        unit = f" in {head['unit']}" if head.get("unit") else ""
        raise ModelFileError(f"{path} is a property model (it predicts {head.get('name')!r}{unit} per structure): "
                             "it has no energy, forces or stress; use `mlip predict` or `mlip evaluate`")


def usable_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device; a ValueError naming it if this torch cannot compute there
    (a misspelt name, ``"cuda"`` on a CPU-only torch or without a visible GPU, an absent index)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device torch knows: {error}") from None
    if device.type == "meta":
        raise ValueError("device='meta' holds no data: choose 'cpu' or 'cuda'")
    try:
        torch.empty(0, device=device)  # the cheapest way to ask torch whether the device works
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"device={str(device)!r} is not usable with this torch {torch.__version__}: {reason}; "
            f"available: {available_devices()}"
        ) from None
    return device


def available_devices() -> List[str]:
    """The devices this torch can compute on here, e.g. ['cpu', 'cuda', 'cuda:0']."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        available.append("mps")
    return available


def load_model(
    path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load a deployed model (TorchScript file or AOTInductor package, told apart by content) and
    its metadata; refuse incompatible or corrupt files.

    Every tensor of the file is mapped onto ``device`` at load (a file runs on any device, in the
    dtype it records), also constants kept outside the buffers, which module.to() would not move.
    An AOTInductor package runs only on the device it was compiled for."""
    device = usable_device(device)
    metadata = read_metadata(path)
    if metadata["format"] != FORMAT_NAME:
        return _load_aoti(path, metadata, device), metadata
    try:
        with warnings.catch_warnings(), torch.jit.optimized_execution(False):
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(os.fspath(path), map_location=device)
    except Exception as error:  # torch raises RuntimeError subclasses with long C++ traces
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{path}: TorchScript archive could not be loaded: {first_line}") from None
    # A deployed model is for inference: with frozen weights autograd keeps only what forces and
    # stress need (e.g. not the inputs of every radial-MLP matmul: -175 MB of 780 MB saved
    # tensors for NequIP small on 4000 Cu atoms).
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return UnoptimizedScript(model).eval(), metadata


def _load_aoti(path, metadata: Dict[str, Any], device) -> torch.nn.Module:
    from .aoti import load_package

    return load_package(path, metadata, device)


def accepts_paired_edges(model: torch.nn.Module) -> bool:
    """Whether a deployed model's forward uses the optional ``paired`` flag (files deployed before
    the flag existed do not: they get plain full edge lists; AOTInductor packages take the flag
    but were exported without it)."""
    if getattr(model, "ignores_paired", False):
        return False
    if isinstance(model, UnoptimizedScript):
        model = model.scripted
    if isinstance(model, torch.jit.ScriptModule):
        return any(argument.name == "paired" for argument in model.forward.schema.arguments)
    import inspect

    return "paired" in inspect.signature(model.forward).parameters


class UnoptimizedScript(torch.nn.Module):
    """Runs a TorchScript model without the graph executor's optimizations.

    Measured here (torch 2.13, CPU): the optimizing executor's own autodiff made a NequIP force
    call 1.7x slower than eager PyTorch; with optimizations off (at load and at every call) the
    scripted model runs as fast as eager. The setting is restored after each call.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted

    def forward(self, *inputs):
        with torch.jit.optimized_execution(False):
            return self.scripted(*inputs)
