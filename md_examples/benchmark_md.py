"""Speed and memory of the ASE path, untrained small models (numbers depend only on the architecture).

    python md_examples/benchmark_md.py speed --family allegro --dtype float32 --repeat 3 --steps 10
    python md_examples/benchmark_md.py memory --family allegro --repeat 20 --domain-atoms 4000   # 32000 atoms
    python md_examples/benchmark_md.py memory --family allegro --repeat 20 --whole

Speed: ms per velocity-Verlet step on periodic fcc Cu (4 * repeat^3 atoms), one warm-up step
excluded. Memory: peak resident set size of this process after one energy+forces+stress call;
run each case in its own process (peak RSS never goes down).
"""

import argparse
import os
import resource
import tempfile
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from mlip import MLIPCalculator
from mlip.data.stats import DatasetStatistics
from mlip.deploy import deploy_model
from mlip.models import ModelConfig, build_model


def small_model(family: str, dtype: str, directory: str, eager: bool):
    """A deployed (TorchScript) file, or the eager model with --eager."""
    torch.manual_seed(0)
    statistics = DatasetStatistics(["Cu"], reference_energies=[-3.5], force_rms=0.5, avg_num_neighbors=43.0)
    model = build_model(ModelConfig(family, "small", "gradient"), statistics, getattr(torch, dtype))
    if eager:
        return model.eval()
    path = os.path.join(directory, f"{family}_{dtype}.pt")
    deploy_model(model, path)
    return path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("speed", "memory"))
    p.add_argument("--family", choices=("allegro", "nequip"), default="allegro")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeat", type=int, default=3, help="cubic fcc cells per side: 4 * repeat^3 atoms")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--domain-atoms", type=int, default=4000)
    p.add_argument("--whole", action="store_true", help="memory: no domain decomposition")
    p.add_argument("--domains", action="store_true", help="speed: evaluate by domains of --domain-atoms")
    p.add_argument("--eager", action="store_true", help="eager PyTorch model instead of the TorchScript file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(args.repeat)
    with tempfile.TemporaryDirectory() as directory:
        path = small_model(args.family, args.dtype, directory, args.eager)
        if args.mode == "speed":
            threshold = 0 if args.domains else None
            atoms.calc = MLIPCalculator(path, domain_threshold=threshold, domain_atoms=args.domain_atoms)
            thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(0))
            dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
            dyn.run(1)  # warm-up: TorchScript profiling runs, first neighbor list
            start = time.perf_counter()
            dyn.run(args.steps)
            ms = (time.perf_counter() - start) / args.steps * 1000
            print(f"{args.family} {args.dtype}{' eager' if args.eager else ''} {len(atoms)} atoms, "
                  f"{args.threads} thread(s){f', domains of ~{args.domain_atoms}' if args.domains else ''}: {ms:.1f} ms/step "
                  f"({ms / len(atoms) * 1000:.1f} us/atom/step)")
        else:
            before = peak_rss_mib()
            threshold = None if args.whole else 0
            atoms.calc = MLIPCalculator(path, domain_threshold=threshold, domain_atoms=args.domain_atoms)
            start = time.perf_counter()
            atoms.get_stress()
            seconds = time.perf_counter() - start
            how = "whole system" if args.whole else f"domains of ~{args.domain_atoms} atoms"
            print(f"{args.family} {args.dtype}{' eager' if args.eager else ''} {len(atoms)} atoms, {how}: peak RSS {peak_rss_mib():.0f} MiB "
                  f"(before the call {before:.0f} MiB), {seconds:.1f} s")


if __name__ == "__main__":
    main()
