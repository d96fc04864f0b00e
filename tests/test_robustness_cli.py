"""Bad input on the command line: one row per bad input for every `mlip` verb.

Each row runs the real entry point (``mlip.cli.main(argv)``) and asserts a non-zero exit, exactly
one line on stderr, no traceback, and that the line names the culprit (the argument or the file).
A few checks run `mlip` in a subprocess (exit code, no traceback, --debug), and the rest check that
no work is lost: outputs are checked before the work, and written atomically.
"""

import errno
import os
import re
import subprocess
import sys

import pytest
import torch

from mlip.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))
NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths by name: tiny gradient- and direct-head model files, a training checkpoint (in a run
    directory and under a model-like name), labelled and unlabelled structures, bad files."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlip.deploy import deploy_model
    from mlip.train.checkpoint import save_checkpoint

    sys.path.insert(0, TESTS)
    from physics import tiny_model

    root = tmp_path_factory.mktemp("bad_input")
    paths = {name: str(root / name) for name in (
        "grad.pt", "direct.pt", "empty.xyz", "garbage.xyz", "dir", "missing.xyz", "labelled.extxyz",
        "nolabels.extxyz", "config.yaml", "cuda.yaml", "garbage_data.yaml", "overrides.yaml", "nan.extxyz", "run", "checkpoint_named_model.pt")}
    torch.set_num_threads(1)
    deploy_model(tiny_model("allegro", r_max=3.0), paths["grad.pt"])
    deploy_model(tiny_model("allegro", head="direct", r_max=3.0), paths["direct.pt"])
    open(paths["empty.xyz"], "w").close()
    with open(paths["garbage.xyz"], "w") as f:
        f.write("this is not a structure\n")
    os.mkdir(paths["dir"])
    os.mkdir(paths["run"])
    save_checkpoint({"weights": torch.zeros(3)}, os.path.join(paths["run"], "last.pt"))
    save_checkpoint({"weights": torch.zeros(3)}, paths["checkpoint_named_model.pt"])
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    ase.io.write(paths["nolabels.extxyz"], crystal)
    broken = crystal.copy()
    broken.positions[1, 0] = float("nan")
    ase.io.write(paths["nan.extxyz"], broken)
    crystal.calc = SinglePointCalculator(crystal, energy=-14.0, forces=crystal.positions * 0)
    ase.io.write(paths["labelled.extxyz"], crystal)
    with open(paths["config.yaml"], "w") as f:
        f.write(f"data:\n  train: [{paths['labelled.extxyz']}]\n")
    with open(paths["garbage_data.yaml"], "w") as f:
        f.write(f"data:\n  train: [{paths['labelled.extxyz']}, {paths['garbage.xyz']}]\n")
    with open(paths["overrides.yaml"], "w") as f:
        f.write(f"model:\n  overrides: {{num_scalar: abc}}\ndata:\n  train: [{paths['labelled.extxyz']}]\n")
    with open(paths["cuda.yaml"], "w") as f:
        f.write(f"device: cuda\nrun_dir: cuda_run\ndata:\n  train: [{paths['labelled.extxyz']}]\n")
    paths["missing_dir/out.extxyz"] = str(root / "missing_dir" / "out.extxyz")
    return paths


# (id, argv with {file} placeholders, text the one error line must contain: the culprit[, mark])
MODEL_STRUCTURE = ["{grad.pt}", "bulk:Cu:fcc:3.6"]
MD = ["md", *MODEL_STRUCTURE, "--temperature", "300", "--steps", "2"]
RELAX = ["relax", *MODEL_STRUCTURE, "--steps", "2"]
ROWS = [
    # global
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["fly"], "fly"),
    # train
    ("train-no-config", ["train"], "CONFIG"),
    ("train-config-missing", ["train", "{missing.xyz}"], "missing.xyz"),
    ("train-config-directory", ["train", "{dir}"], "is a directory"),
    ("train-config-empty", ["train", "{empty.xyz}"], "empty.xyz"),
    ("train-config-garbage", ["train", "{garbage.xyz}"], "garbage.xyz"),
    ("train-max-epochs-negative", ["train", "{config.yaml}", "--max-epochs", "-1"], "--max-epochs"),
    ("train-max-epochs-float", ["train", "{config.yaml}", "--max-epochs", "2.5"], "--max-epochs"),
    ("train-max-minutes-nan", ["train", "{config.yaml}", "--max-minutes", "nan"], "--max-minutes"),
    ("train-max-minutes-zero", ["train", "{config.yaml}", "--max-minutes", "0"], "--max-minutes"),
    ("train-resume-a-file", ["train", "--resume", "{grad.pt}"], "--resume"),
    ("train-resume-without-last", ["train", "--resume", "{dir}"], "last.pt"),
    ("train-resume-and-config", ["train", "{config.yaml}", "--resume", "{run}"], "--resume"),
    ("train-run-dir-is-a-file", ["train", "{config.yaml}", "--run-dir", "{garbage.xyz}"], "garbage.xyz"),
    ("train-init-from-missing", ["train", "{config.yaml}", "--init-from", "{missing.xyz}"], "--init-from"),
    ("train-override-wrong-type", ["train", "{overrides.yaml}"], "num_scalar"),
    ("train-data-garbage", ["train", "{garbage_data.yaml}"], "garbage.xyz"),
    ("train-device-cuda", ["train", "{cuda.yaml}"], "device", NEEDS_NO_CUDA),
    # deploy
    ("deploy-output-is-its-input", ["deploy", "{grad.pt}", "-o", "{grad.pt}"], "--output"),
    ("deploy-output-is-last.pt", ["deploy", "{grad.pt}", "-o", "{run}/last.pt"], "last.pt"),
    ("deploy-output-is-input-run", ["deploy", "{run}", "-o", "{run}/last.pt"], "last.pt"),
    ("deploy-output-is-a-checkpoint", ["deploy", "{grad.pt}", "-o", "{checkpoint_named_model.pt}"],
     "checkpoint_named_model.pt"),
    ("deploy-output-directory", ["deploy", "{grad.pt}", "-o", "{dir}"], "--output"),
    ("deploy-output-dir-missing", ["deploy", "{grad.pt}", "-o", "{missing_dir/out.extxyz}"], "missing_dir"),
    ("deploy-output-device", ["deploy", "{grad.pt}", "-o", os.devnull], os.devnull),
    ("deploy-input-missing", ["deploy", "{missing.xyz}", "-o", "{dir}/m.pt"], "missing.xyz"),
    ("deploy-input-garbage", ["deploy", "{garbage.xyz}", "-o", "{dir}/m.pt"], "garbage.xyz"),
    ("deploy-input-empty", ["deploy", "{empty.xyz}", "-o", "{dir}/m.pt"], "empty.xyz"),
    ("deploy-run-without-checkpoint", ["deploy", "{dir}", "-o", "{dir}/m.pt"], "last.pt"),
    ("deploy-input-twice", ["deploy", "{grad.pt}", "{grad.pt}", "-o", "{dir}/m.pt"], "grad.pt"),
    ("deploy-member-0", ["deploy", "{grad.pt}", "--member", "0", "-o", "{dir}/m.pt"], "--member"),
    ("deploy-member-99", ["deploy", "{grad.pt}", "--member", "99", "-o", "{dir}/m.pt"], "--member"),
    ("deploy-no-ema-of-model-file", ["deploy", "{grad.pt}", "--no-ema", "-o", "{dir}/m.pt"], "--no-ema"),
    # info
    ("info-missing", ["info", "{missing.xyz}"], "missing.xyz"),
    ("info-directory", ["info", "{dir}"], "is a directory"),
    ("info-empty", ["info", "{empty.xyz}"], "empty.xyz"),
    ("info-not-a-model", ["info", "{garbage.xyz}"], "garbage.xyz"),
    ("info-a-checkpoint", ["info", "{run}/last.pt"], "last.pt"),
    # evaluate
    ("evaluate-model-missing", ["evaluate", "{missing.xyz}", "{labelled.extxyz}"], "missing.xyz"),
    ("evaluate-model-directory", ["evaluate", "{dir}", "{labelled.extxyz}"], "is a directory"),
    ("evaluate-model-checkpoint", ["evaluate", "{run}/last.pt", "{labelled.extxyz}"], "last.pt"),
    ("evaluate-data-garbage", ["evaluate", "{grad.pt}", "{garbage.xyz}"], "garbage.xyz"),
    ("evaluate-data-empty", ["evaluate", "{grad.pt}", "{empty.xyz}"], "empty.xyz"),
    ("evaluate-data-missing", ["evaluate", "{grad.pt}", "{missing.xyz}"], "missing.xyz"),
    ("evaluate-data-without-labels", ["evaluate", "{grad.pt}", "{nolabels.extxyz}"], "energy"),
    ("evaluate-json-dir-missing", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--json",
                                   "{missing_dir/out.extxyz}"], "missing_dir"),
    ("evaluate-json-directory", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--json", "{dir}"], "--json"),
    ("evaluate-plots-a-file", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--plots", "{garbage.xyz}"],
     "--plots"),
    ("evaluate-plots-under-a-file", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--plots", "{garbage.xyz}/plots"],
     "--plots"),
    ("evaluate-threads-0", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--threads", "0"], "--threads"),
    ("evaluate-keys", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--keys", "energy"], "--keys"),
    ("evaluate-device-cuda", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--device", "cuda"], "--device",
     NEEDS_NO_CUDA),
    ("evaluate-device-garbage", ["evaluate", "{grad.pt}", "{labelled.extxyz}", "--device", "gpu0"], "--device"),
    # predict (before the model is asked whether it is a property model)
    ("predict-model-missing", ["predict", "{missing.xyz}", "{labelled.extxyz}"], "missing.xyz"),
    ("predict-model-not-a-model", ["predict", "{garbage.xyz}", "{labelled.extxyz}"], "garbage.xyz"),
    ("predict-data-garbage", ["predict", "{grad.pt}", "{garbage.xyz}"], "garbage.xyz"),
    ("predict-data-missing", ["predict", "{grad.pt}", "{missing.xyz}"], "missing.xyz"),
    ("predict-output-dir-missing", ["predict", "{grad.pt}", "{labelled.extxyz}", "-o", "{missing_dir/out.extxyz}"],
     "missing_dir"),
    ("predict-csv-directory", ["predict", "{grad.pt}", "{labelled.extxyz}", "--csv", "{dir}"], "--csv"),
    ("predict-batch-atoms-zero", ["predict", "{grad.pt}", "{labelled.extxyz}", "--batch-atoms", "0"], "--batch-atoms"),
    ("predict-a-potential", ["predict", "{grad.pt}", "{labelled.extxyz}"], "is a potential"),
    # md: numbers
    ("md-temperature-nan", ["md", *MODEL_STRUCTURE, "--temperature", "nan", "--steps", "2"], "--temperature"),
    ("md-temperature-negative", ["md", *MODEL_STRUCTURE, "--temperature", "-5", "--steps", "2"], "--temperature"),
    ("md-timestep-inf", MD + ["--timestep", "inf"], "--timestep"),
    ("md-timestep-zero", MD + ["--timestep", "0"], "--timestep"),
    ("md-friction-negative", MD + ["--friction", "-1"], "--friction"),
    ("md-pressure-nan", MD + ["--ensemble", "npt", "--pressure", "nan"], "--pressure"),
    ("md-steps-negative", ["md", *MODEL_STRUCTURE, "--temperature", "300", "--steps", "-1"], "--steps"),
    ("md-steps-not-integer", ["md", *MODEL_STRUCTURE, "--temperature", "300", "--steps", "1e3"], "--steps"),
    ("md-interval-zero", MD + ["--interval", "0"], "--interval"),
    ("md-seed-negative", MD + ["--seed", "-1"], "--seed"),
    ("md-device-cuda", MD + ["--device", "cuda"], "--device", NEEDS_NO_CUDA),
    # md: outputs, models, structures
    ("md-traj-dir-missing", MD + ["--traj", "{missing_dir/out.extxyz}"], "missing_dir"),
    ("md-traj-directory", MD + ["--traj", "{dir}"], "--traj"),
    ("md-traj-unknown-format", MD + ["--traj", "{dir}/md.unknown"], "--traj"),
    ("md-traj-one-frame-format", MD + ["--traj", "{dir}/POSCAR", "--interval", "1"], "--traj"),
    ("md-npt-direct-model", ["md", "{direct.pt}", "bulk:Cu:fcc:3.6", "--temperature", "300", "--steps", "2",
                             "--ensemble", "npt"], "direct.pt"),
    ("md-npt-molecule", ["md", "{grad.pt}", "molecule:H2O", "--temperature", "300", "--steps", "2", "--ensemble",
                         "npt"], "periodic"),
    ("md-model-directory", ["md", "{dir}", "bulk:Cu:fcc:3.6", "--temperature", "300", "--steps", "2"], "dir"),
    ("md-model-not-a-model", ["md", "{garbage.xyz}", "bulk:Cu:fcc:3.6", "--temperature", "300", "--steps", "2"],
     "garbage.xyz"),
    ("md-element-the-model-lacks", ["md", "{grad.pt}", "bulk:Au:fcc:4.0", "--temperature", "300", "--steps", "2"],
     "Au"),
    ("md-structure-empty-file", ["md", "{grad.pt}", "{empty.xyz}", "--temperature", "300", "--steps", "2"],
     "empty.xyz"),
    # relax: numbers, outputs, models
    ("relax-fmax-zero", RELAX + ["--fmax", "0"], "--fmax"),
    ("relax-fmax-nan", RELAX + ["--fmax", "nan"], "--fmax"),
    ("relax-steps-negative", ["relax", *MODEL_STRUCTURE, "--steps", "-3"], "--steps"),
    ("relax-output-dir-missing", RELAX + ["-o", "{missing_dir/out.extxyz}"], "missing_dir"),
    ("relax-output-directory", RELAX + ["-o", "{dir}"], "--output"),
    ("relax-cell-direct-model", ["relax", "{direct.pt}", "bulk:Cu:fcc:3.6", "--cell"], "direct.pt"),
    ("relax-cell-molecule", ["relax", "{grad.pt}", "molecule:H2O", "--cell"], "periodic"),
    ("relax-output-model-file", RELAX + ["-o", "{grad.pt}"], "--output"),
    ("relax-optimizer", RELAX + ["--optimizer", "LBFGS"], "--optimizer"),
    # build-lammps-plugin
    ("build-lammps-plugin-unknown-option", ["build-lammps-plugin", "--jobs", "4"], "--jobs"),
]
# Structures, through `mlip relax` (the same reader serves `mlip md`).
STRUCTURES = [
    ("empty-file", "{empty.xyz}", "empty.xyz"),
    ("garbage-file", "{garbage.xyz}", "garbage.xyz"),
    ("directory", "{dir}", "is a directory"),
    ("missing-file", "{missing.xyz}", "missing.xyz"),
    ("zero-lattice-constant", "bulk:Si:diamond:0", "bulk:Si:diamond:0"),
    ("negative-lattice-constant", "bulk:Si:diamond:-1", "bulk:Si:diamond:-1"),
    ("nan-lattice-constant", "bulk:Si:diamond:nan", "bulk:Si:diamond:nan"),
    ("text-lattice-constant", "bulk:Si:diamond:abc", "bulk:Si:diamond:abc"),
    ("unknown-element", "bulk:Xx:fcc:4", "Xx"),
    ("unknown-crystal", "bulk:Cu:quasicrystal:4", "quasicrystal"),
    ("zero-repeat", "bulk:Si:diamond:5.43:0x1x1", "0x1x1"),
    ("bad-repeat", "bulk:Si:diamond:5.43:2x2", "2x2"),
    ("too-many-fields", "bulk:Si:diamond:5.43:1x1x1:9", "bulk:Si:diamond:5.43:1x1x1:9"),
    ("unknown-molecule", "molecule:XYZZY", "XYZZY"),
    ("nan-position", "{nan.extxyz}", "nan.extxyz"),
    ("overlapping-cell", "bulk:Cu:fcc:0.3", "bulk:Cu:fcc:0.3"),
    ("element-the-model-lacks", "bulk:Si:diamond:5.43", "Si"),
]
ROWS += [(f"structure-{name}", ["relax", "{grad.pt}", spec, "--steps", "1"], culprit)
         for name, spec, culprit in STRUCTURES]


def fill(argv, files):
    """{name} -> the path of that file (names hold dots, so not str.format)."""
    return [re.sub(r"\{([^{}]+)\}", lambda match: files[match.group(1)], arg) for arg in argv]


def assert_one_line(capsys, code: int, culprit: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("argv, culprit", [pytest.param(*row[1:3], id=row[0], marks=row[3:]) for row in ROWS])
def test_bad_input_gives_one_line_naming_it(files, capsys, argv, culprit):
    code = main(fill(argv, files))
    line = assert_one_line(capsys, code, culprit)
    assert line.startswith("mlip")
    assert not os.path.exists(os.path.dirname(files["missing_dir/out.extxyz"]))


# --- the real process: exit code, no traceback, --debug ------------------------------------------------
def run_mlip(*argv, **env):
    environment = dict(os.environ, PYTHONPATH=os.path.dirname(TESTS), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "mlip.cli", *argv], capture_output=True, text=True,
                          env=environment, timeout=300)


def test_process_exits_non_zero_with_one_line(files):
    result = run_mlip("relax", files["grad.pt"], "bulk:Si:diamond:0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mlip relax: error: structure spec 'bulk:Si:diamond:0': the lattice constant must be a positive number "
        "of Å, got '0'"]


def test_debug_shows_the_traceback(files):
    result = run_mlip("--debug", "info", files["garbage.xyz"])
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "garbage.xyz" in result.stderr


@pytest.mark.parametrize("where", ["before the command", "after the command", "MLIP_DEBUG=1"])
def test_debug_raises_in_process(files, monkeypatch, where):
    from mlip.deploy.model_file import ModelFileError

    argv = ["info", files["garbage.xyz"]]
    if where == "before the command":
        argv = ["--debug"] + argv
    elif where == "after the command":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv("MLIP_DEBUG", "1")
    with pytest.raises(ModelFileError, match="garbage.xyz"):
        main(argv)


def test_programming_errors_keep_their_traceback(monkeypatch, files):
    """A bug (TypeError, AttributeError, ...) is not dressed up as a user error."""
    import mlip.deploy.cli as deploy_cli

    monkeypatch.setattr(deploy_cli, "run_info", lambda args: None + 1)
    with pytest.raises(TypeError):
        main(["info", files["grad.pt"]])


def test_multi_line_errors_become_one_line(monkeypatch, capsys):
    """A compiler's (or torch's C++) multi-line message: its first line, and where the rest is."""
    import mlip.lammps.build as build

    def fail(**kwargs):
        raise RuntimeError("compiling the LAMMPS plugin failed (exit 1):\npair_mlip.cpp:1: error: ...\nmore")

    monkeypatch.setattr(build, "build_plugin", fail)
    line = assert_one_line(capsys, main(["build-lammps-plugin"]), "compiling the LAMMPS plugin failed")
    assert "--debug" in line


# --- direct-force models -------------------------------------------------------------------------------------------
def test_relax_positions_with_a_direct_force_model_on_a_periodic_cell(files, tmp_path, capsys):
    """No stress is asked of a head that gives none: the relaxation runs and its output is written."""
    import ase.io

    output = tmp_path / "relaxed.extxyz"
    code = main(["relax", files["direct.pt"], "bulk:Cu:fcc:3.6", "--steps", "2", "-o", str(output)])
    assert code in (0, 1)  # 1: not converged in 2 steps
    out = capsys.readouterr().out
    assert "cell lengths" in out and "stress" not in out
    assert len(ase.io.read(output)) == 4


# --- no lost work: atomic outputs -------------------------------------------------------------------------------
def temporary_files(directory):
    return [name for name in os.listdir(directory) if name.startswith(".") or name.endswith(".tmp")]


def test_deploy_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_file(files, tmp_path, monkeypatch, capsys):
    """The disk filling half-way through the write (ENOSPC): one line naming the file, the model
    file already there untouched, no temporary file left."""
    import builtins
    import shutil

    import mlip.deploy.model_file as model_file

    target = tmp_path / "model.pt"
    shutil.copy(files["direct.pt"], target)
    before = target.read_bytes()

    class FullDisk:
        def __init__(self, path, mode):
            self.file = builtins.open(path, mode)

        def write(self, data):
            self.file.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(model_file, "open", FullDisk, raising=False)  # the module's own writes only
    line = assert_one_line(capsys, main(["deploy", files["grad.pt"], "-o", str(target)]), str(target))
    assert "No space left on device" in line
    assert target.read_bytes() == before
    assert temporary_files(tmp_path) == []


@pytest.mark.slow  # a subprocess (~10-15 s on a loaded 2-core machine)
def test_deploy_on_a_real_full_file_system(files, tmp_path):
    """A 32 KiB tmpfs (needs root and mount; skipped elsewhere): one line, exit 2, nothing left there."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = run_mlip("deploy", files["grad.pt"], "-o", str(small / "model.pt"))
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "model.pt" in result.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_deploy_may_replace_a_model_file(files, tmp_path, capsys):
    import shutil

    from mlip.deploy.model_file import read_metadata

    target = tmp_path / "model.pt"
    shutil.copy(files["direct.pt"], target)
    assert main(["deploy", files["grad.pt"], "-o", str(target)]) == 0
    assert read_metadata(target)["force_head"] == "gradient"
    assert temporary_files(tmp_path) == []


def test_relax_output_on_a_full_disk_keeps_the_old_file(files, tmp_path, monkeypatch, capsys):
    import ase.io

    target = tmp_path / "relaxed.extxyz"
    target.write_text("previous result\n")
    write = ase.io.write

    def full_disk(path, *args, **kwargs):
        write(path, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(ase.io, "write", full_disk)
    code = main(["relax", files["grad.pt"], "bulk:Cu:fcc:3.6", "--steps", "1", "-o", str(target)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last == f"mlip relax: error: {target}: No space left on device"
    assert target.read_text() == "previous result\n"
    assert temporary_files(tmp_path) == []


def test_interrupted_md_keeps_the_frames_written(files, tmp_path, monkeypatch, capsys):
    """A blow-up (atoms too close) or Ctrl-C at step 4 of 100: the trajectory keeps steps 0, 2, 4."""
    import ase.io

    import mlip.calculators.cli as calculators_cli

    make_dynamics = calculators_cli.make_dynamics

    def interrupted(*args, **kwargs):
        dyn = make_dynamics(*args, **kwargs)
        run = dyn.run

        def run_then_interrupt(steps):
            run(4)
            raise ValueError("atoms 0 and 1 are 0.3 Å apart")  # what the calculator says after a blow-up

        dyn.run = run_then_interrupt
        return dyn

    monkeypatch.setattr(calculators_cli, "make_dynamics", interrupted)
    trajectory = tmp_path / "md.extxyz"
    code = main(["md", files["grad.pt"], "bulk:Cu:fcc:3.6", "--temperature", "300", "--steps", "100",
                 "--interval", "2", "--traj", str(trajectory)])
    assert code == 2
    err = capsys.readouterr().err
    assert "kept the 3 frames" in err and "0.3 Å apart" in err.strip().splitlines()[-1]
    assert len(ase.io.read(trajectory, ":")) == 3
    assert temporary_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_directory_is_refused_before_the_work(files, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["relax", files["grad.pt"], "bulk:Cu:fcc:3.6", "-o", str(locked / "out.extxyz")])
        assert "not writable" in assert_one_line(capsys, code, "--output")
    finally:
        locked.chmod(0o700)


def test_stopped_relaxation_keeps_its_latest_structure(files, tmp_path, monkeypatch, capsys):
    """An error (or Ctrl-C) at the 4th force call: -o gets the structure of the last completed step."""
    import ase.io

    from mlip.calculators.ase import MLIPCalculator

    calls = []
    calculate = MLIPCalculator.calculate

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("atoms 0 and 1 are 0.3 Å apart")
        return calculate(self, *args, **kwargs)

    monkeypatch.setattr(MLIPCalculator, "calculate", failing)
    from ase.build import bulk

    rattled = bulk("Cu", "fcc", a=3.6, cubic=True)
    rattled.rattle(0.05, seed=0)
    ase.io.write(tmp_path / "rattled.extxyz", rattled)
    output = tmp_path / "relaxed.extxyz"
    code = main(["relax", files["grad.pt"], str(tmp_path / "rattled.extxyz"), "--fmax", "1e-6", "-o", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and "wrote the latest structure" in err and "0.3 Å apart" in err.strip().splitlines()[-1]
    assert len(ase.io.read(output)) == 4
    assert temporary_files(tmp_path) == []
