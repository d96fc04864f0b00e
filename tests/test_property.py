"""Property models (task: property): symmetry of the prediction, small periodic cells, training,
cross-validation and the errors of bad inputs."""

import json

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, make_supercell

from mlip.data import TypeMapper, atoms_to_graph, collate, keys
from mlip.data.stats import DatasetStatistics
from mlip.models import ModelConfig, PropertyModel, build_model
from mlip.train import load_config
from mlip.train.config import ConfigError, config_from_dict
from mlip.train.checkpoint import load_checkpoint
from mlip.train.cv import cross_validate, read_folds
from mlip.train.trainer import train

from physics import TINY, TYPE_NAMES, random_orthogonal, triclinic_alloy

R_MAX = 4.5


def tiny_property_model(family: str, pooling: str, r_max: float = R_MAX, seed: int = 0,
                        element_features: bool = False) -> PropertyModel:
    torch.manual_seed(seed)
    statistics = DatasetStatistics(TYPE_NAMES, reference_energies=[0.0, 0.0], avg_num_neighbors=20.0,
                                   extra={"property_mean": 300.0, "property_std": 100.0,
                                          "property_per_atom_mean": 30.0, "property_per_atom_std": 10.0})
    head = {"name": "y", "unit": "cm^-1", "pooling": pooling, "hidden": [16], "element_features": element_features}
    config = ModelConfig(family, "small", r_max=r_max, overrides=dict(TINY[family]), property=head)
    model = build_model(config, statistics, torch.float64)
    with torch.no_grad():  # untrained outputs are nearly constant: larger weights make every check sensitive
        for name, parameter in model.named_parameters():
            if "readout" in name:
                parameter.mul_(5.0)
    return model.eval()


def predict(model, structures, r_max: float = R_MAX) -> np.ndarray:
    mapper = TypeMapper(TYPE_NAMES)
    batch = collate([atoms_to_graph(a, r_max, mapper) for a in structures], dtype=torch.float64, paired=False)
    return model(batch)[keys.PROPERTY].detach().numpy()


CASES = [(family, pooling, False) for family in ("nequip", "allegro") for pooling in ("intensive", "extensive")]
CASES += [("nequip", "intensive", True), ("allegro", "extensive", True)]  # with element descriptors
CASES += [("allegro", "max", False), ("nequip", "meanmax", False)]


@pytest.mark.parametrize("family,pooling,element_features", CASES)
def test_property_is_invariant_to_rotation_translation_permutation_and_wrapping(family, pooling, element_features):
    model = tiny_property_model(family, pooling, element_features=element_features)
    rng = np.random.default_rng(1)
    atoms = triclinic_alloy(seed=2)
    reference = predict(model, [atoms])[0]

    rotated = atoms.copy()
    rotation = random_orthogonal(rng, reflect=True)
    rotated.set_cell(atoms.cell.array @ rotation.T)
    rotated.positions = atoms.positions @ rotation.T
    translated = atoms.copy()
    translated.positions += rng.normal(size=3) * 3.0
    permuted = atoms[rng.permutation(len(atoms))]
    unwrapped = atoms.copy()  # atoms moved by whole lattice vectors: the same crystal
    unwrapped.positions += rng.integers(-3, 4, size=(len(atoms), 3)) @ atoms.cell.array
    others = predict(model, [rotated, translated, permuted, unwrapped])
    assert abs(reference) > 1.0  # not a trivially vanishing prediction
    np.testing.assert_allclose(others, reference, rtol=1e-9, atol=1e-9)
    # and a different structure gives a different number (the checks above can fail)
    changed = atoms.copy()
    changed.positions[0] += 0.3
    assert abs(predict(model, [changed])[0] - reference) > 1e-6
    # pooled per structure: two different structures in one batch give what each gives alone
    np.testing.assert_allclose(predict(model, [atoms, changed]), [reference, predict(model, [changed])[0]],
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family,pooling,element_features", CASES)
def test_property_of_a_supercell_and_of_another_unit_cell(family, pooling, element_features):
    """Intensive: a supercell or another choice of cell of the same crystal gives the same value;
    extensive: a supercell of n cells gives n times the value."""
    model = tiny_property_model(family, pooling, element_features=element_features)
    atoms = triclinic_alloy(seed=3, repeat=(1, 1, 1))
    supercell = atoms.repeat((2, 1, 2))
    other_cell = make_supercell(atoms, [[1, 1, 0], [0, 1, 0], [0, 1, 1]])  # det 1: the same lattice
    value, super_value, other_value = predict(model, [atoms, supercell, other_cell])
    factor = 4.0 if pooling == "extensive" else 1.0
    np.testing.assert_allclose(super_value, factor * value, rtol=1e-9)
    np.testing.assert_allclose(other_value, value, rtol=1e-9)


@pytest.mark.parametrize("family", ["nequip", "allegro"])
def test_two_atom_cells_hold_every_periodic_image_within_the_cutoff(family):
    """A 2-atom primitive cell at a 7 Å cutoff: each atom sees many images of itself and of the
    other atom (multi-edges). The graph must hold all of them (counted here by brute force), and the
    primitive cell must give the property of the 8-atom conventional cell of the same crystal."""
    r_max = 7.0
    primitive = bulk("CuNi", "rocksalt", a=4.2)  # 2 atoms, fcc lattice
    conventional = bulk("CuNi", "rocksalt", a=4.2, cubic=True)  # 8 atoms
    graph = atoms_to_graph(primitive, r_max, TypeMapper(TYPE_NAMES))
    expected = 0
    images = np.stack(np.meshgrid(*[np.arange(-5, 6)] * 3, indexing="ij"), -1).reshape(-1, 3) @ primitive.cell.array
    for i in range(2):
        for j in range(2):
            d = np.linalg.norm(primitive.positions[j] + images - primitive.positions[i], axis=1)
            expected += int(((d > 1e-8) & (d < r_max)).sum())
    assert graph[keys.EDGE_INDEX].shape[1] == expected > 100
    model = tiny_property_model(family, "intensive", r_max=r_max)
    small, large = predict(model, [primitive, conventional], r_max=r_max)
    np.testing.assert_allclose(small, large, rtol=1e-9)


def alloys(n: int, seed: int):
    """Cu-Ni fcc cells of 1-8 atoms; target: 100 x the Ni fraction + 20 x the lattice strain (intensive)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 * (1 + 0.03 * rng.normal()), cubic=bool(k % 2)).repeat((1, 1, 1 + k % 2))
        atoms.numbers[rng.random(len(atoms)) < rng.random()] = 28
        atoms.info["gap"] = 100.0 * np.mean(atoms.numbers == 28) + 20.0 * (atoms.cell.volume / len(atoms) - 11.66)
        out.append(atoms)
    return out


def property_config(path, run_dir, **changes):
    raw = {"run_dir": str(run_dir), "task": "property", "property": {"unit": "eV", "hidden": [16]},
           "data": {"train": [str(path)], "keys": {"property": "gap"}, "val_fraction": 0.25, "split_seed": 0},
           "model": {"family": "nequip", "preset": "small", "r_max": R_MAX, "overrides": TINY["nequip"]},
           "optimizer": {"lr": 0.01}, "stop": {"max_epochs": 25, "monitor": "property_mae"},
           "batch_size": 4, "threads": 1, "progress": False}
    raw.update(changes)
    return config_from_dict(raw)


def test_training_lowers_the_validation_error_of_a_property(tmp_path):
    path = tmp_path / "alloys.extxyz"
    ase.io.write(path, alloys(40, seed=0))
    result = train(property_config(path, tmp_path / "run"))
    untrained, best = result.history[0]["val_property_mae"], result.best_metric
    spread = np.std([a.info["gap"] for a in alloys(40, seed=0)])
    assert best < 0.4 * untrained and best < 0.4 * spread, (untrained, best, spread)


def test_cross_validation_scores_each_fold_once_and_reads_finished_folds_back(tmp_path, capsys):
    path = tmp_path / "alloys.extxyz"
    structures = alloys(24, seed=1)
    for k, atoms in enumerate(structures):
        atoms.info["sid"] = f"s{k:02d}"
    ase.io.write(path, structures)
    folds_path = tmp_path / "folds.json"
    order = [f"s{k:02d}" for k in range(24)]
    folds = {"splits": {"toy": {"fold_0": {"train": order[:16], "test": order[16:]},
                                "fold_1": {"train": order[8:], "test": order[:8]}}}}
    folds_path.write_text(json.dumps(folds))
    assert list(read_folds(folds_path)) == ["fold_0", "fold_1"]
    config = property_config(path, tmp_path / "cv", stop={"max_epochs": 3, "monitor": "property_mae"})
    report = cross_validate(config, str(folds_path), id_key="sid")
    assert set(report["folds"]) == {"fold_0", "fold_1"}
    for name, row in report["folds"].items():
        predictions = np.loadtxt(tmp_path / "cv" / name / "test_predictions.csv", delimiter=",", skiprows=1)
        assert predictions.shape == (8, 2) and row["count"] == 8
        np.testing.assert_allclose(np.abs(predictions[:, 1] - predictions[:, 0]).mean(), row["mae"])
        test_ids = [a.info["sid"] for a in ase.io.read(tmp_path / "cv" / name / "test.extxyz", ":")]
        assert test_ids == folds["splits"]["toy"][name]["test"]
        with open(tmp_path / "cv" / name / "run" / "log.jsonl") as f:
            logged = [json.loads(line) for line in f][1:]
        assert row["members"][0]["validation_mae"] == min(r["val_property_mae"] for r in logged)
    assert report["mean_mae"] == pytest.approx(np.mean([r["mae"] for r in report["folds"].values()]))
    first_log = tmp_path / "cv" / "fold_0" / "run" / "log.jsonl"
    trained_at = first_log.stat().st_mtime_ns
    again = cross_validate(config, str(folds_path), id_key="sid")  # finished folds: read back, not retrained
    assert again["folds"] == report["folds"]
    # Two models per fold: only the new seed trains; the fold's scores are those of the mean prediction.
    pair = cross_validate(config, str(folds_path), id_key="sid", only=["fold_0"], members=2)
    assert first_log.stat().st_mtime_ns == trained_at
    row = pair["folds"]["fold_0"]
    assert [m["seed"] for m in row["members"]] == [config.seed, config.seed + 1]
    assert row["members"][0] == report["folds"]["fold_0"]["members"][0]
    table = np.loadtxt(tmp_path / "cv" / "fold_0" / "test_predictions.csv", delimiter=",", skiprows=1)
    assert table.shape == (8, 4) and not np.allclose(table[:, 2], table[:, 3])  # another seed, another model
    np.testing.assert_allclose(table[:, 1], table[:, 2:].mean(axis=1))
    np.testing.assert_allclose(np.abs(table[:, 1] - table[:, 0]).mean(), row["mae"])
    np.testing.assert_allclose(np.abs(table[:, 2] - table[:, 0]).mean(), row["members"][0]["mae"])
    np.testing.assert_allclose(np.abs(table[:, 3] - table[:, 0]).mean(), row["members"][1]["mae"])
    # Without data.split_seed the split follows a run's seed: the members still share the first one's split
    # (the property's mean over the training part, in each checkpoint's statistics, is the same).
    unsplit = property_config(path, tmp_path / "cv_unsplit", stop={"max_epochs": 1, "monitor": "property_mae"},
                              data={"train": [str(path)], "keys": {"property": "gap"}, "val_fraction": 0.25})
    cross_validate(unsplit, str(folds_path), id_key="sid", only=["fold_0"], members=2)
    means = [load_checkpoint(tmp_path / "cv_unsplit" / "fold_0" / run / "best.pt")["statistics"]["extra"]["property_mean"]
             for run in ("run", f"run_seed{unsplit.seed + 1}")]
    assert means[0] == means[1]
    wider = property_config(path, tmp_path / "cv", property={"unit": "eV", "hidden": [32]},
                            stop={"max_epochs": 3, "monitor": "property_mae"})
    with pytest.raises(ValueError, match=r"fold fold_0 .* finished under another config \(.*property.hidden: "
                                         r"\[16\] -> \[32\]\)"):  # a changed setting is not ignored
        cross_validate(wider, str(folds_path), id_key="sid")
    # ids that are not in the data, or string ids without --id-key: clear errors
    folds["splits"]["toy"]["fold_0"]["test"][0] = "nope"
    folds_path.write_text(json.dumps(folds))
    config.run_dir = str(tmp_path / "cv2")
    with pytest.raises(ValueError, match="1 id\\(s\\) not found.*'nope'"):
        cross_validate(config, str(folds_path), id_key="sid")
    with pytest.raises(ValueError, match="--id-key"):
        cross_validate(config, str(folds_path))


def test_bad_property_inputs_give_clear_errors(tmp_path):
    structures = alloys(8, seed=2)
    missing = [a.copy() for a in structures]
    del missing[3].info["gap"]
    ase.io.write(tmp_path / "missing.extxyz", missing)
    with pytest.raises(KeyError, match="structure 3 .*no property under the info key 'gap'"):
        train(property_config(tmp_path / "missing.extxyz", tmp_path / "r1"))
    nan = [a.copy() for a in structures]
    nan[5].info["gap"] = float("nan")
    ase.io.write(tmp_path / "nan.extxyz", nan)
    with pytest.raises(ValueError, match="structure 5 .*property 'gap' is nan"):
        train(property_config(tmp_path / "nan.extxyz", tmp_path / "r2"))
    # A forces-only (potential) data set given to a property task: no target anywhere.
    forces_only = [a.copy() for a in structures]
    for atoms in forces_only:
        del atoms.info["gap"]
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
    ase.io.write(tmp_path / "forces.extxyz", forces_only)
    with pytest.raises(KeyError, match="structure 0 .*no property under the info key 'gap'"):
        train(property_config(tmp_path / "forces.extxyz", tmp_path / "r3"))
    path = str(tmp_path / "nan.extxyz")
    with pytest.raises(ConfigError, match="data.keys.property"):
        config_from_dict({"task": "property", "data": {"train": [path]}})
    with pytest.raises(ConfigError, match="loss.forces: a property model predicts no energy"):
        config_from_dict({"task": "property", "data": {"train": [path], "keys": {"property": "gap"}},
                          "loss": {"forces": 1.0}})
    with pytest.raises(ConfigError, match="needs task: property"):
        config_from_dict({"data": {"train": [path], "keys": {"property": "gap"}}})
    with pytest.raises(ConfigError, match="property.pooling"):
        config_from_dict({"task": "property", "property": {"pooling": "median"},
                          "data": {"train": [path], "keys": {"property": "gap"}}})


def test_a_saved_property_config_loads_again(tmp_path):
    """The run directory's config.yaml (with the head filled in) is read back by resume."""
    path = tmp_path / "alloys.extxyz"
    ase.io.write(path, alloys(8, seed=3))
    config = property_config(path, tmp_path / "run", stop={"max_epochs": 1})
    train(config)
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.model.property == config.model.property and again.loss.property == 1.0
