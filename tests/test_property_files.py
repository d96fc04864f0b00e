"""Property model files (task: property): `mlip deploy` writes them, `mlip predict`, `mlip evaluate` and
`mlip info` read them, and every engine that needs energies, forces or stress refuses them by name."""

import csv
import json
import os

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.io import read, write

from mlip import MLIPCalculator
from mlip.calculators.batched import BatchedModel
from mlip.cli import main
from mlip.data import GraphDataset, LabelKeys, keys
from mlip.data.stats import DatasetStatistics
from mlip.deploy import ModelFileError, deploy_model, load_model, read_metadata
from mlip.deploy.compile import check_compiled
from mlip.deploy.model_file import check_model_fields
from mlip.models import ModelConfig, build_model
from mlip.train.checkpoint import load_checkpoint
from mlip.train.metrics import scores
from mlip.train.evaluate import predict_properties
from mlip.train.trainer import model_from_checkpoint
from physics import TINY, tiny_model
from test_calculator import one_thread  # noqa: F401 (autouse: one torch thread in this module)
from test_lammps import bad_setup, error_of, plugin  # noqa: F401 (the session's compiled LAMMPS plugin)

TARGET, UNIT = "omega", "cm^-1"


def crystals(count: int = 8, seed: int = 0):
    """Rattled Cu/Ni fcc cells of 1 to 8 atoms, each with a made-up target under info["omega"]."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        atoms = bulk("Cu", "fcc", a=3.55 + 0.04 * k, cubic=k % 2 == 0)
        if k % 3 == 2:
            atoms = atoms.repeat((2, 1, 1))
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.info[TARGET] = float(200.0 + 15.0 * k + rng.normal())
        atoms.info["config_type"] = "even" if k % 2 == 0 else "odd"
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("property-data") / "crystals.extxyz"
    write(path, crystals())
    return str(path)


@pytest.fixture(scope="module")
def run_dir(data_file, tmp_path_factory):
    """A tiny property model trained for 2 epochs (~10 s): a real checkpoint, as `mlip deploy` gets them."""
    directory = tmp_path_factory.mktemp("property-run")
    config = {
        "run_dir": str(directory / "run"), "task": "property",
        "property": {"unit": UNIT, "hidden": [8]},
        "data": {"train": [data_file], "val_fraction": 0.25, "keys": {"property": TARGET}, "type_names": ["Cu", "Ni"]},
        "model": {"family": "allegro", "r_max": 4.0, "overrides": TINY["allegro"]},
        "stop": {"max_epochs": 2}, "batch_size": 4, "threads": 1, "progress": False,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return config["run_dir"]


@pytest.fixture(scope="module")
def property_file(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("property-file") / "prop.pt"
    assert main(["deploy", run_dir, "-o", str(path)]) == 0
    return str(path)


@pytest.fixture(scope="module")
def potential_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("potential-file") / "potential.pt"
    deploy_model(tiny_model("allegro", dtype=torch.float32), path)
    return str(path)


def dataset(path, require=(keys.PROPERTY,)):
    return GraphDataset.from_atoms(path, 4.0, ["Cu", "Ni"], LabelKeys(property=TARGET), require=require)


def file_predictions(model_path, path):
    module, metadata = load_model(model_path)
    return predict_properties(module, dataset(path, require=()), torch.float32 if metadata["dtype"] == "float32"
                              else torch.float64)


def error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------
# deploy


def test_deploy_writes_a_property_file(run_dir, property_file, data_file):
    metadata = read_metadata(property_file)
    assert metadata["task"] == "property" and metadata["force_head"] == "none"
    head = {"name": TARGET, "unit": UNIT, "pooling": "intensive", "hidden": [8], "element_features": False}
    assert metadata["property"] == head
    assert metadata["type_names"] == ["Cu", "Ni"] and metadata["r_max"] == 4.0 and metadata["dtype"] == "float32"
    assert metadata["model_config"]["property"]["name"] == TARGET and metadata["format"] == "mlip-torchscript"
    assert {"property_mean", "property_std"} <= set(metadata["statistics"]["extra"])
    assert len(metadata["training_data_hash"]) == 64

    eager = model_from_checkpoint(load_checkpoint(os.path.join(run_dir, "best.pt")))
    expected = predict_properties(eager, dataset(data_file), torch.float32)
    got = file_predictions(property_file, data_file)
    assert got.shape == (8,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # One structure per call gives what the batch gave (structures do not see each other).
    alone = predict_properties(load_model(property_file)[0], dataset(data_file), torch.float32, batch_atoms=1)
    np.testing.assert_allclose(alone, got, rtol=1e-5)


def test_deploy_float64_and_redeploy(property_file, data_file, tmp_path):
    """A property file re-deploys (same weights, float64 if asked) like a potential's."""
    again = tmp_path / "prop64.pt"
    assert main(["deploy", property_file, "-o", str(again), "--dtype", "float64"]) == 0
    metadata = read_metadata(again)
    assert metadata["dtype"] == "float64" and metadata["task"] == "property"
    np.testing.assert_allclose(file_predictions(str(again), data_file), file_predictions(property_file, data_file),
                               rtol=1e-5)


def test_deploy_refuses_aoti_and_mixed_committees(run_dir, property_file, potential_file, tmp_path, capsys):
    err = error_line(capsys, ["deploy", run_dir, "-o", str(tmp_path / "prop.pt2")])
    assert "property models deploy to TorchScript only" in err and "prop.pt2" in err
    assert not os.path.exists(tmp_path / "prop.pt2")
    err = error_line(capsys, ["deploy", property_file, potential_file, "-o", str(tmp_path / "committee.pt")])
    assert "either potentials or property models" in err


def test_property_committee_file_is_the_mean_of_its_members(run_dir, property_file, data_file, tmp_path, capsys):
    """`mlip deploy A B -o c.pt` of two property models: c.pt predicts their mean, its spread under
    property_uncertainty (`mlip predict`: NAME_std), `--member 2` gives B back, and it is refused by
    the engines that need forces like any property model."""
    raw, committee = tmp_path / "raw.pt", tmp_path / "committee.pt"
    assert main(["deploy", run_dir, "--no-ema", "-o", str(raw)]) == 0  # the same run's raw weights: a second model
    assert main(["deploy", property_file, str(raw), "-o", str(committee)]) == 0
    metadata = read_metadata(committee)
    assert metadata["task"] == "property" and metadata["property"]["name"] == TARGET
    assert len(metadata["model_config"]["members"]) == 2
    each = np.stack([file_predictions(property_file, data_file), file_predictions(str(raw), data_file)])
    assert np.abs(each[0] - each[1]).min() > 1e-6
    np.testing.assert_allclose(file_predictions(str(committee), data_file), each.mean(axis=0), rtol=1e-6)
    table = tmp_path / "committee.csv"
    assert main(["predict", str(committee), data_file, "--csv", str(table)]) == 0
    with open(table) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", f"{TARGET}_predicted", f"{TARGET}_predicted_std", TARGET]
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], np.abs(each[0] - each[1]) / 2, rtol=1e-5)
    second = tmp_path / "second.pt"
    assert main(["deploy", str(committee), "--member", "2", "-o", str(second)]) == 0
    np.testing.assert_allclose(file_predictions(str(second), data_file), each[1], rtol=1e-6)
    assert main(["info", str(committee)]) == 0
    assert "committee member 2" in capsys.readouterr().out
    with pytest.raises(ModelFileError, match="is a property model"):
        MLIPCalculator(str(committee))


def tiny_property_model(family: str, pooling: str, dtype=torch.float64, element_features: bool = False):
    torch.manual_seed(0)
    statistics = DatasetStatistics(["Cu", "Ni"], [0.0, 0.0], extra={
        "property_mean": 250.0, "property_std": 30.0, "property_per_atom_mean": 60.0, "property_per_atom_std": 8.0})
    config = ModelConfig(family, "small", r_max=4.0, overrides=TINY[family],
                         property={"name": TARGET, "unit": UNIT, "pooling": pooling, "hidden": [8],
                                   "element_features": element_features})
    return build_model(config, statistics, dtype).eval()


def test_deploy_nequip_extensive_float64(data_file, tmp_path):
    """A message-passing backbone, element descriptors and a sum over atoms: the file predicts what
    the eager model does, and a 2x1x1 supercell twice the value of its cell."""
    model = tiny_property_model("nequip", "extensive", element_features=True)
    path = tmp_path / "extensive.pt"
    metadata = deploy_model(model, path)
    assert metadata["property"]["pooling"] == "extensive" and metadata["property"]["element_features"]
    assert metadata["message_passing_layers"] == 2
    assert_file_matches_model(path, model, data_file, tmp_path, supercell_factor=2.0, rtol=1e-9)


@pytest.mark.parametrize("pooling", ["max", "meanmax"])
def test_deploy_max_poolings(pooling, data_file, tmp_path):
    """Max over atoms in TorchScript, over batches of cells of different sizes: the file predicts what
    the eager model does, and a 2x1x1 supercell the value of its cell (the max of two equal halves)."""
    model = tiny_property_model("allegro", pooling, dtype=torch.float32)
    path = tmp_path / f"{pooling}.pt"
    assert deploy_model(model, path)["property"]["pooling"] == pooling
    assert_file_matches_model(path, model, data_file, tmp_path, supercell_factor=1.0, rtol=1e-5)


def assert_file_matches_model(path, model, data_file, tmp_path, supercell_factor: float, rtol: float):
    """The file at ``path`` predicts what the eager ``model`` does on the data file, and a 2x1x1
    supercell of its first cell ``supercell_factor`` times the cell's value."""
    expected = predict_properties(model, dataset(data_file), next(model.parameters()).dtype)
    np.testing.assert_allclose(file_predictions(str(path), data_file), expected, rtol=rtol)
    cell = read(data_file, "0")
    pair = tmp_path / "pair.extxyz"
    write(pair, [cell, cell.repeat((2, 1, 1))])
    single, double = file_predictions(str(path), str(pair))
    assert double == pytest.approx(supercell_factor * single, rel=rtol)


def test_check_compiled_catches_a_wrong_property_file():
    model = tiny_property_model("allegro", "intensive")
    with pytest.raises(RuntimeError, match="differs from the eager model in property"):
        check_compiled(model, lambda *inputs: {keys.PROPERTY: model.predict(*inputs).detach() + 1.0})
    with pytest.raises(RuntimeError, match="returns"):
        check_compiled(model, lambda *inputs: {keys.ENERGY: torch.zeros(())})


# ----------------------------------------------------------------------------------------------
# predict


def test_predict_writes_info_key_and_csv(property_file, data_file, tmp_path, capsys):
    frames = read(data_file, ":")
    del frames[3].info[TARGET]  # a structure without the target still gets its prediction
    source = tmp_path / "input.extxyz"
    write(source, frames)
    out, table = tmp_path / "out.extxyz", tmp_path / "out.csv"
    assert main(["predict", property_file, str(source), "-o", str(out), "--csv", str(table)]) == 0
    assert "predict" in capsys.readouterr().err  # the progress bar
    expected = file_predictions(property_file, data_file)
    written = read(out, ":")
    assert len(written) == len(frames)
    for atoms, original, value in zip(written, frames, expected):
        assert atoms.info[f"{TARGET}_predicted"] == pytest.approx(value, rel=1e-6)
        assert atoms.info.get(TARGET) == original.info.get(TARGET)  # the input's own keys stay
        np.testing.assert_allclose(atoms.positions, original.positions)
    with open(table) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", f"{TARGET}_predicted", TARGET]
    assert [int(r[0]) for r in rows[1:]] == list(range(len(frames)))
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], expected, rtol=1e-6)
    assert rows[4][2] == "" and float(rows[1][2]) == pytest.approx(frames[0].info[TARGET])

    # --key names the info key and column; no output file: the table on stdout. Structures go through
    # the model a few at a time (--batch-atoms): the same predictions.
    assert main(["predict", property_file, str(source), "--key", "guess", "--batch-atoms", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"index,guess,{TARGET}" and len(lines) == len(frames) + 1
    np.testing.assert_allclose([float(line.split(",")[1]) for line in lines[1:]], expected, rtol=1e-6)


def test_predict_with_several_models_gives_their_mean_and_spread(run_dir, property_file, data_file, tmp_path, capsys):
    raw = tmp_path / "raw.pt"  # the same run's raw weights: a second model of the same target
    assert main(["deploy", run_dir, "--no-ema", "-o", str(raw)]) == 0
    table = tmp_path / "two.csv"
    out = tmp_path / "two.extxyz"
    assert main(["predict", property_file, str(raw), data_file, "--csv", str(table), "-o", str(out)]) == 0
    each = np.stack([file_predictions(property_file, data_file), file_predictions(str(raw), data_file)])
    assert np.abs(each[0] - each[1]).min() > 1e-6  # two different models
    with open(table) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", f"{TARGET}_predicted", f"{TARGET}_predicted_std", TARGET]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], each.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], np.abs(each[0] - each[1]) / 2, rtol=1e-5)
    written = read(out, ":")
    np.testing.assert_allclose([a.info[f"{TARGET}_predicted_std"] for a in written], np.abs(each[0] - each[1]) / 2,
                               rtol=1e-5)


def test_predict_refusals(property_file, potential_file, data_file, tmp_path, capsys):
    err = error_line(capsys, ["predict", potential_file, data_file])
    assert f"{potential_file} is a potential: use mlip evaluate / md / relax" in err
    err = error_line(capsys, ["predict", property_file, potential_file, data_file])
    assert f"{potential_file} is a potential" in err
    err = error_line(capsys, ["predict", property_file, data_file, "-o", data_file])
    assert "--output" in err and "input" in err
    unknown = tmp_path / "unknown.extxyz"
    write(unknown, bulk("Si", "diamond", a=5.43))
    err = error_line(capsys, ["predict", property_file, str(unknown)])
    assert "Si" in err and "structure 0" in err


# ----------------------------------------------------------------------------------------------
# evaluate, info


def test_evaluate_property_file(property_file, data_file, tmp_path, capsys):
    plots, report_path = tmp_path / "plots", tmp_path / "report.json"
    assert main(["evaluate", property_file, data_file, "--plots", str(plots), "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "R²" in out and UNIT in out and "MAE" in out
    report = json.loads(report_path.read_text())
    assert report["task"] == "property" and report["unit"] == UNIT
    reference = np.array([a.info[TARGET] for a in read(data_file, ":")])
    expected = scores(reference, file_predictions(property_file, data_file))
    result = report["files"][data_file]["all"]
    assert result["count"] == 8
    for name in ("mae", "rmse", "r2"):
        assert result[name] == pytest.approx(expected[name], rel=1e-5), name
    assert set(report["files"][data_file]["config_types"]) == {"even", "odd"}
    assert report["files"][data_file]["config_types"]["even"]["count"] == 4
    assert (plots / "parity_crystals.png").stat().st_size > 0

    unlabelled = tmp_path / "unlabelled.extxyz"
    write(unlabelled, bulk("Cu", "fcc", a=3.6))
    err = error_line(capsys, ["evaluate", property_file, str(unlabelled)])
    assert f"no property under the info key {TARGET!r}" in err

    # The target under another info key: --keys property=NAME.
    renamed = read(data_file, ":")
    for atoms in renamed:
        atoms.info["omega_dft"] = atoms.info.pop(TARGET)
    write(tmp_path / "renamed.extxyz", renamed)
    assert main(["evaluate", property_file, str(tmp_path / "renamed.extxyz"), "--keys", "property=omega_dft",
                 "--json", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["all"]["mae"] == pytest.approx(expected["mae"], rel=1e-5)


def test_info_of_a_property_file(property_file, capsys):
    assert main(["info", property_file]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["task", "property"] for line in lines)
    assert any(line.split()[:1] == ["property"] and TARGET in line and UNIT in line and "intensive" in line
               for line in lines)
    assert not any("reference energies" in line for line in lines)


# ----------------------------------------------------------------------------------------------
# engines that need energies, forces or stress refuse property files


def test_engines_refuse_property_files(run_dir, property_file, data_file, tmp_path, capsys):
    message = f"{property_file} is a property model"
    for engine in (MLIPCalculator, BatchedModel):
        with pytest.raises(ModelFileError, match="no energy, forces or stress") as error:
            engine(property_file)
        assert message in str(error.value)
    pytest.importorskip("torch_sim")
    from mlip.integrations.torchsim import MLIPModel

    with pytest.raises(ModelFileError, match=message):
        MLIPModel(property_file)
    with pytest.raises(ModelFileError, match="is a property model"):  # the eager model, too
        MLIPCalculator(model_from_checkpoint(load_checkpoint(os.path.join(run_dir, "best.pt"))))

    assert message in error_line(capsys, ["relax", property_file, "bulk:Cu:fcc:3.6"])
    assert message in error_line(capsys, ["md", property_file, "bulk:Cu:fcc:3.6", "--temperature", "300",
                                          "--steps", "2"])
    assert message in error_line(capsys, ["relax", property_file, data_file, "-o", str(tmp_path / "r.extxyz")])


def test_files_without_task_are_potentials(potential_file):
    """Files written before property models carry no "task": they are potentials."""
    module, metadata = load_model(potential_file)
    assert metadata["task"] == "potential"
    old = {k: v for k, v in metadata.items() if k != "task"}
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = MLIPCalculator((module, old))
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(ModelFileError, match="task"):
        check_model_fields({**metadata, "task": "band gap"})
    with pytest.raises(ModelFileError, match="force head 'none'"):
        check_model_fields({**metadata, "force_head": "none"})


@pytest.mark.lammps
def test_lammps_refuses_property_files(plugin, property_file, tmp_path):  # noqa: F811
    message = error_of(bad_setup(tmp_path, property_file, coeff="Cu Ni"))
    assert f"{property_file} is a property model" in message and "no energy, forces or stress" in message
