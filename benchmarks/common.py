"""Shared pieces of the benchmark runners: systems, the MD timing loop, the JSON result line.

Imported by ``run_mlip.py`` (mlip's venv) and by ``peers/run_*.py`` (each peer's own venv), so
it needs only the standard library, numpy, torch and ASE: nothing from mlip or a peer.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

# Matched small models (see /work/shared/PEERS.md): every runner builds these for Cu.
R_MAX = 5.0
# Neighbors within 5 Å in FCC Cu (a = 3.61 Å): shells of 12 + 6 + 24 atoms; the 4th shell is at
# 5.1 Å. It only normalizes messages, it does not change the cost.
AVG_NUM_NEIGHBORS = 42.0

# FCC Cu supercells (conventional cubic cell, 4 atoms) for each benchmark size. 16000 atoms is
# not a cube of a whole number of cells, so it uses a 20x20x10 box.
CU_LATTICE = 3.61
REPEATS = {108: (3, 3, 3), 864: (6, 6, 6), 4000: (10, 10, 10), 16000: (20, 20, 10)}


def cu_fcc(num_atoms: int, seed: int = 0, temperature_K: float = 300.0):
    """Periodic Cu FCC with thermal noise, so forces are not zero by symmetry."""
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    if num_atoms not in REPEATS:
        raise ValueError(f"no Cu cell for {num_atoms} atoms; choose from {sorted(REPEATS)}")
    atoms = bulk("Cu", "fcc", a=CU_LATTICE, cubic=True) * REPEATS[num_atoms]
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    return atoms


def md_args(description: str, paths, default_path: str, extra=None) -> argparse.Namespace:
    """Command line shared by every runner: one case per process (peak RSS is per process).

    ``extra(parser)`` adds a runner's own options.
    """
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--case", choices=["md", "train"], default="md")
    parser.add_argument("--path", choices=paths, default=default_path, help="eager model or compiled file")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--atoms", type=int, default=108, help="MD system size (Cu FCC)")
    parser.add_argument("--steps", type=int, default=None, help="timed MD steps (default by size)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed MD steps first (default by size)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--train-data", default="/work/shared/data/3bpa/train_300K.xyz")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--cache-dir", default=os.environ.get("MLIP_BENCH_CACHE", "bench_out/cache"),
                        help="where compiled model files are kept between runs")
    args = parser.parse_args()
    # Big systems take seconds per step: fewer steps keep a full run within minutes.
    default_steps = {108: 50, 864: 20, 4000: 8, 16000: 4}
    default_warmup = {108: 10, 864: 5, 4000: 3, 16000: 2}
    if args.steps is None:
        args.steps = default_steps.get(args.atoms, 10)
    if args.warmup is None:
        args.warmup = default_warmup.get(args.atoms, 3)
    return args


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only allowed before the first parallel op)
        pass


def time_md(atoms, steps: int, warmup: int, timestep_fs: float = 1.0):
    """Median wall time (ms) of one VelocityVerlet step, after ``warmup`` untimed steps.

    The calculator must produce energy, forces and stress in each call (as every peer does when
    the cell is periodic); this is checked rather than assumed, so that no package is timed
    without the stress work the others do.
    """
    from ase import units
    from ase.md.verlet import VelocityVerlet

    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    stamps = []
    dyn.attach(lambda: stamps.append(time.perf_counter()), interval=1)
    dyn.run(warmup + steps)
    missing = {"energy", "forces", "stress"} - set(atoms.calc.results)
    if missing:
        raise RuntimeError(f"calculator did not compute {sorted(missing)} with the forces")
    # The observer fires once before the first step and after each step: diffs are step times.
    step_times = np.diff(stamps)[warmup:]
    energy = float(atoms.get_potential_energy())
    if not np.isfinite(energy):
        raise RuntimeError("MD produced a non-finite energy")
    return 1e3 * statistics.median(step_times)


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(package: str, path: str, dtype: str, atoms: int, ms_per_step: float, threads: int, **extra) -> None:
    """Print the one JSON line a runner produces (the driver reads the last line of stdout)."""
    record = {
        "package": package,
        "path": path,
        "dtype": dtype,
        "atoms": atoms,
        "ms_per_step": round(ms_per_step, 3),
        "atom_steps_per_s": round(atoms / (ms_per_step / 1e3), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": threads,
    }
    record.update(extra)
    print(json.dumps(record), flush=True)


def emit_train(package: str, path: str, dtype: str, structures_per_s: float, threads: int, **extra) -> None:
    """Training throughput: ``atoms`` is the structure size, the rate is in structures/s."""
    record = {
        "package": package,
        "path": path,
        "dtype": dtype,
        "case": "train",
        "structures_per_s": round(structures_per_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": threads,
    }
    record.update(extra)
    print(json.dumps(record), flush=True)


def read_train_structures(path: str, count: int):
    """The first ``count`` structures of an extxyz file (3BPA: 27-atom molecules, no cell)."""
    from ase.io import read

    return read(path, index=f":{count}")


def time_train_steps(step, batches, warmup: int = 3) -> float:
    """Median seconds per call of ``step(batch)``, cycling through ``batches`` after a warm-up."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quiet_warnings() -> None:
    # Deprecation and "recommended setting" warnings from peers would drown the JSON lines on
    # stderr; they say nothing about speed.
    import warnings

    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    sys.exit("this module is imported by the runners; see benchmarks/README.md")
