"""Time mlip's own training step (``Trainer._train_step``: forward, loss, backward, clipping, Adam,
EMA) for a training config, and compare source trees (A/B of a code change) in interleaved runs.

    python benchmarks/training_step.py potentials/3bpa-nequip/member2.yaml
    git worktree add --detach /tmp/mlip-old HEAD~1
    python benchmarks/training_step.py potentials/3bpa-nequip/member2.yaml --src /tmp/mlip-old --src . --pairs 4

Each run is a fresh subprocess (``PYTHONPATH`` = the source tree) that builds the config's
``Trainer``, takes the first ``--steps`` + ``--warmup`` batches of epoch 0, runs the warm-up steps
and prints the median seconds per timed step. Runs alternate between the trees (A, B, A, B, ...) so
that a change of load hits both sides. The run directory is replaced by a temporary one: nothing
of a real run is touched.
Timings are not tests: read the spread of the runs, not only the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, statistics, torch
from mlip.train.config import load_config
from mlip.train.trainer import Trainer
import mlip
config_path, run_dir, threads, warmup, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
config = load_config(config_path)  # data and init_from paths are relative to the config file
config.run_dir = run_dir  # a temporary directory: nothing of a real run is touched
torch.set_num_threads(threads)  # Trainer.fit would set config.threads; the steps here run outside it
trainer = Trainer(config)
batches = list(trainer.train_loader.epoch(0))[: warmup + steps]
if len(batches) < warmup + steps:
    sys.exit(f"the config's training set gives {len(batches)} batches per epoch; ask for fewer steps")
for batch in batches[:warmup]:
    trainer._train_step(batch)
times = []
for batch in batches[warmup:]:
    start = time.perf_counter()
    trainer._train_step(batch)
    times.append(time.perf_counter() - start)
print(json.dumps({"mlip": mlip.__file__, "ms_per_step": 1000 * statistics.median(times), "steps": len(times)}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a training config (YAML), e.g. potentials/3bpa-nequip/member2.yaml")
    p.add_argument("--src", action="append", help="mlip source tree to import (repeat for an A/B); default: this checkout")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=3, help="runs per source tree, interleaved")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    sources = [os.path.abspath(s) for s in (args.src or [os.path.join(os.path.dirname(__file__), "..")])]

    config_path = os.path.abspath(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        results = {source: [] for source in sources}
        for repeat in range(args.pairs):
            for i, source in enumerate(sources):
                env = dict(os.environ, PYTHONPATH=source, OMP_NUM_THREADS=str(args.threads))
                run_dir = os.path.join(tmp, f"run{repeat}-{i}")
                command = [sys.executable, "-c", CHILD, config_path, run_dir, str(args.threads), str(args.warmup),
                           str(args.steps)]
                out = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"run with {source} failed:\n{out.stderr[-2000:]}")
                record = json.loads(out.stdout.strip().splitlines()[-1])
                if not record["mlip"].startswith(os.path.join(source, "")):
                    sys.exit(f"imported {record['mlip']}, not the tree {source} (is mlip installed non-editable?)")
                results[source].append(record["ms_per_step"])
                print(f"repeat {repeat + 1}: {source}: {record['ms_per_step']:.1f} ms/step", flush=True)
    print(f"\n{args.config}, {args.threads} thread(s), median of {args.steps} steps per run")
    for source, times in results.items():
        print(f"{source}: median {statistics.median(times):.1f} ms/step, runs {', '.join(f'{t:.1f}' for t in times)}")


if __name__ == "__main__":
    main()
