"""Staged training: one config whose `stages:` fine-tune one after another (mlip.train.load_stages)."""

import os

import ase.io
import pytest
import torch
import yaml

from mlip.cli import main
from mlip.train import ConfigError, load_checkpoint, load_stages, train, train_stages
from mlip.train.config import config_from_dict
from mlip.train.trainer import checkpoint_weights
from test_train import TINY, emt_copper


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cu_emt.extxyz"
    ase.io.write(path, emt_copper(16), format="extxyz")
    return str(path)


def staged_raw(data_file, run_dir):
    """Stage 1: energies and forces at lr 0.01; stage 2: energy weight 10 at lr 0.003, another seed."""
    return {
        "run_dir": str(run_dir),
        "data": {"train": [data_file], "val_fraction": 0.25},
        "model": {"family": "allegro", "r_max": 4.0, "overrides": TINY["allegro"]},
        "optimizer": {"lr": 0.01, "ema_decay": 0.9},
        "loss": {"energy_per_atom": 1.0, "forces": 1.0},
        "schedule": {"name": "cosine"},
        "stop": {"max_epochs": 3},
        "batch_size": 4,
        "threads": 1,
        "progress": False,
        "stages": [{"loss": {"energy_per_atom": 10.0}, "optimizer": {"lr": 0.003}, "stop": {"max_epochs": 2},
                    "seed": 5}],
    }


def write_config(path, raw) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return str(path)


def best_weights(run_dir):
    """The best (EMA) weights of a run: what a later stage starts from and what deploy writes."""
    return checkpoint_weights(load_checkpoint(os.path.join(run_dir, "best.pt")))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_staged_config_trains_as_its_stages_chained_by_hand(data_file, tmp_path):
    """`mlip train staged.yaml` == train stage 1, then fine-tune from its run directory with stage 2's
    settings: the same best weights, bit for bit; the last stage lives in run_dir itself."""
    raw = staged_raw(data_file, tmp_path / "staged")
    config_path = write_config(tmp_path / "staged.yaml", raw)
    assert main(["train", config_path]) == 0

    by_hand = {k: v for k, v in raw.items() if k != "stages"}
    first = config_from_dict({**by_hand, "run_dir": str(tmp_path / "hand1")})
    train(first)
    second = config_from_dict({**by_hand, "run_dir": str(tmp_path / "hand2"), "init_from": str(tmp_path / "hand1"),
                               "loss": {"energy_per_atom": 10.0, "forces": 1.0},
                               "optimizer": {"lr": 0.003, "ema_decay": 0.9}, "stop": {"max_epochs": 2}, "seed": 5})
    train(second)
    assert_same_weights(best_weights(tmp_path / "staged"), best_weights(tmp_path / "hand2"))
    assert_same_weights(best_weights(tmp_path / "staged" / "stage_1"), best_weights(tmp_path / "hand1"))
    stages = load_stages(config_path)  # a stage's mapping merges into the stage before's section
    assert (stages[1].loss.energy_per_atom, stages[1].loss.forces) == (10.0, 1.0)
    assert (stages[1].optimizer.lr, stages[1].optimizer.ema_decay, stages[1].seed) == (0.003, 0.9, 5)
    assert stages[1].init_from == stages[0].run_dir == str(tmp_path / "staged" / "stage_1")


def test_a_staged_run_stopped_between_stages_continues_and_a_finished_one_is_read_back(data_file, tmp_path):
    """Stage 1 trained alone (as if stopped before stage 2 began): running the config again resumes it
    (already at its end), trains stage 2 and gives the uninterrupted run's weights; a third call trains
    nothing and reports the same results."""
    whole = load_stages(write_config(tmp_path / "a.yaml", staged_raw(data_file, tmp_path / "a")))
    train_stages(whole)

    stopped = load_stages(write_config(tmp_path / "b.yaml", staged_raw(data_file, tmp_path / "b")))
    train(stopped[0])  # stage 1 only: no stage_done.json yet
    assert not os.path.exists(os.path.join(stopped[0].run_dir, "stage_done.json"))
    results = train_stages(stopped)
    assert [r.epochs for r in results] == [3, 2]
    assert_same_weights(best_weights(tmp_path / "b"), best_weights(tmp_path / "a"))

    log = os.path.join(tmp_path / "b", "log.jsonl")
    before = os.path.getmtime(log)
    again = train_stages(load_stages(tmp_path / "b.yaml"))
    assert os.path.getmtime(log) == before
    assert [(r.epochs, r.best_metric) for r in again] == [(r.epochs, r.best_metric) for r in results]


def test_a_staged_run_continues_only_under_the_config_it_was_trained_with(data_file, tmp_path):
    """Edited between two calls, a staged config would otherwise be ignored without a word (a
    finished stage read back, an interrupted one resumed from its checkpoint's settings): a changed
    setting of a trained stage is refused with the stage and the setting named. An interrupted
    stage's stop rule may change (as with --resume) and is applied; data files may move."""
    raw = staged_raw(data_file, tmp_path / "run")
    path = write_config(tmp_path / "run.yaml", raw)
    first = load_stages(path)
    train(first[0])  # stage 1 trained alone: interrupted before stage 2 began

    changed = {**raw, "optimizer": {**raw["optimizer"], "lr": 0.02}}
    with pytest.raises(ValueError, match=r"stage 1 .* was interrupted under another config \(optimizer.lr: "
                                         r"0.01 -> 0.02\)"):
        train_stages(load_stages(write_config(tmp_path / "run.yaml", changed)))

    longer = {**raw, "stop": {"max_epochs": 4}}  # an interrupted stage may be given another stop rule
    moved = tmp_path / "moved"
    moved.mkdir()
    os.symlink(data_file, moved / os.path.basename(data_file))
    longer["data"] = {**raw["data"], "train": [str(moved / os.path.basename(data_file))]}
    results = train_stages(load_stages(write_config(tmp_path / "run.yaml", longer)))
    assert [r.epochs for r in results] == [4, 2]

    again = train_stages(load_stages(path))  # path now holds `longer`: finished, nothing to train
    assert [r.epochs for r in again] == [4, 2]
    later = {**longer, "stages": [{**raw["stages"][0], "loss": {"energy_per_atom": 100.0}}]}
    with pytest.raises(ValueError, match=r"stage 2 .* finished under another config \(loss.energy_per_atom: "
                                         r"10.0 -> 100.0\)"):
        train_stages(load_stages(write_config(tmp_path / "run.yaml", later)))
    shorter = {**longer, "stop": {"max_epochs": 3}}  # a finished stage's stop rule is part of what it trained
    with pytest.raises(ValueError, match=r"stage 1 .* finished under another config \(stop.max_epochs: 4 -> 3\)"):
        train_stages(load_stages(write_config(tmp_path / "run.yaml", shorter)))

    # A run trained before a setting existed (its checkpoint lacks the key) ran as the default does: it
    # continues under a config that leaves the new setting at its default, and is refused otherwise.
    last = tmp_path / "run" / "stage_1" / "last.pt"
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["config"]["data"]["mean_binding_energy"]
    torch.save(checkpoint, last)
    assert [r.epochs for r in train_stages(load_stages(write_config(tmp_path / "run.yaml", longer)))] == [4, 2]
    shifted = {**longer, "data": {**longer["data"], "isolated_atom_energies": {"Cu": -0.1}, "mean_binding_energy": True}}
    with pytest.raises(ValueError, match=r"stage 1 .* finished under another config \(.*data.mean_binding_energy: "
                                         r"False -> True"):
        train_stages(load_stages(write_config(tmp_path / "run.yaml", shifted)))


def test_bad_stages_are_refused_with_the_stage_named(data_file, tmp_path):
    raw = staged_raw(data_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"stage 2\): \['model'\] cannot change between stages"):
        load_stages(write_config(tmp_path / "m.yaml", {**raw, "stages": [{"model": {"r_max": 5.0}}]}))
    with pytest.raises(ConfigError, match="stages: expected a list of mappings"):
        load_stages(write_config(tmp_path / "l.yaml", {**raw, "stages": {"loss": {"forces": 2.0}}}))
    with pytest.raises(ConfigError, match=r"stage 3\): .*optimizer.lr"):
        load_stages(write_config(tmp_path / "v.yaml", {**raw, "stages": [{}, {"optimizer": {"lr": -1.0}}]}))
    with pytest.raises(ConfigError, match=r"stage 2\): unknown key\(s\) \['energy'\] in loss"):
        load_stages(write_config(tmp_path / "k.yaml", {**raw, "stages": [{"loss": {"energy": 2.0}}]}))
    path = write_config(tmp_path / "ok.yaml", raw)
    assert main(["train", path, "--max-epochs", "4"]) == 2  # which stage? refused, nothing trained
    folds = tmp_path / "folds.json"
    folds.write_text('{"fold_0": {"train": [0, 1], "test": [2]}}')
    assert main(["cv", path, "--folds", str(folds)]) == 2  # one training per fold: a staged config is refused
    assert not os.path.exists(tmp_path / "run")
