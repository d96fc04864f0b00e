"""Device plumbing that runs without a GPU: the same code paths as on CUDA, checked on the CPU
and on torch's "meta" device (tensors without data: any op that touches a host tensor while the
model lives on another device shows up). tests/test_gpu.py compares CUDA with CPU on a GPU."""

import sys
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mlip.deploy import deploy_model, load_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_lammps import tiny_potential  # noqa: E402

CPU_ONLY = not torch.cuda.is_available()


class HostTensorOps(TorchDispatchMode):
    """Records every op that reads or makes a CPU tensor (e.g. a per-call host-to-device copy of a
    constant, or a tensor created without device=)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs, out))[0]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat):
            self.ops.append(str(func))
        return out


def meta_inputs(num_atoms=12, num_edges=60, dtype=torch.float64):
    positions = torch.empty(num_atoms, 3, dtype=dtype, device="meta")
    atom_types = torch.empty(num_atoms, dtype=torch.int64, device="meta")
    edge_index = torch.empty(2, num_edges, dtype=torch.int64, device="meta")
    edge_shifts = torch.empty(num_edges, 3, dtype=dtype, device="meta")
    return positions, atom_types, edge_index, edge_shifts, num_atoms


# l_max 2: the tensor products' generic Clebsch-Gordan path and the harmonics' recursion tables
@pytest.mark.parametrize("family", ["allegro", "nequip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_model_on_a_device_touches_no_host_tensor(tmp_path, family, dtype):
    """Moved to a device (eager: module.to; deployed file: mapped at load, as load_model(device=)
    does), the model's forward and force computation make and read no CPU tensor: no implicit host
    tensors, no per-call copies."""
    from mlip.models import DeployedPotential

    potential = tiny_potential(family, dtype=dtype, l_max=2)
    path = tmp_path / "model.pt"
    deploy_model(potential, path)  # deployed on the CPU
    eager = DeployedPotential(potential).eval().to("meta")
    scripted = torch.jit.load(str(path), map_location="meta")  # load_model refuses "meta" (no data)
    for name, model in (("eager", eager), ("deployed file", scripted)):
        with HostTensorOps() as mode:
            out = model(*meta_inputs(dtype=dtype))
        assert out["forces"].device.type == "meta" and out["virial"].device.type == "meta"
        assert mode.ops == [], f"{name} model touched host tensors in {sorted(set(mode.ops))}"


@pytest.mark.skipif(not CPU_ONLY, reason="checks the error of a CPU-only torch; this torch sees a GPU")
def test_cuda_on_a_cpu_only_torch_is_a_clear_error(tmp_path):
    from mlip import MLIPCalculator

    path = tmp_path / "model.pt"
    deploy_model(tiny_potential("allegro"), path)
    for call in (lambda: MLIPCalculator(str(path), device="cuda"), lambda: load_model(path, device="cuda:0")):
        with pytest.raises(ValueError, match=r"device='cuda(:0)?' is not usable with this torch"):
            call()


def test_plugin_links_the_cuda_libraries_of_a_cuda_torch(tmp_path, monkeypatch):
    """A CUDA build of torch registers CUDA only when libtorch_cuda/libc10_cuda load: the plugin
    links them, past the linker's --as-needed, whenever they exist (and the build key changes)."""
    from mlip.lammps import build

    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(build, "_package_dir", lambda name: tmp_path)
    cpu_only = build.torch_libraries()
    assert cpu_only == ["-ltorch", "-ltorch_cpu", "-lc10"]
    for name in ("libtorch_cuda.so", "libc10_cuda.so"):
        (tmp_path / "lib" / name).write_bytes(b"")
    assert build.torch_libraries() == cpu_only + ["-Wl,--no-as-needed", "-ltorch_cuda", "-lc10_cuda", "-Wl,--as-needed"]
