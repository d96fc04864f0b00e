"""Accuracy per epoch and per minute: mlip and nequip 0.19.1 train the same NequIP side by side.

    bash benchmarks/peers/setup.sh nequip           # once
    python benchmarks/learning.py                   # 3BPA, l_max 2 / 64 features / 3 layers, 30 epochs
    python benchmarks/learning.py --minutes 120 --seeds 0 1 2                  # equal budget, 3 seeds
    python benchmarks/learning.py --minutes 120 --seeds 0 1 2 --match weights  # nequip with mlip's weight count
    python benchmarks/learning.py --report bench_out/learning   # tables + plot again from the logs

Both sides get the same data and the same protocol: the train/validation split and statistics
(reference energies, per-type force-RMS scales, average neighbor count) come from mlip's
``prepare_data``/``training_statistics`` and are handed to the peer in ``split.json``; Adam at a
constant learning rate, batch 5, gradient-norm clipping 10, loss 20 x MSE(E/atom) + MSE(F), EMA
0.99, validation of the EMA weights, float32, one thread each. mlip trains through ``mlip train``
with a generated config; nequip through ``peers/train_nequip.py`` (see its docstring for why it
is a hand-written loop). The two runs go at the same time, one core each on this 2-core machine,
so both see the same load; the wall times are still only indicative (see README.md).

``--epochs`` and/or ``--minutes`` end both runs (``--minutes``: the same wall-clock budget for
each, counted from its first validation, data loading excluded). The seeds (model initialisation,
batch order, validation split: the same for both sides) run one after the other. After training,
both models are scored on ``--test`` with the weights their own validation loss picked (EMA):
mlip through ``mlip deploy`` + ``mlip evaluate``, nequip through ``peers/score_nequip.py``.
``--match names`` (default) gives nequip the same hyperparameter names; ``--match weights`` also
narrows its type embedding until it has about as many weights as mlip's model.

Output (``--out``, not committed): ``settings.json`` and one folder per seed, ``seed<S>/`` with
``split.json``, ``mlip/`` (the run directory), ``nequip.jsonl`` (per-epoch log), ``nequip_best.pt``,
``trained.json`` (both runs finished), ``test.json`` (both scores); ``learning.md`` (tables) and
``learning.png`` (validation force RMSE vs epoch and vs minutes). Run again with the same
settings, it skips finished seeds, scores trained ones, and retrains a seed whose training did
not finish (moved to ``seed<S>.unfinished`` first: a pair only means something trained together).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT_EPOCHS = (1, 2, 5, 10, 20, 30, 50, 100, 200)
# The protocol both sides train with (see the docstring).
R_MAX = 5.0
VAL_FRACTION = 0.1
BATCH_SIZE = 5
ENERGY_WEIGHT = 20.0
CLIP = 10.0
EMA = 0.99
DEFAULT_EPOCHS = 30  # without --minutes; with it, the budget alone ends the runs (unless --epochs)
UNLIMITED_EPOCHS = 1_000_000
PACKAGES = ("mlip", "nequip")
# What makes two runs comparable: a rerun in the same --out must not change any of these.
SETTINGS = ("data", "test", "type_names", "epochs", "minutes", "lr", "l_max", "features", "layers", "match")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/shared/data/3bpa/train_300K.xyz",
                   help=f"labelled extxyz; {100 * VAL_FRACTION:g} %% of it is held out for validation")
    p.add_argument("--test", default="/work/shared/data/3bpa/test_300K.from_mdbenchgnn.extxyz.gz",
                   help="labelled structures both trained models are scored on")
    p.add_argument("--type-names", nargs="+", default=["H", "C", "N", "O"])
    p.add_argument("--epochs", type=int, help=f"epochs of each run (default {DEFAULT_EPOCHS}, unlimited with --minutes)")
    p.add_argument("--minutes", type=float, help="wall-clock budget of each run (the same for both)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--l-max", type=int, default=2)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--match", choices=("names", "weights"), default="names",
                   help="names: the same hyperparameters; weights: nequip's type embedding narrowed to mlip's weight count")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed, in sequence")
    p.add_argument("--out", default="bench_out/learning")
    p.add_argument("--venvs", default=os.environ.get("MLIP_BENCH_VENVS", os.path.expanduser("~/.cache/mlip-bench")))
    p.add_argument("--report", metavar="OUT", help="only rebuild the tables and plot from the logs in OUT")
    args = p.parse_args()
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS if args.minutes is None else UNLIMITED_EPOCHS
    for name in ("epochs", "minutes"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name} must be positive, got {value}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    args.data, args.test = os.path.abspath(args.data), os.path.abspath(args.test)
    return args


def data_section(args) -> dict:
    """The `data:` of the mlip run; the split written for the peer comes from the same settings."""
    return {"train": [args.data], "val_fraction": VAL_FRACTION, "type_names": args.type_names}


def model_section(args) -> dict:
    return {"family": "nequip", "preset": "small", "head": "gradient", "r_max": R_MAX,
            "overrides": {"l_max": args.l_max, "num_features": args.features, "num_layers": args.layers}}


def write_split(args, seed: int, seed_dir: str) -> int:
    """mlip's split and training statistics, as the peer reads them; returns mlip's weight count."""
    import torch

    from mlip.models import ModelConfig, build_model
    from mlip.train.config import DataConfig
    from mlip.train.data import prepare_data, training_statistics

    data = prepare_data(DataConfig(**data_section(args)), R_MAX, os.path.join(seed_dir, "split_data"), seed, None,
                        progress=False)
    stats = training_statistics(data)
    with open(os.path.join(seed_dir, "split.json"), "w") as f:
        json.dump({"train": data.train_indices.tolist(), "val": data.val_indices.tolist(),
                   "type_names": data.type_names, "reference_energies": [float(e) for e in stats.reference_energies],
                   "force_rms": float(stats.force_rms), "avg_num_neighbors": float(stats.avg_num_neighbors)}, f)
    with torch.random.fork_rng(devices=[]):  # counting only: leave the global RNG alone
        model = build_model(ModelConfig(**model_section(args)), stats)
    return sum(p.numel() for p in model.parameters())


def mlip_config(args, seed: int, seed_dir: str) -> str:
    """The same protocol as a ``mlip train`` config (a JSON file is valid YAML)."""
    config = {
        "run_dir": os.path.abspath(os.path.join(seed_dir, "mlip")),
        "data": data_section(args),
        "model": model_section(args),
        "loss": {"energy_per_atom": ENERGY_WEIGHT, "forces": 1.0},
        "optimizer": {"name": "adam", "lr": args.lr, "clip_grad_norm": CLIP, "ema_decay": EMA},
        "schedule": {"name": "constant"},
        "stop": {"max_epochs": args.epochs, "max_minutes": args.minutes, "monitor": "loss"},
        "batch_size": BATCH_SIZE, "dtype": "float32", "threads": 1, "seed": seed, "progress": False,
    }
    path = os.path.join(seed_dir, "mlip.yaml")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def peer_python(args) -> str:
    path = os.path.join(args.venvs, "nequip-venv", "bin", "python")
    if not os.path.exists(path):
        sys.exit(f"no nequip venv at {path}: run  bash benchmarks/peers/setup.sh nequip")
    return path


def check_settings(args) -> None:
    """Write --out's settings, or refuse to add runs with other settings to it."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "settings.json")
    ours = {name: getattr(args, name) for name in SETTINGS}
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        differ = [f"{name}: {theirs.get(name)} there, {ours[name]} now" for name in SETTINGS
                  if theirs.get(name) != ours[name]]
        if differ:
            sys.exit(f"{args.out} holds runs with other settings ({'; '.join(differ)}): choose another --out")
    with open(path, "w") as f:
        json.dump(ours, f, indent=1)


def train_pair(args, seed: int, seed_dir: str) -> None:
    """mlip and nequip side by side, one thread each; trained.json when both finished."""
    if os.path.exists(seed_dir):  # a pair that did not finish: keep it for inspection, train anew
        unfinished = seed_dir + ".unfinished"
        shutil.rmtree(unfinished, ignore_errors=True)
        os.rename(seed_dir, unfinished)
        print(f"seed {seed}: an unfinished training pair moved to {unfinished}; training again", flush=True)
    os.makedirs(seed_dir)
    mlip_weights = write_split(args, seed, seed_dir)
    single_thread = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mlip_cmd = [sys.executable, "-m", "mlip.cli", "train", mlip_config(args, seed, seed_dir)]
    peer_cmd = [peer_python(args), os.path.join(HERE, "peers", "train_nequip.py"),
                "--split", os.path.join(seed_dir, "split.json"), "--data", args.data,
                "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(BATCH_SIZE),
                "--energy-weight", str(ENERGY_WEIGHT), "--clip", str(CLIP), "--ema", str(EMA),
                "--l-max", str(args.l_max), "--features", str(args.features), "--layers", str(args.layers),
                "--r-max", str(R_MAX), "--threads", "1", "--seed", str(seed),
                "--save", os.path.join(seed_dir, "nequip_best.pt")]
    if args.minutes is not None:
        peer_cmd += ["--minutes", str(args.minutes)]
    if args.match == "weights":
        peer_cmd += ["--parameters", str(mlip_weights)]
    budget = f"{args.minutes:g} minutes" if args.minutes is not None else f"{args.epochs} epochs"
    print(f"seed {seed}: training mlip ({mlip_weights:,} weights) and nequip side by side for {budget}; logs in "
          f"{seed_dir}", flush=True)
    with open(os.path.join(seed_dir, "mlip.out"), "w") as mlip_out, \
            open(os.path.join(seed_dir, "nequip.jsonl"), "w") as peer_out, \
            open(os.path.join(seed_dir, "nequip.err"), "w") as peer_err:
        mlip = subprocess.Popen(mlip_cmd, stdout=mlip_out, stderr=subprocess.STDOUT, env=single_thread)
        peer = subprocess.Popen(peer_cmd, stdout=peer_out, stderr=peer_err, env=single_thread)
        codes = {"mlip": mlip.wait(), "nequip": peer.wait()}
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        sys.exit(f"training failed: {failed}; see {seed_dir}/mlip.out and {seed_dir}/nequip.err")
    _, parameters = read_curves(seed_dir)
    print(f"seed {seed}: weights " + ", ".join(f"{p} {parameters[p]:,}" for p in PACKAGES), flush=True)
    with open(os.path.join(seed_dir, "trained.json"), "w") as f:
        json.dump({"parameters": parameters}, f)


def score_pair(args, seed_dir: str) -> None:
    """Both models' test errors (eV, eV/Å) with their best EMA weights, in test.json; None for a
    side that finished no epoch (no weights were picked)."""
    single_thread = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    scores = {}
    best = os.path.join(seed_dir, "mlip", "best.pt")
    if os.path.exists(best):
        model = os.path.join(seed_dir, "mlip.pt")
        report = os.path.join(seed_dir, "mlip_test.json")
        for command in (["deploy", best, "-o", model], ["evaluate", model, args.test, "--json", report, "--threads", "1"]):
            subprocess.run([sys.executable, "-m", "mlip.cli", *command], check=True, env=single_thread,
                           stdout=subprocess.DEVNULL)
        with open(report) as f:
            errors = json.load(f)["all"]
        scores["mlip"] = {"energy_rmse": errors["energy_rmse"], "forces_rmse": errors["forces_rmse"]}
    else:
        scores["mlip"] = None
    saved = os.path.join(seed_dir, "nequip_best.pt")
    if os.path.exists(saved):
        result = subprocess.run([peer_python(args), os.path.join(HERE, "peers", "score_nequip.py"), "--model", saved,
                                 "--split", os.path.join(seed_dir, "split.json"), "--test", args.test],
                                check=True, env=single_thread, stdout=subprocess.PIPE, text=True)
        scores["nequip"] = json.loads(result.stdout.strip().splitlines()[-1])
    else:
        scores["nequip"] = None
    with open(os.path.join(seed_dir, "test.json"), "w") as f:
        json.dump(scores, f, indent=1)


def run(args) -> None:
    check_settings(args)
    for seed in args.seeds:
        seed_dir = os.path.join(args.out, f"seed{seed}")
        if os.path.exists(os.path.join(seed_dir, "test.json")):
            print(f"seed {seed}: finished earlier, skipped", flush=True)
            continue
        if not os.path.exists(os.path.join(seed_dir, "trained.json")):
            train_pair(args, seed, seed_dir)
        print(f"seed {seed}: scoring both on {args.test}", flush=True)
        score_pair(args, seed_dir)


def run_dirs(out: str):
    """{seed label: folder}: seed<S>/ folders, or ``out`` itself for the output of an older version."""
    seeds = sorted((int(name[4:]), os.path.join(out, name)) for name in os.listdir(out)
                   if name.startswith("seed") and name[4:].isdigit() and os.path.isdir(os.path.join(out, name)))
    if seeds:
        return {f"seed {s}": path for s, path in seeds}
    return {"": out}


def read_curves(out: str):
    """{package: [{epoch, minutes, forces_rmse (meV/Å), energy_rmse (meV)}]} from both logs (epoch 0: untrained)."""
    def rows(path):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: {out} is not the output of a finished learning.py run")
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    curves, parameters = {}, {}
    for package, path in (("mlip", os.path.join(out, "mlip", "log.jsonl")), ("nequip", os.path.join(out, "nequip.jsonl"))):
        curve = []
        for r in rows(path):
            if "parameters" in r:
                parameters[package] = r["parameters"]
            if "type_embed_features" in r:
                parameters["nequip type embedding"] = r["type_embed_features"]
            if "val_forces_rmse" in r:
                curve.append({"epoch": r["epoch"], "minutes": r["elapsed_s"] / 60.0,
                              "forces_rmse": 1e3 * r["val_forces_rmse"], "energy_rmse": 1e3 * r["val_energy_rmse"]})
        curves[package] = curve
    checkpoint = os.path.join(out, "mlip", "last.pt")
    if os.path.exists(checkpoint):
        from mlip.train.checkpoint import load_checkpoint

        state = load_checkpoint(checkpoint)
        parameters["mlip"] = sum(t.numel() for t in state["ema"]["shadow"].values())
        # Both sides must have trained with the same statistics, or the comparison is void (they are
        # computed on the training indices only, so this also catches a different split).
        with open(os.path.join(out, "split.json")) as f:
            split = json.load(f)
        ours = state["statistics"]
        same = (np.allclose(ours["reference_energies"], split["reference_energies"], rtol=0, atol=1e-9)
                and np.isclose(ours["force_rms"], split["force_rms"]) and
                np.isclose(ours["avg_num_neighbors"], split["avg_num_neighbors"]))
        if not same:
            sys.exit(f"mlip trained with statistics {ours}, the peer with those of {out}/split.json")
    return curves, parameters


def epoch_table(curves, parameters) -> str:
    """Validation errors of both runs at the same epochs."""
    lines = ["| epoch | mlip F RMSE (meV/Å) | nequip F RMSE | mlip E RMSE (meV) | nequip E RMSE | mlip min | nequip min |",
             "|---|---|---|---|---|---|---|"]
    by_epoch = {p: {r["epoch"]: r for r in c} for p, c in curves.items()}
    if not all(by_epoch.values()):
        return "no epochs finished in " + ", ".join(p for p, b in by_epoch.items() if not b)
    last = min(max(b) for b in by_epoch.values())  # the last epoch both runs reached
    for epoch in sorted({e for e in REPORT_EPOCHS if e <= last} | {last}):
        m, n = by_epoch["mlip"][epoch], by_epoch["nequip"][epoch]
        lines.append(f"| {epoch} | {m['forces_rmse']:.1f} | {n['forces_rmse']:.1f} | {m['energy_rmse']:.1f} | "
                     f"{n['energy_rmse']:.1f} | {m['minutes']:.1f} | {n['minutes']:.1f} |")
    if parameters:
        lines.append("")
        lines.append("parameters: " + ", ".join(f"{p} {parameters[p]:,}" for p in PACKAGES if p in parameters)
                     + (f" (nequip's type embedding: {parameters['nequip type embedding']} features)"
                        if "nequip type embedding" in parameters else ""))
    return "\n".join(lines)


def reach_minutes(curve, target: float):
    """The first time (minutes) a validation force RMSE of ``curve`` (trained epochs only) is below
    ``target`` (meV/Å); None if it never is."""
    return next((r["minutes"] for r in curve if r["epoch"] > 0 and r["forces_rmse"] < target), None)


def mean_std(values) -> str:
    """'mean ± sample std' of the values that exist ('-' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def comparison_tables(runs) -> str:
    """Test errors, weight counts and the time each run needs to reach the other's final validation
    force RMSE, per seed and as mean ± std. ``runs``: {label: (curves, parameters, test scores or None)}."""
    def trained(curve):
        return [r for r in curve if r["epoch"] > 0]

    def test_error(scores, package, quantity):
        side = (scores or {}).get(package)
        return None if side is None else 1e3 * side[quantity]

    def cell(value):
        return "-" if value is None else f"{value:.1f}"

    lines = ["Test errors with the weights each side's validation picked (EMA); "
             "'-': no epoch finished, or not scored yet.", "",
             "| seed | mlip F RMSE (meV/Å) | nequip F RMSE | ratio | mlip E RMSE (meV) | nequip E RMSE | "
             "mlip last epoch / min | nequip last epoch / min | mlip weights | nequip weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    columns = {"mlip_f": [], "nequip_f": [], "ratio": [], "mlip_e": [], "nequip_e": []}
    for label, (curves, parameters, scores) in runs.items():
        row = {"mlip_f": test_error(scores, "mlip", "forces_rmse"), "nequip_f": test_error(scores, "nequip", "forces_rmse"),
               "mlip_e": test_error(scores, "mlip", "energy_rmse"), "nequip_e": test_error(scores, "nequip", "energy_rmse")}
        row["ratio"] = row["mlip_f"] / row["nequip_f"] if row["mlip_f"] and row["nequip_f"] else None
        for key, value in row.items():
            columns[key].append(value)
        spent = {p: (f"{trained(c)[-1]['epoch']} / {trained(c)[-1]['minutes']:.1f}" if trained(c) else "0")
                 for p, c in curves.items()}
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {label or '-'} | {cell(row['mlip_f'])} | {cell(row['nequip_f'])} | {ratio} | "
                     f"{cell(row['mlip_e'])} | {cell(row['nequip_e'])} | {spent['mlip']} | {spent['nequip']} | "
                     f"{parameters.get('mlip', 0):,} | {parameters.get('nequip', 0):,} |")
    if len(runs) > 1:
        ratios = [r for r in columns["ratio"] if r is not None]
        ratio = f"{np.mean(ratios):.2f} ± {np.std(ratios, ddof=1):.2f}" if len(ratios) > 1 else "-"
        lines.append(f"| mean ± std | {mean_std(columns['mlip_f'])} | {mean_std(columns['nequip_f'])} | {ratio} | "
                     f"{mean_std(columns['mlip_e'])} | {mean_std(columns['nequip_e'])} | | | | |")
    lines += ["", "Time to reach the other's final validation force RMSE (minutes; 'not reached' within its run):", "",
              "| seed | mlip final (meV/Å) | nequip final | mlip reaches nequip's final | nequip reaches mlip's final |",
              "|---|---|---|---|---|"]
    for label, (curves, _, _) in runs.items():
        mlip, nequip = trained(curves["mlip"]), trained(curves["nequip"])
        if not (mlip and nequip):
            lines.append(f"| {label or '-'} | - | - | - | - |")
            continue
        times = [reach_minutes(mine, theirs[-1]["forces_rmse"]) for mine, theirs in ((mlip, nequip), (nequip, mlip))]
        lines.append(f"| {label or '-'} | {mlip[-1]['forces_rmse']:.1f} | {nequip[-1]['forces_rmse']:.1f} | "
                     + " | ".join("not reached" if t is None else f"{t:.1f}" for t in times) + " |")
    return "\n".join(lines)


def plot(runs, path: str, title: str) -> None:
    """Validation force RMSE of every seed against epoch and against wall minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for n, (label, (curves, _, _)) in enumerate(runs.items()):
        for package, color in (("mlip", "tab:green"), ("nequip", "tab:red")):
            curve = [r for r in curves[package] if r["epoch"] > 0]
            forces = [r["forces_rmse"] for r in curve]
            name = f"{package} {label}".strip() if len(runs) > 1 else package
            style = ("-", "--", ":", "-.")[n % 4]
            axes[0].plot([r["epoch"] for r in curve], forces, style, color=color, label=name)
            axes[1].plot([r["minutes"] for r in curve], forces, style, color=color, label=name)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("wall minutes (one thread each, run side by side)")
    axes[0].set_ylabel("validation force RMSE (meV/Å)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: str) -> str:
    """learning.md and learning.png of the runs in ``out``; returns the tables."""
    runs = {}
    for label, folder in run_dirs(out).items():
        curves, parameters = read_curves(folder)
        scores = None
        if os.path.exists(os.path.join(folder, "test.json")):
            with open(os.path.join(folder, "test.json")) as f:
                scores = json.load(f)
        runs[label] = (curves, parameters, scores)
    parts, match = [], "names"
    settings_file = os.path.join(out, "settings.json")
    if os.path.exists(settings_file):  # not in the output of an older version
        with open(settings_file) as f:
            settings = json.load(f)
        parts.append("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
        match = settings["match"]
    parts.append(comparison_tables(runs))
    for label, (curves, parameters, _) in runs.items():
        parts.append(f"Validation per epoch{f' ({label})' if label else ''}:\n\n" + epoch_table(curves, parameters))
    text = "\n\n".join(parts)
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(text + "\n")
    title = {"names": "NequIP with the same hyperparameters", "weights": "NequIP with about the same weight count"}[match]
    plot(runs, os.path.join(out, "learning.png"), f"{title}, the same training protocol ({os.path.basename(out)})")
    return text


def main():
    args = parse_args()
    out = args.report or args.out
    if not args.report:
        run(args)
    print(report(out))
    print(f"\nwritten: {out}/learning.md, {out}/learning.png")


if __name__ == "__main__":
    main()
