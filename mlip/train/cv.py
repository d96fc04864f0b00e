"""K-fold cross-validation of a property model (the Matbench protocol).

    mlip cv config.yaml --folds matbench_v0.1_folds.json --id-key mbid

For each fold: its training structures go to ``RUN_DIR/fold_K/train.extxyz``, its test structures to
``test.extxyz``; a fresh run trains on the training file alone (its validation split, ``data.val_fraction``,
is carved out of it and alone picks best.pt, drives the schedule and early stopping); then the best
(EMA) weights predict the test structures, once. The report gives each fold's test MAE, RMSE and R²,
its training time, and their mean. ``--members K`` trains K models per fold (seeds ``seed``, +1, ...;
the first in ``fold_K/run``, the others in ``fold_K/run_seedS``, all with the same validation split)
and scores the mean of their predictions, beside each model's own scores. A model already finished
is read back (``fold_K/member_seedS.json``: its scores and test predictions), an interrupted one
resumed: a cross-validation stopped anywhere continues where it was, under the same config only (a
setting changed since a model trained is refused, naming it; an interrupted one may get another
``stop``); more members later train only the new ones.

Folds file: JSON holding, at any depth, a mapping ``{"fold_0": {"train": [...], "test": [...]}, ...}``
(Matbench's ``splits.<task>`` layout); entries are structure indices in the data file, or ids matched
against ``atoms.info[ID_KEY]``.
"""

import copy
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data import GraphDataset, LabelKeys, TypeMapper, iter_structures, keys
from .checkpoint import BEST, LAST, load_checkpoint
from .config import ConfigError, TrainConfig
from .evaluate import predict_properties
from .metrics import scores

FOLD_FILE = "fold.json"  # the fold's scores (the mean of its members' predictions), rewritten by each call


def read_folds(path: str) -> Dict[str, Dict[str, list]]:
    """{fold name: {"train": [...], "test": [...]}} from a folds file (see the module docstring)."""
    with open(path) as f:
        raw = json.load(f)
    stack = [raw]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            folds = {k: v for k, v in node.items() if isinstance(v, dict) and {"train", "test"} <= set(v)}
            if folds:
                return dict(sorted(folds.items()))
            stack.extend(node.values())
    raise ValueError(f"{path}: no folds found (expected mappings with 'train' and 'test' lists)")


def fold_indices(folds: Dict[str, Dict[str, list]], ids: Optional[Sequence[str]], n: int, path: str):
    """{fold: (train indices, test indices)} into the structure list; ``ids``: atoms.info[ID_KEY] of
    each structure, or None when the folds give indices."""
    position = {str(i): k for k, i in enumerate(ids)} if ids is not None else None
    out = {}
    for name, fold in folds.items():
        parts = []
        for part in ("train", "test"):
            entries = fold[part]
            if position is None:
                if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < n for e in entries):
                    raise ValueError(f"{path}: {name}.{part} holds entries that are not structure indices in "
                                     f"[0, {n}): give --id-key to match them against an atoms.info key")
                parts.append(np.asarray(entries, dtype=np.int64))
            else:
                missing = [e for e in entries if str(e) not in position]
                if missing:
                    raise ValueError(f"{path}: {name}.{part}: {len(missing)} id(s) not found in the data, e.g. "
                                     f"{missing[0]!r}")
                parts.append(np.array([position[str(e)] for e in entries], dtype=np.int64))
        if np.intersect1d(parts[0], parts[1]).size:
            raise ValueError(f"{path}: {name}: structures in both its train and test lists")
        out[name] = tuple(parts)
    return out


def cross_validate(config: TrainConfig, folds_path: str, id_key: Optional[str] = None,
                   only: Optional[Sequence[str]] = None, members: int = 1) -> Dict:
    """Run (or finish) every fold of ``folds_path`` with ``config``; returns the report (also written
    to RUN_DIR/cv.json). ``config.data.train``: the file(s) of all structures; ``only``: fold names;
    ``members``: models per fold (seeds config.seed, +1, ...), scored by the mean of their predictions."""
    from ase.io import write

    if config.task != "property":
        raise ConfigError("mlip cv scores property models: set task: property")
    if config.data.validation:
        raise ConfigError("data.validation: cross-validation carves each fold's validation split out of its "
                          "training structures (data.val_fraction); remove data.validation")
    structures = list(iter_structures(config.data.train))
    ids = None
    if id_key is not None:
        absent = [k for k, a in enumerate(structures) if id_key not in a.info]
        if absent:
            raise KeyError(f"--id-key {id_key!r}: structure {absent[0]} has no such atoms.info key")
        ids = [str(a.info[id_key]) for a in structures]
    folds = fold_indices(read_folds(folds_path), ids, len(structures), folds_path)
    if only:
        unknown = sorted(set(only) - set(folds))
        if unknown:
            raise ValueError(f"--fold {unknown[0]!r}: the folds file has {sorted(folds)}")
        folds = {name: folds[name] for name in only}
    # One type list for all folds: an element met only in a test fold still gets an embedding.
    type_names = config.data.type_names or TypeMapper.from_atoms(structures).type_names
    label_keys = LabelKeys(**config.data.keys)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    report = {"folds": {}, "unit": config.property.unit, "property": config.data.keys["property"]}
    root = config.run_dir
    os.makedirs(root, exist_ok=True)
    for name, (train_idx, test_idx) in folds.items():
        fold_dir = os.path.join(root, name)
        fold_config = copy.deepcopy(config)
        fold_config.data.train = [os.path.join(fold_dir, "train.extxyz")]
        fold_config.data.type_names = list(type_names)
        os.makedirs(fold_dir, exist_ok=True)
        test_file = os.path.join(fold_dir, "test.extxyz")
        for path, indices in ((fold_config.data.train[0], train_idx), (test_file, test_idx)):
            if not os.path.exists(path):
                tmp = f"{path}.tmp-{os.getpid()}.extxyz"
                write(tmp, [structures[i] for i in indices], format="extxyz")
                os.replace(tmp, path)
        rows = [_member(fold_config, config.seed + k, fold_dir, name, test_file, label_keys, dtype)
                for k in range(members)]
        reference = np.asarray(rows[0]["reference"])
        predicted = np.mean([row["predicted"] for row in rows], axis=0)
        columns = [reference, predicted] + ([np.asarray(row["predicted"]) for row in rows] if members > 1 else [])
        header = ",".join(["reference", "predicted"] + ([f"seed{row['seed']}" for row in rows] if members > 1 else []))
        np.savetxt(os.path.join(fold_dir, "test_predictions.csv"), np.stack(columns, axis=1), delimiter=",",
                   header=header, comments="")
        from .plots import plot_parity

        unit = f" ({config.property.unit})" if config.property.unit else ""
        title = f"{name} test" + (f", mean of {members} models" if members > 1 else "")
        plot_parity({f"{label_keys.property}{unit}": (reference, predicted)},
                    os.path.join(fold_dir, "parity_test.png"), title=title)
        row = {**scores(reference, predicted), "train_minutes": round(sum(r["train_minutes"] for r in rows), 2),
               "members": [{k: v for k, v in r.items() if k not in ("reference", "predicted")} for r in rows]}
        with open(os.path.join(fold_dir, FOLD_FILE), "w") as f:
            json.dump(row, f, indent=1)
        report["folds"][name] = row
        _print_fold(name, row, config.property.unit)
    maes = np.array([row["mae"] for row in report["folds"].values()])
    report["mean_mae"], report["std_mae"] = float(maes.mean()), float(maes.std())
    report["members"] = members
    if members > 1:  # the models alone, beside their mean
        single = np.array([[m["mae"] for m in row["members"]] for row in report["folds"].values()])
        report["single_model_mean_mae"] = {f"seed{m['seed']}": float(v) for m, v in
                                           zip(next(iter(report["folds"].values()))["members"], single.mean(axis=0))}
    report["total_train_minutes"] = float(sum(row["train_minutes"] for row in report["folds"].values()))
    with open(os.path.join(root, "cv.json"), "w") as f:
        json.dump(report, f, indent=1)
    _plot_learning_curves(root, list(report["folds"]), config.property.unit)
    what = f" (the mean of {members} models' predictions)" if members > 1 else ""
    print(f"mean test MAE over {len(maes)} folds{what}: {report['mean_mae']:.4g} ± {report['std_mae']:.3g} "
          f"{config.property.unit} (training {report['total_train_minutes']:.1f} min in all)")
    for seed, mae in report.get("single_model_mean_mae", {}).items():
        print(f"  {seed} alone: {mae:.4g} {config.property.unit}")
    return report


def _member(fold_config: TrainConfig, seed: int, fold_dir: str, name: str, test_file: str, label_keys: LabelKeys,
            dtype: torch.dtype) -> Dict:
    """One model of a fold (``seed``): trained (or resumed, or read back from its record) and its test
    predictions; the first member trains in fold_K/run, the others in fold_K/run_seedS."""
    from .trainer import check_continues_unchanged, model_from_checkpoint, resume, train

    config = copy.deepcopy(fold_config)
    if seed != config.seed and config.data.split_seed is None:  # the split follows the run's seed otherwise
        config.data.split_seed = config.seed
    config.seed = seed
    config.run_dir = os.path.join(fold_dir, "run" if seed == fold_config.seed else f"run_seed{seed}")
    record = os.path.join(fold_dir, f"member_seed{seed}.json")
    what = f"fold {name}" + ("" if seed == fold_config.seed else f" seed {seed}")
    if os.path.exists(record):  # finished earlier: read back, not retrained
        check_continues_unchanged(config, what, finished=True)
        with open(record) as f:
            return json.load(f)
    start = time.perf_counter()
    if os.path.exists(os.path.join(config.run_dir, LAST)):
        check_continues_unchanged(config, what, finished=False)
        result = resume(config.run_dir, config.stop.max_epochs, config.stop.max_minutes)
    else:
        result = train(config)
    model = model_from_checkpoint(load_checkpoint(os.path.join(config.run_dir, BEST)))
    test = GraphDataset.from_atoms(test_file, model.config.hyperparameters()["r_max"], config.data.type_names,
                                   label_keys, require=(keys.PROPERTY,))
    predicted = predict_properties(model, test, dtype)
    reference = np.array([float(test[k][keys.PROPERTY]) for k in range(len(test))])
    row = {"seed": seed, **scores(reference, predicted), "train_minutes": round(result.elapsed_s / 60.0, 2),
           "wall_minutes_this_call": round((time.perf_counter() - start) / 60.0, 2), "epochs": result.epochs,
           "best_epoch": result.best_epoch, "validation_mae": _best_validation_mae(result),
           "reference": reference.tolist(), "predicted": predicted.tolist()}
    tmp = f"{record}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, record)
    return row


def _best_validation_mae(result) -> Optional[float]:
    """The validation MAE of the epoch that picked best.pt (whatever the monitor: an MSE loss is no MAE)."""
    rows = [r for r in result.history if r.get("epoch") == result.best_epoch and "val_property_mae" in r]
    return rows[-1]["val_property_mae"] if rows else None


def _plot_learning_curves(root: str, names: List[str], unit: str) -> None:
    """RUN_DIR/learning_curves.png: each fold's validation MAE against epoch, one figure."""
    from .plots import plot_validation_curves

    curves = {}
    for name in names:
        log = os.path.join(root, name, "run", "log.jsonl")
        if os.path.exists(log):
            with open(log) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            curves[name] = [(r["epoch"], r["val_property_mae"]) for r in rows if r.get("val_property_mae") is not None]
    label = f"validation MAE ({unit})" if unit else "validation MAE"
    plot_validation_curves(curves, os.path.join(root, "learning_curves.png"), label)


def _print_fold(name: str, row: Dict, unit: str) -> None:
    alone = ", ".join(f"seed {m['seed']} {m['mae']:.4g}" for m in row["members"]) if len(row["members"]) > 1 else ""
    epochs = "" if alone else f", best epoch {row['members'][0]['best_epoch']}"
    print(f"{name}: test MAE {row['mae']:.4g} {unit}, RMSE {row['rmse']:.4g}, R² {row['r2']:.4f} "
          f"({row['count']} structures; trained {row['train_minutes']:.1f} min{epochs})"
          + (f"; alone: {alone}" if alone else ""), flush=True)


__all__ = ["cross_validate", "read_folds", "fold_indices"]
