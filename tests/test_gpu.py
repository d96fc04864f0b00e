"""CUDA == CPU: the ASE calculator, the LAMMPS pair style (1 rank, and 2 ranks sharing one GPU) and
training, for both model families and both heads, float64 to 1e-10 and float32 to 1e-5 (relative
to the largest value). Marked `gpu`: skipped, with the reason, where torch sees no GPU.
benchmarks/gpu_check.sh runs them on a GPU machine. Model files are deployed on the CPU and
loaded onto the GPU (one file for both)."""

import pathlib
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase.md.verlet import VelocityVerlet

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_devices import HostTensorOps  # noqa: E402
from test_lammps import (  # noqa: E402
    NO_OVERLAP_CHECK,
    assert_close,
    deploy_tiny,
    md_script,
    plugin,  # noqa: F401  (fixture)
    rattled_crystal,
    read_dump,
    run_lmp,
    run_zero,
    thermo_table,
    write_data,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason=f"no CUDA device: torch {torch.__version__} sees no GPU (benchmarks/gpu_check.sh runs these on one)",
    ),
]

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CASES = [
    pytest.param(family, head, dtype, id=f"{family}-{head}-{str(dtype)[6:]}")
    for family in ("allegro", "nequip")
    for head in ("gradient", "direct")
    for dtype in (torch.float64, torch.float32)
]


def calculator_run(atoms, model, device, domains=False, md_steps=0):
    """Energy, per-atom energies, forces (and stress) after ``md_steps`` NVE steps on ``device``."""
    from mlip import MLIPCalculator

    atoms = atoms.copy()
    options = {"domain_threshold": 1, "domain_atoms": 16} if domains else {}
    atoms.calc = MLIPCalculator(model, device=device, **options)
    if md_steps:
        atoms.set_velocities(np.random.default_rng(0).normal(scale=0.02, size=(len(atoms), 3)))
        VelocityVerlet(atoms, timestep=1.0).run(md_steps)  # the skin list is reused between steps
    result = {"energy": atoms.get_potential_energy(), "energies": atoms.get_potential_energies(),
              "forces": atoms.get_forces(), "positions": atoms.positions.copy()}
    if "stress" in atoms.calc.implemented_properties:
        result["stress"] = atoms.get_stress()
    return result


@pytest.mark.parametrize("family, head, dtype", CASES)
def test_calculator_cuda_matches_cpu(tmp_path, family, head, dtype):
    model = deploy_tiny(tmp_path / "model.pt", family, head, dtype)
    atoms = rattled_crystal(seed=3)
    for options in ({}, {"domains": True}, {"md_steps": 5}):
        cpu, cuda = calculator_run(atoms, model, "cpu", **options), calculator_run(atoms, model, "cuda", **options)
        assert cpu.keys() == cuda.keys()
        for key in cpu:
            assert_close(cuda[key], cpu[key], RTOL[dtype], f"{key} ({options or 'one call'})")


@pytest.mark.parametrize("family", ["allegro", "nequip"])
def test_deployed_file_runs_on_cuda_without_host_tensors(tmp_path, family):
    """A file deployed on the CPU, loaded onto the GPU: every tensor of its forward is on the GPU."""
    from mlip.deploy import load_model

    model, _ = load_model(deploy_tiny(tmp_path / "model.pt", family, l_max=2), device="cuda")
    atoms = rattled_crystal(seed=3)
    from mlip.data.neighbors import neighbor_list

    edge_index, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.0)
    inputs = (torch.tensor(atoms.positions, device="cuda"), torch.tensor(atoms.numbers % 2, device="cuda"),
              torch.tensor(edge_index, device="cuda"), torch.tensor(shifts @ atoms.cell.array, device="cuda"),
              len(atoms))
    with HostTensorOps() as mode:
        out = model(*inputs)
    assert out["forces"].is_cuda
    assert mode.ops == [], f"host tensors in {sorted(set(mode.ops))}"


@pytest.mark.lammps
@pytest.mark.parametrize("family, head, dtype", CASES)
def test_lammps_cuda_matches_cpu(plugin, tmp_path, family, head, dtype):  # noqa: F811
    model = deploy_tiny(tmp_path / "model.pt", family, head, dtype)
    atoms = rattled_crystal(seed=9)
    cpu = run_zero(atoms, model, tmp_path, style="mlip device cpu")
    cuda = run_zero(atoms, model, tmp_path, style="mlip device cuda")
    for key in ("energy", "forces", "atomic_energies") + (("virial",) if head == "gradient" else ()):
        assert_close(cuda[key], cpu[key], RTOL[dtype], key)


@pytest.mark.lammps
@pytest.mark.parametrize("family", ["allegro", "nequip"])
def test_lammps_two_ranks_share_one_gpu(plugin, tmp_path, family):  # noqa: F811
    """20 NVT steps: 2 ranks on cuda:0 == 1 rank on the CPU (float64)."""
    model = deploy_tiny(tmp_path / "model.pt", family)
    data = write_data(rattled_crystal(seed=10), tmp_path / "structure.data")
    runs = {}
    for device, ranks in (("cpu", 1), ("cuda", 2)):
        output = run_lmp(md_script(data, model, steps=20, pair_style=f"{NO_OVERLAP_CHECK} device {device}"), tmp_path, ranks)
        runs[ranks] = (thermo_table(output), read_dump(tmp_path / "final.dump"))
    assert "rank 1 (node-local 1) on cuda:0" in output
    assert_close(runs[2][0], runs[1][0], 1e-9, "thermo")
    assert_close(runs[2][1], runs[1][1], 1e-9, "positions, forces, per-atom energies")


@pytest.mark.parametrize("family", ["allegro", "nequip"])
def test_training_cuda_matches_cpu(tmp_path, family):
    """20 optimizer steps in float64 (4 epochs of 5 batches): the same losses and validation errors."""
    from test_train import emt_copper, tiny_config

    from mlip.train import train

    data = tmp_path / "cu.extxyz"
    ase.io.write(data, emt_copper(n=25), format="extxyz")  # 20 training structures, batches of 4
    histories = {}
    for k, device in enumerate(("cpu", "cuda")):
        config = tiny_config(str(data), tmp_path / f"run{k}", family, dtype="float64", device=device,
                             stop={"max_epochs": 4})
        result = train(config)
        assert result.steps == 20
        histories[device] = result.history
    for cpu_row, cuda_row in zip(histories["cpu"], histories["cuda"]):
        for key, value in cpu_row.items():
            if key.startswith("val_") or key == "train_loss":
                if value is not None:
                    assert cuda_row[key] == pytest.approx(value, rel=1e-8), (cpu_row["epoch"], key)


@pytest.mark.parametrize("family", ["allegro", "nequip"])
def test_compiled_training_on_cuda_matches_eager_on_cpu(tmp_path, family):
    """compile: true on the GPU (Inductor's Triton kernels, the force backward inside the graph):
    the optimizer steps of one epoch equal eager steps on the CPU, float64."""
    from test_compiled_training import trainer, weights
    from test_train import emt_copper

    data = tmp_path / "cu.extxyz"
    ase.io.write(data, emt_copper(9), format="extxyz")  # 8 training structures: 2 batches of 4
    cpu = trainer(str(data), tmp_path / "cpu", family, "gradient", compile=False)
    cuda = trainer(str(data), tmp_path / "cuda", family, "gradient", compile=True, device="cuda")
    for run in (cpu, cuda):
        for batch in run.train_loader.epoch(0):
            run._train_step(batch)
    assert len(cuda.step_model._graphs) == 1
    assert torch.allclose(weights(cuda.model).cpu(), weights(cpu.model), rtol=1e-8, atol=1e-12)
