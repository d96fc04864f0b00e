"""Training, exact resumption, deployment and evaluation on small EMT-labelled copper cells."""

import json
import os
import signal

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlip import MLIPCalculator
from mlip.cli import main
from mlip.data import collate, keys
from mlip.deploy import ModelFileError, load_model, read_metadata
from mlip.train import (
    CheckpointError, ConfigError, config_from_dict, load_checkpoint, load_config, model_from_checkpoint, resume,
    train,
)
from mlip.train.evaluate import evaluate

TINY = {
    "allegro": {"num_scalar": 8, "num_tensor": 8, "mlp_hidden": 16, "readout_hidden": 8},
    "nequip": {"num_features": 8, "radial_hidden": 16},
}


def emt_copper(n: int = 30, seed: int = 0):
    """Rattled, strained 4- and 8-atom fcc Cu cells with EMT energy, forces and stress."""
    rng = np.random.default_rng(seed)
    structures = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 * rng.uniform(0.97, 1.03), cubic=True)
        if k % 2:
            atoms = atoms.repeat((2, 1, 1))
        atoms.positions += rng.normal(scale=0.12, size=atoms.positions.shape)
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        atoms.info["config_type"] = "cell8" if k % 2 else "cell4"
        structures.append(atoms)
    return structures


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cu_emt.extxyz"
    ase.io.write(path, emt_copper(), format="extxyz")
    return str(path)


def tiny_config(data_file, run_dir, family="allegro", head="gradient", **changes):
    raw = {
        "run_dir": str(run_dir),
        "data": {"train": [data_file], "val_fraction": 0.2},
        "model": {"family": family, "head": head, "r_max": 4.0, "overrides": TINY[family]},
        "optimizer": {"lr": 0.01, "ema_decay": 0.9},
        "loss": {"energy_per_atom": 1.0, "forces": 1.0, "stress": 10.0 if head == "gradient" else 0.0},
        "stop": {"max_epochs": 30},
        "batch_size": 4,
        "threads": 1,  # on a shared 2-core machine two threads per process can be 10-40x slower
        "progress": False,
    }
    for section, values in changes.items():
        if isinstance(values, dict):
            raw[section] = {**raw.get(section, {}), **values}
        else:
            raw[section] = values
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def trained_run(data_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "allegro"
    return train(tiny_config(data_file, run_dir))


def test_training_lowers_validation_force_error(trained_run):
    rows = trained_run.history
    assert rows[0]["epoch"] == 0 and rows[0]["train_loss"] is None  # the untrained model
    before, after = rows[0]["val_forces_mae"], min(r["val_forces_mae"] for r in rows[1:])
    print(f"validation force MAE: untrained {1000 * before:.0f} meV/Å -> trained {1000 * after:.0f} meV/Å")
    assert after < before / 3.0
    assert rows[-1]["val_energy_per_atom_mae"] < rows[0]["val_energy_per_atom_mae"] / 3.0
    run = trained_run.run_dir
    for name in ("last.pt", "best.pt", "log.jsonl", "learning_curve.png", "config.yaml"):
        assert os.path.exists(os.path.join(run, name)), name
    with open(os.path.join(run, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["epoch"] for r in logged] == list(range(31))
    assert {"lr", "elapsed_s", "train_loss", "val_forces_rmse", "val_stress_mae"} <= set(logged[-1])
    assert load_checkpoint(os.path.join(run, "best.pt"))["position"]["epoch"] == trained_run.best_epoch


def _weights(run_dir):
    state = load_checkpoint(os.path.join(run_dir, "last.pt"))
    weights = {f"model.{k}": v for k, v in state["model"].items()}
    weights.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    return state, weights


class Killed(Exception):
    pass


@pytest.mark.parametrize("interruption", ["kill_mid_epoch", "epoch_limit", "wall_clock", "sigint", "sigterm"])
def test_resume_reproduces_uninterrupted_run(data_file, tmp_path, interruption):
    """N epochs straight == k epochs, interrupted, resumed to N (weights, EMA, log)."""
    settings = dict(family="nequip", stop={"max_epochs": 4}, checkpoint_every_steps=2,
                    schedule={"name": "cosine", "warmup_epochs": 1.5, "cosine_epochs": 4})  # the lr changes at every step
    straight = train(tiny_config(data_file, tmp_path / "straight", **settings))

    interrupted = tiny_config(data_file, tmp_path / "interrupted", **settings)
    if interruption == "kill_mid_epoch":  # 6 batches per epoch: step 9 is inside epoch 2, after the step-8 save
        def kill(trainer):
            if trainer.step == 9:
                raise Killed()

        with pytest.raises(Killed):
            train(interrupted, on_step=kill)
        assert load_checkpoint(tmp_path / "interrupted")["position"] == {
            "epoch": 1, "step": 8, "batch_in_epoch": 2, "seed": 0}
        result = resume(str(tmp_path / "interrupted"))
    elif interruption in ("sigint", "sigterm"):  # Ctrl-C or a batch system's time limit at step 9
        signum = signal.SIGINT if interruption == "sigint" else signal.SIGTERM

        def signal_at_step_9(trainer):
            if trainer.step == 9:
                os.kill(os.getpid(), signum)

        # The handlers before the run (SIG_IGN for SIGINT in a job started in the background by a shell).
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        with pytest.raises(KeyboardInterrupt, match=f"stopped by {signum.name} at step 9.*--resume"):
            train(interrupted, on_step=signal_at_step_9)
        assert load_checkpoint(tmp_path / "interrupted")["position"] == {  # no step lost, none half done
            "epoch": 1, "step": 9, "batch_in_epoch": 3, "seed": 0}
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # handlers given back
        result = resume(str(tmp_path / "interrupted"))
    elif interruption == "epoch_limit":
        interrupted.stop.max_epochs = 2
        assert train(interrupted).epochs == 2
        result = resume(str(tmp_path / "interrupted"), max_epochs=4)
    else:  # a wall-clock budget that runs out after the first step
        interrupted.stop.max_minutes = 1e-6
        stopped = train(interrupted)
        assert stopped.stop_reason == "max_minutes" and stopped.steps == 1
        result = resume(str(tmp_path / "interrupted"), max_minutes=60.0)

    assert (result.epochs, result.steps) == (straight.epochs, straight.steps)
    state_a, a = _weights(straight.run_dir)
    state_b, b = _weights(result.run_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert state_b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(state_a["optimizer"]["param_groups"][0]["lr"])
    assert state_a["optimizer"]["param_groups"][0]["lr"] < 0.001  # the schedule did act
    for row_a, row_b in zip(straight.history, result.history):
        assert row_b["val_forces_mae"] == pytest.approx(row_a["val_forces_mae"], rel=1e-5)
    assert len(result.history) == len(straight.history) == 5


@pytest.fixture(scope="module")
def deployed(trained_run, tmp_path_factory):
    model_path = tmp_path_factory.mktemp("deployed") / "model.pt"
    assert main(["deploy", trained_run.run_dir, "-o", str(model_path)]) == 0
    return model_path


def test_deploy_load_predicts_like_the_trained_model(trained_run, deployed, data_file, tmp_path, capsys):
    model_path = deployed
    checkpoint = load_checkpoint(os.path.join(trained_run.run_dir, "best.pt"))
    model = model_from_checkpoint(checkpoint)  # EMA weights, as deployed

    structures = ase.io.read(data_file, ":")[:6]
    from mlip.data import TypeMapper, atoms_to_graph

    graphs = [atoms_to_graph(a, 4.0, TypeMapper(["Cu"])) for a in structures]
    batch = collate(graphs, torch.float32)
    expected = model(batch)
    calculator = MLIPCalculator(str(model_path))
    for b, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calculator
        in_batch = (batch[keys.BATCH] == b).numpy()
        np.testing.assert_allclose(atoms.get_potential_energy(), float(expected[keys.ENERGY][b].detach()), rtol=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), expected[keys.FORCES].detach().numpy()[in_batch],
                                   atol=2e-5)
        stress = expected[keys.STRESS][b].detach().double().numpy()
        voigt = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        np.testing.assert_allclose(atoms.get_stress(), voigt, atol=2e-6)

    capsys.readouterr()
    assert main(["info", str(model_path), "--json"]) == 0
    metadata = json.loads(capsys.readouterr().out)
    assert metadata["training_data_hash"] == checkpoint["training_data_hash"]
    assert metadata["type_names"] == ["Cu"] and metadata["force_head"] == "gradient"

    out_json, plots = tmp_path / "errors.json", tmp_path / "plots"
    assert main(["evaluate", str(model_path), data_file, "--keys", "energy=energy,forces=forces,stress=stress",
                 "--json", str(out_json), "--plots", str(plots)]) == 0
    table = capsys.readouterr().out
    assert "cell4" in table and "cell8" in table
    report = json.loads(out_json.read_text())
    result = report["files"][data_file]
    assert result["num_structures"] == 30 and set(result["config_types"]) == {"cell4", "cell8"}
    for quantity in ("energy", "energy_per_atom", "forces", "stress"):
        assert result["all"][f"{quantity}_mae"] <= result["all"][f"{quantity}_rmse"]
    assert result["all"]["stress_count"] == 30 * 9
    assert os.path.exists(plots / "parity_cu_emt.png")


def test_redeploying_a_model_file_keeps_its_predictions_and_metadata(deployed, data_file, tmp_path, capsys):
    """`mlip deploy model.pt -o new.pt` re-compiles a model file with this mlip (e.g. to get newer
    kernels): same weights, same metadata, same energies, forces and stress."""
    redeployed = tmp_path / "redeployed.pt"
    # A model file holds only its deployed weights: asking for the raw ones is an error, not ignored.
    assert main(["deploy", str(deployed), "-o", str(redeployed), "--no-ema"]) == 2
    assert "--no-ema needs a training checkpoint" in capsys.readouterr().err and not redeployed.exists()
    assert main(["deploy", str(deployed), "-o", str(redeployed)]) == 0
    old_metadata, new_metadata = read_metadata(str(deployed)), read_metadata(str(redeployed))
    for key in ("type_names", "r_max", "dtype", "hyperparameters", "statistics", "model_config", "training_data_hash"):
        assert new_metadata[key] == old_metadata[key], key
    calculators = [MLIPCalculator(str(path)) for path in (deployed, redeployed)]
    for atoms in ase.io.read(data_file, ":")[:4]:
        results = []
        for calculator in calculators:
            atoms.calc = calculator
            results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
        np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
        np.testing.assert_allclose(results[1][1], results[0][1], atol=1e-5)
        np.testing.assert_allclose(results[1][2], results[0][2], atol=1e-6)


def test_corrupt_files_give_clear_errors(trained_run, deployed, tmp_path, capsys):
    model_path = deployed
    content = model_path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(content[: len(content) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(ModelFileError, match="corrupt or truncated"):
            load_model(bad)
        capsys.readouterr()
        assert main(["info", str(bad)]) == 2
        assert "corrupt or truncated" in capsys.readouterr().err

    checkpoint = (tmp_path / "last.pt")
    checkpoint.write_bytes(open(os.path.join(trained_run.run_dir, "last.pt"), "rb").read()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="deployed model file"):
        load_checkpoint(model_path)  # a deployed model is not a checkpoint


def test_unknown_config_key_is_named(tmp_path, data_file, capsys):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in optimizer; allowed: .*'lr'"):
        config_from_dict({"data": {"train": [data_file]}, "optimizer": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochs'\] at the top level"):
        config_from_dict({"data": {"train": [data_file]}, "epochs": 3})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_layer'\] in model"):
        config_from_dict({"data": {"train": [data_file]}, "model": {"num_layer": 3}})
    with pytest.raises(ConfigError, match=r"schedule.name: 'linear' is not one of"):
        config_from_dict({"data": {"train": [data_file]}, "schedule": {"name": "linear"}})

    path = tmp_path / "train.yaml"
    path.write_text(f"data:\n  train: {data_file}\n  valfraction: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.yaml: unknown key\(s\) \['valfraction'\] in data"):
        load_config(path)
    assert main(["train", str(path)]) == 2
    assert "valfraction" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["run_dir", "deployed_file"])
def test_init_from_starts_at_the_source_weights(trained_run, deployed, data_file, tmp_path, source):
    """Fine-tuning starts from the source's best (EMA) weights and statistics; it is not a resume.
    A deployed model file (e.g. a shipped potential) serves as well as the run it came from."""
    config = tiny_config(data_file, tmp_path / "finetune", stop={"max_epochs": 0})
    config.init_from = trained_run.run_dir if source == "run_dir" else str(deployed)
    result = train(config)
    # Same data, same split: the untrained row of the new run is the source's best epoch.
    source_best = trained_run.history[trained_run.best_epoch]
    assert result.history[0]["val_forces_mae"] == pytest.approx(source_best["val_forces_mae"], rel=1e-5)
    assert result.history[0]["val_energy_mae"] == pytest.approx(source_best["val_energy_mae"], rel=1e-5)
    assert result.steps == 0


def test_committee_of_two_seeds(trained_run, data_file, tmp_path, capsys):
    """A run with another seed but the same split (data.split_seed) joins the first in one committee
    file that predicts their mean. With another split the training statistics differ and deploy
    refuses; a committee file cannot be fine-tuned."""
    second = train(tiny_config(data_file, tmp_path / "seed1", seed=1, data={"split_seed": 0}, stop={"max_epochs": 3}))
    other_split = train(tiny_config(data_file, tmp_path / "split1", seed=1, stop={"max_epochs": 1}))
    statistics = [load_checkpoint(run.run_dir)["statistics"]
                  for run in (trained_run, second, other_split)]
    assert statistics[1] == statistics[0] and statistics[2] != statistics[0]

    paths = [str(tmp_path / name) for name in ("first.pt", "second.pt", "committee.pt")]
    for run_dirs, path in (([trained_run.run_dir], paths[0]), ([second.run_dir], paths[1]),
                           ([trained_run.run_dir, second.run_dir], paths[2])):
        assert main(["deploy", *run_dirs, "-o", path]) == 0
    atoms = emt_copper(n=2, seed=5)[1]
    results = []
    for path in paths:
        atoms.calc = MLIPCalculator(path)
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    assert np.abs(results[0][1] - results[1][1]).max() > 1e-3, "members agree: the mean would prove nothing"
    for k, what in enumerate(("energy", "forces", "stress")):
        mean = (results[0][k] + results[1][k]) / 2
        assert np.allclose(results[2][k], mean, rtol=1e-5, atol=1e-6), what

    # mlip evaluate on the committee: the members' mean spread and how it ranks the energy errors,
    # checked against each member file's own energies.
    structures = ase.io.read(data_file, ":")
    member_calcs = [MLIPCalculator(p) for p in paths[:2]]
    member_energies = np.array([[calc.get_potential_energy(a) for calc in member_calcs] for a in structures])
    spread = member_energies.std(axis=1)
    abs_error = np.abs(member_energies.mean(axis=1) - [a.get_potential_energy() for a in structures])
    # Per atom: half the distance between the two members' forces, and the mean's error.
    member_forces = [np.concatenate([calc.get_forces(a) for a in structures]) for calc in member_calcs]
    force_spread = np.linalg.norm(member_forces[0] - member_forces[1], axis=1) / 2
    force_error = np.linalg.norm((member_forces[0] + member_forces[1]) / 2
                                 - np.concatenate([a.get_forces() for a in structures]), axis=1)
    from scipy.stats import spearmanr

    full_report = evaluate(paths[2], [data_file])
    report = full_report["files"][data_file]["committee"]
    assert spread.min() > 0
    assert np.isclose(report["energy_uncertainty_mean"], spread.mean(), rtol=1e-6)
    assert np.isclose(report["energy_uncertainty_error_spearman"], spearmanr(spread, abs_error)[0], atol=1e-6)
    assert np.isclose(report["force_uncertainty_mean"], force_spread.mean(), rtol=1e-4)
    assert np.isclose(report["force_uncertainty_error_spearman"], spearmanr(force_spread, force_error)[0], atol=1e-3)
    # Each member's own errors, and their correlation: with it the committee's energy error follows
    # from the members' (mean square sum_mn r_mn s_m s_n / M^2).
    energy_errors = member_energies - np.array([a.get_potential_energy() for a in structures])[:, None]  # (B, 2)
    energy_rmse = np.sqrt((energy_errors ** 2).mean(axis=0))
    assert np.allclose(report["energy_member_rmse"], energy_rmse, rtol=1e-5)
    r = (energy_errors[:, 0] * energy_errors[:, 1]).mean() / energy_rmse.prod()
    assert np.isclose(report["energy_error_correlation"], r, atol=1e-5) and abs(r) < 0.999
    committee_rmse = full_report["all"]["energy_rmse"]
    assert np.isclose(committee_rmse ** 2, (energy_rmse ** 2).sum() / 4 + r * energy_rmse.prod() / 2, rtol=1e-4)
    force_errors = np.stack(member_forces, axis=-1) - np.concatenate([a.get_forces() for a in structures])[..., None]
    force_rmse = np.sqrt((force_errors.reshape(-1, 2) ** 2).mean(axis=0))
    assert np.allclose(report["force_member_rmse"], force_rmse, rtol=1e-4)
    assert np.isclose(report["force_error_correlation"],
                      (force_errors[..., 0] * force_errors[..., 1]).mean() / force_rmse.prod(), atol=1e-4)
    assert "committee" not in evaluate(paths[0], [data_file])["files"][data_file]

    capsys.readouterr()
    assert main(["deploy", trained_run.run_dir, other_split.run_dir, "-o", str(tmp_path / "bad.pt")]) == 2
    assert "training statistics" in capsys.readouterr().err
    with pytest.raises(ValueError, match="committee of 2 models"):
        train(tiny_config(data_file, tmp_path / "finetune", init_from=paths[2], stop={"max_epochs": 0}))


def test_direct_head_fits_about_as_well_as_the_gradient_head(trained_run, data_file, tmp_path):
    direct = train(tiny_config(data_file, tmp_path / "direct", head="direct"))
    gradient_mae = min(r["val_forces_mae"] for r in trained_run.history[1:])
    direct_mae = min(r["val_forces_mae"] for r in direct.history[1:])
    print(f"validation force MAE after 30 epochs: gradient head {1000 * gradient_mae:.0f} meV/Å, "
          f"direct head {1000 * direct_mae:.0f} meV/Å (untrained {1000 * direct.history[0]['val_forces_mae']:.0f})")
    assert direct_mae < direct.history[0]["val_forces_mae"] / 3.0
    assert direct_mae < 2.0 * gradient_mae

    # Deployed, the direct head is evaluated with its net force removed per structure, and no stress.
    model_path = tmp_path / "direct.pt"
    assert main(["deploy", direct.run_dir, "-o", str(model_path)]) == 0
    report = evaluate(str(model_path), [data_file])
    assert "stress_mae" not in report["all"]
    assert report["all"]["forces_mae"] < direct.history[0]["val_forces_mae"] / 3.0


def test_isolated_atom_energies_from_a_file_of_one_atom_frames(data_file, tmp_path):
    """data.isolated_atoms (a file like 3BPA's iso_atoms.xyz, relative to the config) sets the
    reference energies: a composition that never varies (one element here) cannot fix them."""
    from ase import Atoms

    isolated = Atoms("Cu")
    isolated.calc = SinglePointCalculator(isolated, energy=-0.123)
    ase.io.write(tmp_path / "iso.xyz", [isolated], format="extxyz")
    config_path = tmp_path / "train.yaml"
    config_path.write_text(f"run_dir: run\ndata: {{train: [{data_file}], isolated_atoms: iso.xyz}}\n"
                           "model: {r_max: 4.0, overrides: {num_scalar: 8, num_tensor: 4}}\nstop: {max_epochs: 1}\n"
                           "threads: 1\nprogress: false\n")
    config = load_config(config_path)
    assert config.data.isolated_atom_energies == {"Cu": -0.123}
    train(config)
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["statistics"]["reference_energies"] == [-0.123]
    # A frame of two atoms, or without an energy: refused, naming the file and frame.
    ase.io.write(tmp_path / "iso.xyz", [isolated, Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])], format="extxyz")
    with pytest.raises(ConfigError, match="iso.xyz frame 1 has 2 atoms"):
        load_config(config_path)
    ase.io.write(tmp_path / "iso.xyz", [Atoms("Cu")], format="extxyz")
    with pytest.raises(ConfigError, match="iso.xyz frame 0: .*no energy"):
        load_config(config_path)
