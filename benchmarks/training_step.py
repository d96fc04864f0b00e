"""Time mlip's own training step (``Trainer._train_step``: forward, loss, backward, clipping, Adam,
EMA) for a training config, and compare source trees (A/B of a code change) in interleaved runs.

    python benchmarks/training_step.py potentials/3bpa-nequip/member2.yaml
    git worktree add --detach /tmp/mlip-old HEAD~1
    python benchmarks/training_step.py potentials/3bpa-nequip/member2.yaml --src /tmp/mlip-old --src . --pairs 4
    python benchmarks/training_step.py potentials/3bpa-nequip/member2.yaml --compile   # eager vs compile: true

Each run is this script again in a fresh process (``PYTHONPATH`` = the source tree, ``--run-in``):
it builds the config's ``Trainer``, takes the first ``--steps`` batches of epoch 0 and prints the
median seconds per step after ``--warmup`` steps (``common.time_train_steps``). Runs alternate
between the trees (A, B, A, B, ...) so that a change of load hits both sides. The run directory is
replaced by a temporary one: nothing of a real run is touched. ``--compile`` adds runs of the first
tree with ``compile: true`` (mlip.train.compiled): their warm-up steps include the compilation, whose
time is printed apart (Inductor's cache in /tmp is kept between runs, as a user's would be).
Timings are not tests: read the spread of the runs, not only the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a training config (YAML), e.g. potentials/3bpa-nequip/member2.yaml")
    p.add_argument("--src", action="append",
                   help="mlip source tree to import (repeat for an A/B); default: this checkout")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=3, help="runs per source tree, interleaved")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compile", action="store_true", help="also time the first tree with compile: true")
    p.add_argument("--run-in", metavar="RUN_DIR", help=argparse.SUPPRESS)  # one timed run (the child process)
    args = p.parse_args()
    if args.run_in:
        time_one_run(args)
    else:
        compare(args)


def time_one_run(args) -> None:
    import torch

    import mlip
    from mlip.train.config import load_config
    from mlip.train.trainer import Trainer

    config = load_config(args.config)  # data and init_from paths are relative to the config file
    config.run_dir = args.run_in  # a temporary directory: nothing of a real run is touched
    config.compile = args.compile
    torch.set_num_threads(args.threads)  # Trainer.fit would set config.threads; the steps here run outside it
    trainer = Trainer(config)
    batches = list(trainer.train_loader.epoch(0))[: args.steps]
    if len(batches) < args.steps:
        sys.exit(f"the config's training set gives {len(batches)} batches per epoch; ask for fewer steps")
    start = time.perf_counter()
    trainer._train_step(batches[0])  # compiles, with compile: true
    first = time.perf_counter() - start
    seconds = common.time_train_steps(trainer._train_step, batches, warmup=args.warmup)
    print(json.dumps({"mlip": mlip.__file__, "ms_per_step": 1000 * seconds, "first_step_s": first}))


def compare(args) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.abspath(s) for s in (args.src or [os.path.join(here, "..")])]
    variants = [(source, False) for source in sources] + ([(sources[0], True)] if args.compile else [])
    config_path = os.path.abspath(args.config)
    results = {variant: [] for variant in variants}
    first_steps = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.pairs):
            for i, (source, compiled) in enumerate(variants):
                name = variant_name(source, compiled)
                env = dict(os.environ, PYTHONPATH=source, OMP_NUM_THREADS=str(args.threads))
                command = [sys.executable, os.path.abspath(__file__), config_path, "--run-in",
                           os.path.join(tmp, f"run{repeat}-{i}"), "--threads", str(args.threads),
                           "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--compile"] if compiled else [])
                out = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"run with {name} failed:\n{out.stderr[-2000:]}")
                record = json.loads(out.stdout.strip().splitlines()[-1])
                if not record["mlip"].startswith(os.path.join(source, "")):
                    sys.exit(f"imported {record['mlip']}, not the tree {source} (is mlip installed non-editable?)")
                results[(source, compiled)].append(record["ms_per_step"])
                first_steps[(source, compiled)].append(record["first_step_s"])
                print(f"repeat {repeat + 1}: {name}: {record['ms_per_step']:.1f} ms/step "
                      f"(first step {record['first_step_s']:.1f} s)", flush=True)
    print(f"\n{args.config}, {args.threads} thread(s), median of {args.steps} steps per run")
    for (source, compiled), times in results.items():
        print(f"{variant_name(source, compiled)}: median {statistics.median(times):.1f} ms/step "
              f"= {1000 / statistics.median(times):.2f} steps/s, runs {', '.join(f'{t:.1f}' for t in times)}; "
              f"first step {', '.join(f'{t:.1f}' for t in first_steps[(source, compiled)])} s")


def variant_name(source: str, compiled: bool) -> str:
    return f"{source}{' (compile: true)' if compiled else ''}"


if __name__ == "__main__":
    main()
