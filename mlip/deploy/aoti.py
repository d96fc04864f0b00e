"""AOTInductor model packages (``.pt2``): the deployed model contract compiled ahead of time.

The same forward as a TorchScript model file (see :mod:`mlip.deploy.model_file`), exported with
``torch.export`` and compiled by Inductor into a shared library inside a PT2 zip archive, the
format torch moves to as ``torch.jit`` is deprecated.

How it is built: ``torch.export`` does not trace ``torch.autograd.grad`` inside a forward, so the
contract's forward (energies and their autograd forces/virial) is first traced by ``make_fx`` into
one graph that holds the backward pass as well (as nequip's ``nequip-compile --mode aotinductor``
does), then exported with the numbers of nodes N and edges E dynamic, and compiled.

Exported signature (what the Python wrapper and the C++ ``AOTIModelPackageLoader`` call):

    (positions (N, 3), atom_types (N,), edge_index (2, E), edge_shifts (E, 3), num_local () int64)
        -> tuple of tensors named, in order, by metadata["aoti_outputs"]

- ``num_local`` is a 0-d int64 tensor: a Python int would be traced as a constant, and the
  package would then only serve structures with that many owned atoms.
- ``paired`` is not an input: the package is exported with ``paired=False``, exact for every edge
  list (paired lists only let NequIP share work). :class:`AOTIModel` accepts the flag and ignores it.
- The package holds the weights and code for one device and one torch version; both are in the
  metadata and checked at load (a mismatch fails inside torch's loader with no useful message).
- CPU kernels take their thread count at run time (torch's, ``torch.set_num_threads``; metadata
  "threads": "run time"). Every index_add (the backward of a row gather) is traced as a scatter_add
  first (:func:`mlip.traced.index_adds_as_scatters`): Inductor lowers index_add to an accumulating index_put,
  and its multi-threaded code for that gave wrong forces (0.14-0.78 relative at 2 threads, energies
  right); its scatter_add is right.

Metadata: the same JSON as a TorchScript file, at ``<archive>/extra/mlip/metadata.json``, plus
"torch_version", "device", "threads" and "aoti_outputs"; also in the package's own metadata
(key ``mlip_metadata``) for C++ loaders.
"""

import json
import os
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

PACKAGE_METADATA_KEY = "mlip_metadata"
# What the metadata's "threads" says of the kernels: compiled with cpp.dynamic_threads, they use as
# many threads as torch is set to where the package runs (Python, or the LAMMPS plugin's
# MLIP_TORCH_THREADS). Packages of earlier mlip versions say 1 (kernels compiled for one thread).
KERNEL_THREADS = "run time"


def is_aoti_package(path: Union[str, os.PathLike]) -> bool:
    """A PT2 archive with compiled AOTInductor code (by content, whatever the file's extension)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_compiler() -> str:
    """The C++ compiler Inductor will use; a clear error before a long export if there is none."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise RuntimeError("--format aoti needs a C++ compiler (g++ or clang++ on PATH, or $CXX), and none was "
                           "found; install one (e.g. apt-get install g++) or deploy --format torchscript") from None


def export_package(deployed: torch.nn.Module, example: Tuple, path: Union[str, os.PathLike],
                   metadata: Dict[str, Any], device: Union[str, torch.device] = "cpu",
                   check: Optional[Callable[["AOTIModel"], None]] = None) -> Dict[str, Any]:
    """Export ``deployed`` (a :class:`mlip.models.DeployedPotential`) and write the package at
    ``path`` (atomically: temporary file + rename); returns the package's metadata.
    ``check`` gets the compiled package, loaded, before it is renamed into place: if it raises,
    nothing is written.

    ``example``: contract inputs (positions, atom_types, edge_index, edge_shifts, num_local) on
    ``device``, with N and E not 0 or 1 (torch specializes those sizes) and 1 < num_local < N
    (tracing takes the branch the example takes: the slice of owned atoms must stay a slice).
    """
    from torch._inductor import aoti_compile_and_package

    from ..traced import index_adds_as_scatters, trace
    from .model_file import AOTI_FORMAT_NAME, complete_metadata

    device = torch.device(device)
    check_compiler()  # before the long export
    for parameter in deployed.parameters():  # frozen: the traced graph computes no weight gradients
        parameter.requires_grad_(False)
    num_local = example[4]
    output_names = list(deployed(*example).keys())

    def flat_forward(positions, atom_types, edge_index, edge_shifts, num_local: int):
        out = deployed(positions, atom_types, edge_index, edge_shifts, num_local)
        return tuple(out[name] for name in output_names)

    graph = trace(flat_forward, example)  # one graph with the backward pass; num_local a symbolic int
    index_adds_as_scatters(graph)  # (CPU and GPU alike: the same graph everywhere)
    nodes = torch.export.Dim("num_nodes", min=0)  # an isolated atom has one node and no edges
    edges = torch.export.Dim("num_edges", min=0)
    inputs = (*example[:4], torch.tensor(num_local, device=device))
    exported = torch.export.export(_TensorNumLocal(graph), inputs, strict=False,
                                   dynamic_shapes=({0: nodes}, {0: nodes}, {1: edges}, {0: edges}, None))

    metadata = complete_metadata(dict(metadata, format=AOTI_FORMAT_NAME, torch_version=torch_version(),
                                      device=device.type, threads=KERNEL_THREADS,
                                      aoti_outputs=output_names), AOTI_FORMAT_NAME)
    text = json.dumps(metadata, indent=1)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".pt2")  # Inductor insists on the .pt2 suffix
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch 2.13's pytree
            aoti_compile_and_package(exported, package_path=tmp, inductor_configs={
                "aot_inductor.metadata": {PACKAGE_METADATA_KEY: text}, "cpp.dynamic_threads": device.type == "cpu"})
        with zipfile.ZipFile(tmp, "a") as archive:
            root = archive.namelist()[0].split("/")[0]
            archive.writestr(f"{root}/extra/mlip/metadata.json", text)
        if check is not None:
            check(load_package(tmp, metadata, device))
        umask = os.umask(0)  # mkstemp creates 0600; a model file is meant to be shared
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return metadata


class _TensorNumLocal(torch.nn.Module):
    """The traced graph with num_local passed as a 0-d tensor, checked to lie in [0, N]: Inductor
    needs those bounds to slice the per-atom energies by a value known only at run time."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.traced = graph

    def forward(self, positions, atom_types, edge_index, edge_shifts, num_local):
        n = num_local.item()
        torch._check(n >= 0)
        torch._check(n <= positions.shape[0])
        return self.traced(positions, atom_types, edge_index, edge_shifts, n)


def torch_version() -> str:
    """torch's version without the build tag ('2.13.0+cpu' -> '2.13.0')."""
    return torch.__version__.split("+")[0]


def load_package(path: Union[str, os.PathLike], metadata: Dict[str, Any],
                 device: Union[str, torch.device] = "cpu") -> "AOTIModel":
    """The package at ``path`` as a contract module; ``metadata`` is its checked metadata.

    Raises :class:`mlip.deploy.ModelFileError` for a package of another torch version or device,
    or one the loader cannot read."""
    from torch._inductor import aoti_load_package

    from .model_file import ModelFileError

    device = torch.device(device)
    missing = sorted({"torch_version", "device", "aoti_outputs"} - set(metadata))
    if missing:
        raise ModelFileError(f"{path}: AOTInductor package metadata lacks {missing}")
    if metadata["torch_version"] != torch_version():
        raise ModelFileError(f"{path}: AOTInductor package built with torch {metadata.get('torch_version')}, "
                             f"this is torch {torch_version()}; compiled packages only run on the torch version that "
                             f"built them: deploy it again from its checkpoint or TorchScript file (`mlip deploy "
                             f"model.pt -o model.pt2`)")
    if metadata["device"] != device.type:
        raise ModelFileError(f"{path}: AOTInductor package compiled for device {metadata.get('device')!r}, asked to "
                             f"run on {device.type!r}; deploy it again for that device")
    try:
        package = aoti_load_package(os.fspath(path))
    except Exception as error:  # torch raises RuntimeError subclasses with long C++ traces
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelFileError(f"{path}: AOTInductor package could not be loaded (corrupt?): {first_line}") from None
    return AOTIModel(package, metadata["aoti_outputs"])


class AOTIModel(torch.nn.Module):
    """A loaded AOTInductor package behind the deployed model contract (same call, same dict)."""

    ignores_paired = True  # callers need not build paired edge lists (see accepts_paired_edges)

    def __init__(self, package: Callable, output_names: List[str]):
        super().__init__()
        self.package = package
        self.output_names = list(output_names)

    def forward(self, positions: torch.Tensor, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_shifts: torch.Tensor, num_local: int, paired: bool = False) -> Dict[str, torch.Tensor]:
        # paired only promises an edge order; the package was exported without using it (exact either way).
        outputs = self.package(positions, atom_types, edge_index, edge_shifts,
                               torch.tensor(num_local, dtype=torch.int64, device=positions.device))
        return dict(zip(self.output_names, outputs))


__all__ = ["AOTIModel", "check_compiler", "export_package", "is_aoti_package", "load_package"]
