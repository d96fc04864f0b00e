"""Re-evaluate every shipped potential on its test set and print the errors beside published ones.

    python benchmarks/accuracy.py [--data ../shared/data] [--json out.json]

Published numbers are those collected in ../shared/data/README.md (MACE paper Tables 1-3;
Zuo et al. 2020 via the ACEpotentials.jl tutorial). They are quoted, not re-run.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

def mlearn(element: str, gap: tuple, mtp: tuple) -> dict:
    """An mlearn (Zuo et al. 2020) test set with its published GAP and MTP (E meV/atom, F eV/Å) MAEs."""
    return {
        "test": [f"mlearn_zuo2020/{element}_test.extxyz.gz"],
        "metric": "MAE",
        "energy_unit": "meV/atom",
        "force_unit": "eV/Å",
        "published": {"GAP (Zuo 2020)": gap, "MTP (Zuo 2020)": mtp},
    }


def molecule(test_file: str, metric: str, published: dict) -> dict:
    """A molecular test set: errors of the whole molecule's energy (meV) and of forces (meV/Å), as the
    MACE paper's tables give them (MAE for rMD17, RMSE for 3BPA)."""
    return {"test": [test_file], "metric": metric, "energy_unit": "meV", "force_unit": "meV/Å",
            "published": published}


# name -> test files (relative to the data folder), the metric convention of the literature, and
# published rows {model: (energy, forces)} in that convention.
POTENTIALS = {
    "si-allegro": mlearn("Si", gap=(2.91, 0.07), mtp=(2.21, 0.06)),
    "ge-allegro": mlearn("Ge", gap=(2.06, 0.05), mtp=(1.79, 0.05)),
    "mo-allegro": mlearn("Mo", gap=(2.24, 0.09), mtp=(2.83, 0.09)),
    "li-allegro": mlearn("Li", gap=(0.49, 0.01), mtp=(0.49, 0.01)),
    "3bpa-nequip": molecule("3bpa/test_300K.from_mdbenchgnn.extxyz.gz", "RMSE", {
        "Allegro (L=3)": (3.84, 12.98), "NequIP (L=3)": (3.3, 10.8), "MACE (L=2)": (3.0, 8.8)}),
    "rmd17-aspirin-nequip": molecule("rmd17/rmd17_aspirin_test_01.extxyz.gz", "MAE", {
        "Allegro": (2.3, 7.3), "NequIP (L=3)": (2.3, 8.2), "MACE": (2.2, 6.6)}),
    # frames 900-999 of the one LiPS file here, held out from training; the papers' splits are not available
    "lips-nequip": {"test": ["lips_nequip/lips_val_1000.extxyz.gz@900:"], "metric": "MAE", "energy_unit": "meV/atom",
                    "force_unit": "meV/Å", "published": {}},
}


def ours(report: dict, spec: dict):
    """(energy, forces, stress) of our model in the literature's convention and units."""
    metrics = report["all"]
    kind = spec["metric"].lower()
    if spec["energy_unit"] == "meV/atom":
        energy = 1000 * metrics[f"energy_per_atom_{kind}"]
    else:
        energy = 1000 * metrics[f"energy_{kind}"]
    forces = metrics[f"forces_{kind}"] * (1000 if spec["force_unit"] == "meV/Å" else 1)
    stress = metrics.get(f"stress_{kind}")
    return energy, forces, stress


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"), help="data folder")
    parser.add_argument("--json", help="write every metric here")
    parser.add_argument("--plots", help="write parity plots under this folder")
    args = parser.parse_args(argv)

    from mlip.data.dataset import split_selection
    from mlip.train.evaluate import evaluate

    results = {}
    print("| potential | test set | metric | E | F | stress MAE (meV/Å³) | reference: E / F |")
    print("|---|---|---|---|---|---|---|")
    for name, spec in POTENTIALS.items():
        model = os.path.join(ROOT, "potentials", name, "model.pt")
        if not os.path.exists(model):
            print(f"| {name} | - | - | model not found at {model} | | | |")
            continue
        files = [os.path.join(args.data, f) for f in spec["test"]]
        missing = [f for f in files if not split_selection(f)[0].exists()]  # a file may carry @selection
        if missing:
            print(f"| {name} | missing test data {missing} | | | | | |", file=sys.stderr)
            continue
        plots = os.path.join(args.plots, name) if args.plots else None
        report = evaluate(model, files, plots_dir=plots)
        results[name] = report
        energy, forces, stress = ours(report, spec)
        references = "; ".join(f"{k} {e} / {f}" for k, (e, f) in spec["published"].items()) or "none on this split"
        stress_text = f"{1000 * report['all']['stress_mae']:.2f}" if report["all"].get("stress_mae") else "-"
        print(
            f"| {name} | {', '.join(spec['test'])} | {spec['metric']} | {energy:.2f} {spec['energy_unit']} "
            f"| {forces:.4g} {spec['force_unit']} | {stress_text} | {references} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
