"""3BPA training throughput with one or several processes at the same global batch: 1 process x 1
thread, 1 process x 2 threads, 2 processes x 1 thread (data-parallel, torchrun, gloo).

    python benchmarks/distributed_training.py /path/to/3bpa                 # the directory of train_300K.xyz
    python benchmarks/distributed_training.py /path/to/3bpa --steps 3 --settings 1x1,2x1   # a quick check
    python benchmarks/distributed_training.py /path/to/3bpa --compile      # every setting with compile: true

Each setting is `mlip train CONFIG [--nproc P]` in a fresh process with `threads: T` and
OMP_NUM_THREADS=T, on the recipe of the shipped committee's members 2 and 3
(potentials/3bpa-nequip/member2.yaml: NequIP, 517,448 weights, float32), on the first
``--steps`` x ``--batch-size`` training structures: two epochs of ``--steps`` global batches, the
first a warm-up (allocator, first calls). The figure is the log's ``train_structures_per_s`` of
the second epoch: global structures per second of optimizer
steps (forward, backward, gradient all-reduce, Adam, EMA; rank 0's clock, which waits for the
slowest rank), without data loading or validation. With ``--compile`` every setting runs
``compile: true``; the compilation falls in the first epoch, not timed. The structures are converted to graphs once;
every run reads the same .h5 file. Timings are not tests: run it on a quiet machine, read the spread.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = os.path.join(ROOT, "potentials", "3bpa-nequip", "member2.yaml")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", help="the 3BPA data directory (holds train_300K.xyz)")
    p.add_argument("--batch-size", type=int, default=10, help="global batch (structures per step)")
    p.add_argument("--steps", type=int, default=40, help="steps per epoch (the second epoch is timed)")
    p.add_argument("--settings", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved")
    p.add_argument("--compile", action="store_true", help="compile: true in every setting")
    args = p.parse_args()
    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]

    source = os.path.join(os.path.abspath(args.data_dir), "train_300K.xyz")
    if not os.path.exists(source):
        sys.exit(f"{source} not found: give the directory of the 3BPA data set")
    results = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="mlip-ddp-bench-") as tmp:
        graphs = convert(source, args.steps * args.batch_size, tmp)
        for repeat in range(args.repeats):
            for processes, threads in settings:
                run_dir = os.path.join(tmp, f"run-{processes}x{threads}-{repeat}")
                config = write_config(graphs, run_dir, args.batch_size, threads, args.compile)
                command = [sys.executable, "-m", "mlip", "train", config, "--no-progress"]
                if processes > 1:
                    command += ["--nproc", str(processes)]
                print("$ OMP_NUM_THREADS=%d %s" % (threads, " ".join(command)), flush=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"failed:\n{done.stderr[-3000:]}")
                with open(os.path.join(run_dir, "log.jsonl")) as f:
                    rows = [json.loads(line) for line in f]
                results[processes, threads].append(rows[-1]["train_structures_per_s"])
    base = sorted(results[settings[0]])[len(results[settings[0]]) // 2]
    print(f"\n3BPA, member-2 recipe (NequIP, float32{', compile: true' if args.compile else ''}), "
          f"global batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'processes x threads':>20} {'structures/s':>14} {'vs ' + 'x'.join(map(str, settings[0])):>8}  runs")
    for (processes, threads), values in results.items():
        median = sorted(values)[len(values) // 2]
        print(f"{f'{processes} x {threads}':>20} {median:14.2f} {median / base:8.2f}  {values}")


def convert(source: str, count: int, tmp: str) -> str:
    """The first ``count`` structures as a graph file, at the recipe's cutoff."""
    from mlip.data import LabelKeys, convert_to_hdf5
    from mlip.train.config import load_config

    recipe = load_config(RECIPE)
    path = os.path.join(tmp, "3bpa.h5")
    convert_to_hdf5(f"{source}@0:{count}", path, recipe.model.r_max, recipe.data.type_names,
                    LabelKeys(**recipe.data.keys), progress=False)
    return path


def write_config(graphs: str, run_dir: str, batch_size: int, threads: int, compile: bool = False) -> str:
    """The member-2 recipe (its first stage) on the graph file, all of it for training (no validation), two epochs."""
    with open(RECIPE) as f:
        raw = yaml.safe_load(f)
    raw.pop("stages", None)
    raw.update({
        "run_dir": run_dir,
        "data": {**raw["data"], "train": [graphs], "val_fraction": 0.0},
        "batch_size": batch_size,
        "threads": threads,
        "progress": False,
        "stop": {"max_epochs": 2},
        "schedule": {"name": "constant"},
        "compile": compile,
    })
    raw["data"].pop("split_seed", None)
    path = os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


if __name__ == "__main__":
    main()
