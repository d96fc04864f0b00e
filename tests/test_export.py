"""Deployment beyond TorchScript: the precision chosen at deploy, and AOTInductor packages (.pt2)
that keep the deployed model contract (same outputs as the TorchScript file and the eager model,
for other numbers of atoms and edges than the export saw)."""

import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from mlip import MLIPCalculator
from mlip.cli import main
from mlip.deploy import ModelFileError, deploy_model, load_model, read_metadata
from mlip.deploy.compile import cast_model
from mlip.models import build_committee
from physics import cluster, tiny_model, triclinic_alloy
from test_calculator import one_thread  # noqa: F401 (autouse: one torch thread in this module)
from test_lammps import plugin  # noqa: F401  (the session's compiled LAMMPS plugin, for the .pt2 test)

TOLERANCE = {"float32": 1e-4, "float64": 1e-9}  # relative; float32: compiled code sums in another order
CASES = [(family, head, dtype) for family in ("allegro", "nequip") for head in ("gradient", "direct")
         for dtype in ("float32", "float64")]
FAST_CASE = ("allegro", "gradient", "float32")  # in the default run; the other compiles (~1-2 min each) are slow


def trained_model(family, head):
    """A float32 model (as training writes them); a committee of two for the gradient head, so
    that committee outputs go through both containers too."""
    if head == "gradient":
        return build_committee([tiny_model(family, head, torch.float32, seed=seed) for seed in (0, 1)])
    return tiny_model(family, head, torch.float32)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(family, head, dtype) -> (eager model in dtype, TorchScript file, AOTInductor package), each
    compiled once per test session: `mlip deploy model.pt -o model.pt2 --dtype ...`, as a user would."""
    cache = {}

    def get(family, head, dtype):
        if (family, head, dtype) not in cache:
            directory = tmp_path_factory.mktemp(f"{family}-{head}-{dtype}")
            model = trained_model(family, head)
            source = directory / "trained.pt"
            deploy_model(model, source)
            files = [directory / "model.pt", directory / "model.pt2"]
            for path in files:
                assert main(["deploy", str(source), "-o", str(path), "--dtype", dtype]) == 0
            cache[family, head, dtype] = (cast_model(model, dtype), *files)
        return cache[family, head, dtype]

    return get


def relative_error(actual, expected):
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max() / max(np.abs(expected).max(), 1.0))


def results(model, atoms, properties):
    atoms = atoms.copy()
    atoms.calc = MLIPCalculator(model, skin=0.0)
    return {name: np.array(atoms.calc.get_property(name, atoms)) for name in properties}


@pytest.mark.parametrize("case", [pytest.param(case, marks=() if case == FAST_CASE else pytest.mark.slow,
                                               id="-".join(case)) for case in CASES])
def test_aoti_equals_torchscript_equals_eager(deployed, case):
    family, head, dtype = case
    eager, scripted, package = deployed(family, head, dtype)
    metadata = read_metadata(package)
    assert metadata["format"] == "mlip-aoti" and metadata["dtype"] == dtype
    assert metadata["model_family"] == family and metadata["force_head"] == head
    properties = ["energy", "energies", "forces"]
    if head == "gradient":
        properties += ["committee_energies", "energy_uncertainty", "force_uncertainty"]
    # Neither structure has the export's 27 atoms and their edge counts differ from it and each other.
    for atoms in (triclinic_alloy(seed=3), cluster(seed=4, n=7)):
        wanted = properties + (["stress"] if head == "gradient" and atoms.pbc.all() else [])
        expected = results(eager, atoms, wanted)
        for path in (scripted, package):
            got = results(str(path), atoms, wanted)
            for name in wanted:
                assert relative_error(got[name], expected[name]) < TOLERANCE[dtype], (path.name, name, atoms)


def test_aoti_package_with_ghosts_and_domains(deployed):
    """num_local < N (domains, LAMMPS): owned energies and all forces as the eager model gives them."""
    eager, _, package = deployed(*FAST_CASE)
    atoms = triclinic_alloy(seed=5, repeat=(2, 2, 2))
    expected = results(eager, atoms, ["energy", "forces", "stress"])
    atoms.calc = MLIPCalculator(str(package), skin=0.0, domain_threshold=1, domain_atoms=8)
    assert relative_error(atoms.get_potential_energy(), expected["energy"]) < 1e-4
    assert relative_error(atoms.get_forces(), expected["forces"]) < 1e-4
    assert relative_error(atoms.get_stress(), expected["stress"]) < 1e-4


def test_isolated_atom(deployed):
    """One node, no edges: the package was exported with N and E free down to zero."""
    from ase import Atoms

    _, _, package = deployed(*FAST_CASE)
    atoms = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    atoms.calc = MLIPCalculator(str(package))
    assert np.isclose(atoms.get_potential_energy(), -3.5)  # the reference energy of Cu
    assert np.abs(atoms.get_forces()).max() == 0.0


def test_container_is_chosen_by_content(deployed, tmp_path, capsys):
    _, scripted, package = deployed(*FAST_CASE)
    renamed_package, renamed_script = tmp_path / "model.bin", tmp_path / "script.pt2"
    shutil.copy(package, renamed_package)
    shutil.copy(scripted, renamed_script)
    atoms = triclinic_alloy()
    energies = [results(str(path), atoms, ["energy"])["energy"] for path in (renamed_package, renamed_script)]
    assert np.isclose(energies[0], energies[1], rtol=1e-6)
    assert main(["info", str(renamed_package)]) == 0
    out = capsys.readouterr().out
    assert "mlip-aoti" in out and f"torch_version            {torch.__version__.split('+')[0]}" in out


def rewrite_metadata(source, target, **changes):
    """A copy of the package at ``source`` whose mlip metadata has ``changes``."""
    import json

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            content = old.read(item)
            if item.filename.endswith("extra/mlip/metadata.json"):
                content = json.dumps(dict(json.loads(content), **changes)).encode()
            new.writestr(item, content)


def test_package_of_another_torch_or_device_is_refused(deployed, tmp_path):
    _, _, package = deployed(*FAST_CASE)
    other = tmp_path / "other.pt2"
    rewrite_metadata(package, other, torch_version="2.99.0")
    with pytest.raises(ModelFileError, match=r"torch 2\.99\.0.*this is torch"):
        load_model(other)
    rewrite_metadata(package, other, device="cuda")
    with pytest.raises(ModelFileError, match="compiled for device 'cuda'"):
        load_model(other)


def test_corrupt_package_is_refused(deployed, tmp_path):
    _, _, package = deployed(*FAST_CASE)
    broken = tmp_path / "broken.pt2"
    content = bytearray(package.read_bytes())
    broken.write_bytes(content[: len(content) // 2])  # truncated: a copy that was cut off
    with pytest.raises(ModelFileError, match="broken.pt2"):
        load_model(broken)
    with zipfile.ZipFile(package) as archive:  # the compiled library, garbled: the zip itself is intact
        library = next(i for i in archive.infolist() if i.filename.endswith(".so"))
    start = library.header_offset + 30 + len(library.filename) + len(library.extra)
    content[start:start + 4096] = bytes(4096)
    broken.write_bytes(content)
    with pytest.raises(ModelFileError, match="broken.pt2"):
        load_model(broken)


def test_aoti_without_compiler_fails_before_export(tmp_path, monkeypatch):
    from torch._inductor import config

    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    # config.patch, not monkeypatch.setattr: the latter's undo leaves Inductor's option hidden
    # ("config.cpp.cxx does not exist"), and every later AOTI export in the process fails.
    with config.patch({"cpp.cxx": ("no-such-compiler-mlip",)}), pytest.raises(RuntimeError, match="C.. compiler"):
        deploy_model(tiny_model("allegro"), tmp_path / "model.pt2", format="aoti")
    assert config.cpp.cxx != ("no-such-compiler-mlip",)
    assert os.listdir(tmp_path) == []


def test_deploy_format_and_name_must_agree(tmp_path, capsys):
    source = tmp_path / "model.pt"
    deploy_model(tiny_model("allegro"), source)
    assert main(["deploy", str(source), "-o", str(tmp_path / "x.pt"), "--format", "aoti"]) == 2
    assert "name AOTInductor packages *.pt2" in capsys.readouterr().err


def test_package_is_not_a_source_to_deploy(deployed, tmp_path, capsys):
    _, _, package = deployed(*FAST_CASE)
    assert main(["deploy", str(package), "-o", str(tmp_path / "x.pt")]) == 2
    assert "holds compiled code" in capsys.readouterr().err


def test_float64_deployment_of_a_float32_model(tmp_path):
    """One trained (float32) model, both precisions: float64 gives the float32 results to float32
    accuracy, and its forces are the derivatives of its energy to float64 accuracy."""
    model = tiny_model("nequip", "gradient", torch.float32)
    paths = {dtype: tmp_path / f"{dtype}.pt" for dtype in ("float32", "float64")}
    for dtype, path in paths.items():
        assert deploy_model(model, path, dtype=dtype)["dtype"] == dtype
        assert read_metadata(path)["dtype"] == dtype
    atoms = triclinic_alloy(seed=1)
    single, double = (results(str(paths[dtype]), atoms, ["energy", "forces", "stress"]) for dtype in paths)
    for name in single:
        assert relative_error(double[name], single[name]) < 1e-5, name
    # Central differences of the float64 energy (step 1e-4 Å: truncation ~1e-8, rounding ~1e-11).
    atoms.calc = MLIPCalculator(str(paths["float64"]), skin=0.0)
    step, numeric = 1e-4, []
    for atom, axis in [(0, 0), (3, 1), (7, 2), (11, 0)]:
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step
            moved.calc = atoms.calc
            energies.append(moved.get_potential_energy())
        numeric.append((-(energies[0] - energies[1]) / (2 * step), double["forces"][atom, axis]))
    numeric = np.array(numeric)
    assert np.abs(numeric[:, 0] - numeric[:, 1]).max() < 1e-6 * np.abs(double["forces"]).max()


@pytest.mark.slow
def test_package_compiled_for_two_threads(tmp_path):
    """Deployed and run with 2 torch threads, then run with 1, a one-species model: with Inductor's own
    lowering of the gathers' backward (index_add, before mlip.traced.index_adds_as_scatters) its forces were
    wrong (0.14-0.78 relative) and its energies right; the deploy check alone then fails."""
    from mlip.data.stats import DatasetStatistics
    from mlip.models import ModelConfig, build_model

    torch.manual_seed(0)
    statistics = DatasetStatistics(["Cu"], reference_energies=[-3.5], force_rms=5.0, avg_num_neighbors=20.0)
    config = ModelConfig("allegro", "small", "gradient", r_max=4.0,
                         overrides={"num_scalar": 16, "num_tensor": 8, "mlp_hidden": 16, "readout_hidden": 8})
    model = build_model(config, statistics, torch.float32).eval()
    torch.set_num_threads(2)
    try:
        assert deploy_model(model, tmp_path / "model.pt2", format="aoti")["threads"] == "run time"
        atoms = triclinic_alloy(seed=2)
        atoms.numbers[:] = 29
        expected = results(model, atoms, ["energy", "forces", "stress"])
        got_two = results(str(tmp_path / "model.pt2"), atoms, ["energy", "forces", "stress"])
    finally:
        torch.set_num_threads(1)
    got_one = results(str(tmp_path / "model.pt2"), atoms, ["energy", "forces", "stress"])
    for got in (got_two, got_one):
        for name in expected:
            assert relative_error(got[name], expected[name]) < 1e-4, name


@pytest.mark.slow
@pytest.mark.lammps
def test_lammps_runs_an_aoti_package(plugin, tmp_path):
    """`pair_coeff * * model.pt2 Si O`: the plugin loads the package through torch's C++ AOTI loader;
    a message-passing model (ghost centers, num_local < N) gives what ASE gives, and 2 ranks what 1
    rank gives over MD."""
    from test_lammps import (assert_close, assert_matches, calculator_results, md_script, rattled_crystal,
                             read_dump, run_lmp, run_zero, thermo_table, tiny_potential, write_data)

    scripted, package = str(tmp_path / "model.pt"), str(tmp_path / "model.pt2")
    potential = tiny_potential("nequip", num_layers=2)
    deploy_model(potential, scripted)
    deploy_model(potential, package, format="aoti")
    atoms = rattled_crystal(seed=12)
    expected = calculator_results(atoms, scripted, stress=True)
    assert_matches(calculator_results(atoms, package, stress=True), expected, 1e-9)
    assert_matches(run_zero(atoms, package, tmp_path), expected, 1e-8)
    data = write_data(atoms, tmp_path / "structure.data")
    results = []
    for ranks in (1, 2):
        output = run_lmp(md_script(data, package, steps=20), tmp_path, ranks)
        results.append((thermo_table(output), read_dump(tmp_path / "final.dump")))
    (thermo1, dump1), (thermo2, dump2) = results
    assert_close(thermo2, thermo1, 1e-9, "thermo")
    assert_close(dump2, dump1, 1e-9, "positions, forces, per-atom energies")


def check_rewrite(function, rewrite, inputs, sizes, removed, added, count):
    """Trace ``function`` on inputs(sizes[0]) with symbolic sizes, apply ``rewrite``: no op named
    ``removed`` is left, ``count`` ops named ``added`` are there, and the graph gives the function's
    own results at every size (float64, same sums up to order)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(function, tracing_mode="symbolic")(*inputs(sizes[0], 0))
    rewrite(graph)
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert not any(removed in target for target in targets) and sum(added in t for t in targets) == count
    for size in sizes:
        for got, expected in zip(graph(*inputs(size, size)), function(*inputs(size, size))):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_selects_become_gathers_with_the_same_rows():
    """mlip.traced.selects_as_gathers: index_select over dim 0 of 1-D, 2-D and 3-D tensors (a size known at run
    time only) becomes gather; the same values, at other sizes too."""
    from mlip.traced import selects_as_gathers

    def rows(flat, table, blocks, index):
        return flat.index_select(0, index), table.index_select(0, index), blocks.index_select(0, index[:2] % 2)

    def inputs(n, seed):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(n, generator=generator, dtype=torch.float64),
                torch.randn(n, 3, generator=generator, dtype=torch.float64),
                torch.randn(2, n, 4, generator=generator, dtype=torch.float64),
                torch.randint(0, n, (2 * n,), generator=generator))

    check_rewrite(rows, selects_as_gathers, inputs, (5, 9), "index_select", "gather", 3)


def test_index_adds_become_scatters_with_the_same_sums():
    """mlip.traced.index_adds_as_scatters: every index_add over dim 0 (2-D, 3-D with a size known at run time
    only, in place) becomes a scatter_add that gives the same tensor; the traced graph keeps working
    for other sizes."""
    from mlip.traced import index_adds_as_scatters

    def sums(rows, blocks, index, small_index):
        target = torch.zeros(5, rows.shape[1], dtype=rows.dtype).index_add(0, index, rows)
        per_block = torch.zeros(2, blocks.shape[1], 3, dtype=blocks.dtype).index_add(0, small_index, blocks)
        flat = torch.zeros(5, dtype=rows.dtype)
        flat.index_add_(0, index, rows[:, 0])
        return target, per_block, flat

    def inputs(edges, seed):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(edges, 4, generator=generator, dtype=torch.float64),
                torch.randn(4, edges, 3, generator=generator, dtype=torch.float64),
                torch.randint(0, 5, (edges,), generator=generator), torch.tensor([0, 1, 1, 0]))

    check_rewrite(sums, index_adds_as_scatters, inputs, (7, 12), "index_add", "scatter_add", 3)
