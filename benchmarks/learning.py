"""Accuracy per epoch and per minute: mlip and nequip 0.19.1 train the same NequIP side by side.

    bash benchmarks/peers/setup.sh nequip           # once
    python benchmarks/learning.py                   # 3BPA, l_max 2 / 64 features / 3 layers, 30 epochs
    python benchmarks/learning.py --report bench_out/learning   # table + plot again from the logs

Both sides get the same data and the same protocol: the train/validation split and statistics
(reference energies, per-type force-RMS scales, average neighbor count) come from mlip's
``prepare_data``/``training_statistics`` and are handed to the peer in ``split.json``; Adam at a
constant learning rate, batch 5, gradient-norm clipping 10, loss 20 x MSE(E/atom) + MSE(F), EMA
0.99, validation of the EMA weights, float32, one thread each. mlip trains through ``mlip train``
with a generated config; nequip through ``peers/train_nequip.py`` (see its docstring for why it
is a hand-written loop). The two runs go at the same time, one core each on this 2-core machine,
so both see the same load; the wall times are still only indicative (see README.md).
Output (``--out``, not committed): ``split.json``, ``mlip/`` (the run directory), ``nequip.jsonl``,
``learning.md`` (table) and ``learning.png`` (validation force RMSE vs epoch and vs minutes).
"""

import argparse
import json
import os
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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/shared/data/3bpa/train_300K.xyz",
                   help=f"labelled extxyz; {100 * VAL_FRACTION:g} %% of it is held out for validation")
    p.add_argument("--type-names", nargs="+", default=["H", "C", "N", "O"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--l-max", type=int, default=2)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/learning")
    p.add_argument("--venvs", default=os.environ.get("MLIP_BENCH_VENVS", os.path.expanduser("~/.cache/mlip-bench")))
    p.add_argument("--report", metavar="OUT", help="only rebuild the table and plot from the logs in OUT")
    return p.parse_args()


def data_section(args) -> dict:
    """The `data:` of the mlip run; the split written for the peer comes from the same settings."""
    return {"train": [os.path.abspath(args.data)], "val_fraction": VAL_FRACTION, "type_names": args.type_names}


def write_split(args) -> str:
    """mlip's split and training statistics, as the peer reads them."""
    from mlip.train.config import DataConfig
    from mlip.train.data import prepare_data, training_statistics

    data = prepare_data(DataConfig(**data_section(args)), R_MAX, os.path.join(args.out, "split_data"), args.seed, None, progress=False)
    stats = training_statistics(data)
    path = os.path.join(args.out, "split.json")
    with open(path, "w") as f:
        json.dump({"train": data.train_indices.tolist(), "val": data.val_indices.tolist(),
                   "type_names": data.type_names, "reference_energies": [float(e) for e in stats.reference_energies],
                   "force_rms": float(stats.force_rms), "avg_num_neighbors": float(stats.avg_num_neighbors)}, f)
    return path


def mlip_config(args) -> str:
    """The same protocol as a ``mlip train`` config (a JSON file is valid YAML)."""
    config = {
        "run_dir": os.path.abspath(os.path.join(args.out, "mlip")),
        "data": data_section(args),
        "model": {"family": "nequip", "preset": "small", "head": "gradient", "r_max": R_MAX,
                  "overrides": {"l_max": args.l_max, "num_features": args.features, "num_layers": args.layers}},
        "loss": {"energy_per_atom": ENERGY_WEIGHT, "forces": 1.0},
        "optimizer": {"name": "adam", "lr": args.lr, "clip_grad_norm": CLIP, "ema_decay": EMA},
        "schedule": {"name": "constant"},
        "stop": {"max_epochs": args.epochs, "monitor": "loss"},
        "batch_size": BATCH_SIZE, "dtype": "float32", "threads": 1, "seed": args.seed, "progress": False,
    }
    path = os.path.join(args.out, "mlip.yaml")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def run_both(args) -> None:
    peer_python = os.path.join(args.venvs, "nequip-venv", "bin", "python")
    if not os.path.exists(peer_python):
        sys.exit(f"no nequip venv at {peer_python}: run  bash benchmarks/peers/setup.sh nequip")
    if os.path.exists(os.path.join(args.out, "mlip")):
        sys.exit(f"{args.out}/mlip exists (a previous run): remove it or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    split = write_split(args)
    single_thread = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mlip_cmd = [sys.executable, "-m", "mlip.cli", "train", mlip_config(args)]
    peer_cmd = [peer_python, os.path.join(HERE, "peers", "train_nequip.py"), "--split", split, "--data", args.data,
                "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(BATCH_SIZE),
                "--energy-weight", str(ENERGY_WEIGHT), "--clip", str(CLIP), "--ema", str(EMA),
                "--l-max", str(args.l_max), "--features", str(args.features), "--layers", str(args.layers),
                "--r-max", str(R_MAX), "--threads", "1", "--seed", str(args.seed)]
    print(f"training mlip and nequip side by side for {args.epochs} epochs; logs in {args.out}", flush=True)
    with open(os.path.join(args.out, "mlip.out"), "w") as mlip_out, \
            open(os.path.join(args.out, "nequip.jsonl"), "w") as peer_out, \
            open(os.path.join(args.out, "nequip.err"), "w") as peer_err:
        mlip = subprocess.Popen(mlip_cmd, stdout=mlip_out, stderr=subprocess.STDOUT, env=single_thread)
        peer = subprocess.Popen(peer_cmd, stdout=peer_out, stderr=peer_err, env=single_thread)
        codes = {"mlip": mlip.wait(), "nequip": peer.wait()}
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        sys.exit(f"training failed: {failed}; see {args.out}/mlip.out and {args.out}/nequip.err")


def read_curves(out: str):
    """{package: [{epoch, minutes, forces_rmse (meV/Å), energy_rmse (meV)}]} from both logs."""
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


def markdown(curves, parameters) -> str:
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
        lines.append("parameters: " + ", ".join(f"{p} {n:,}" for p, n in sorted(parameters.items())))
    return "\n".join(lines)


def plot(curves, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for package, color in (("mlip", "tab:green"), ("nequip", "tab:red")):
        curve = curves[package]
        forces = [r["forces_rmse"] for r in curve]
        axes[0].plot([r["epoch"] for r in curve], forces, color=color, label=package)
        axes[1].plot([r["minutes"] for r in curve], forces, color=color, label=package)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("wall minutes (one thread each, run side by side)")
    axes[0].set_ylabel("validation force RMSE (meV/Å)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Same NequIP architecture and training protocol (3BPA 450/50 split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    out = args.report or args.out
    if not args.report:
        run_both(args)
    curves, parameters = read_curves(out)
    table = markdown(curves, parameters)
    with open(os.path.join(out, "learning.md"), "w") as f:
        f.write(table + "\n")
    plot(curves, os.path.join(out, "learning.png"))
    print(table)
    print(f"\nwritten: {out}/learning.md, {out}/learning.png")


if __name__ == "__main__":
    main()
