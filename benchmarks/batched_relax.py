"""Structures relaxed per minute: mlip's batched relaxation vs ASE one by one vs torch-sim.

    python benchmarks/batched_relax.py                      # 200 cells, all three (quiet machine: minutes)
    python benchmarks/batched_relax.py --cells 10 --quick   # smoke test

mlearn-sized cells: rattled, strained Si diamond supercells of 8, 16, 32 and 64 atoms, relaxed
(positions and cell) with potentials/si-allegro/model.pt to fmax 0.05 eV/Å.

- ``mlip batched``: mlip.calculators.batched.relax_many (ASE's FIRE + FrechetCellFilter, many
  structures per model call, each leaving the batch when converged);
- ``ase``: the same optimizer through MLIPCalculator, one structure after the other (neighbor-list
  reuse on, as in `mlip relax`);
- ``torch-sim``: torch-sim's frechet_cell_fire (ASE flavour) with its in-flight autobatcher over
  mlip.integrations.torchsim.MLIPModel, the same atoms per batch (skipped where torch-sim is not
  installed). Its max_steps counts batch iterations, not each structure's steps.

Prints one line per method and a JSON line with everything. Timings need a quiet machine.
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "potentials", "si-allegro", "model.pt")


def si_cells(count: int, seed: int = 0):
    """Rattled (0.05 Å), strained (1 %) Si diamond cells of 8-64 atoms, sizes in turn."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    repeats = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)]
    cells = []
    for k in range(count):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeats[k % len(repeats)])
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        cells.append(atoms)
    return cells


def run_mlip(model_path, cells, fmax, steps, batch_atoms):
    from mlip.calculators.batched import BatchedModel, relax_many

    model = BatchedModel(model_path)
    start = time.perf_counter()
    results = list(relax_many(model, cells, fmax=fmax, steps=steps, cell=True, batch_atoms=batch_atoms))
    seconds = time.perf_counter() - start
    energies = {r.frame: r.atoms.get_potential_energy() for r in results}
    converged = sum(r.atoms.info["relax_converged"] for r in results)
    return seconds, converged, [energies[i] for i in range(len(cells))]


def run_ase(model_path, cells, fmax, steps):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from mlip import MLIPCalculator

    calculator = MLIPCalculator(model_path)
    start = time.perf_counter()
    converged, energies = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's logm "may be inaccurate" (err ~1e-12) per step
        for atoms in cells:
            atoms = atoms.copy()
            atoms.calc = calculator
            converged += bool(FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=fmax, steps=steps))
            energies.append(atoms.get_potential_energy())
    return time.perf_counter() - start, converged, energies


def run_torchsim(model_path, cells, fmax, steps, batch_atoms):
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher

    from mlip.integrations.torchsim import MLIPModel

    model = MLIPModel(model_path)
    state = ts.io.atoms_to_state(cells, device=model.device, dtype=model.dtype)
    batcher = InFlightAutoBatcher(model, memory_scales_with="n_atoms", max_memory_scaler=batch_atoms)
    start = time.perf_counter()
    final = ts.optimize(system=state, model=model, optimizer=ts.frechet_cell_fire, autobatcher=batcher,
                        convergence_fn=ts.generate_force_convergence_fn(fmax), max_steps=steps * len(cells))
    seconds = time.perf_counter() - start
    out = model(final)
    forces_ok = ts.generate_force_convergence_fn(fmax)(ts.frechet_cell_fire(model)[0](final))
    return seconds, int(forces_ok.sum()), out["energy"].tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    parser.add_argument("--steps", type=int, default=500, help="FIRE steps per structure at most")
    parser.add_argument("--batch-atoms", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--skip", nargs="*", default=[], choices=["ase", "torch-sim"])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = min(args.steps, 100)
    cells = si_cells(args.cells)
    report = {"cells": args.cells, "atoms": sum(len(c) for c in cells), "fmax": args.fmax, "steps": args.steps,
              "batch_atoms": args.batch_atoms, "threads": args.threads, "results": {}}

    def record(name, seconds, converged, energies):
        rate = len(cells) / seconds * 60
        report["results"][name] = {"seconds": seconds, "structures_per_minute": rate, "converged": converged,
                                   "energies": energies}
        print(f"{name:13s} {seconds:8.1f} s  {rate:8.1f} structures/min  converged {converged}/{len(cells)}",
              flush=True)

    record("mlip batched", *run_mlip(args.model, cells, args.fmax, args.steps, args.batch_atoms))
    if "ase" not in args.skip:
        record("ase", *run_ase(args.model, cells, args.fmax, args.steps))
    if "torch-sim" not in args.skip:
        try:
            import torch_sim  # noqa: F401
        except ImportError:
            print("torch-sim not installed: skipped (pip install \"mlip[torchsim]\")")
        else:
            record("torch-sim", *run_torchsim(args.model, cells, args.fmax, args.steps, args.batch_atoms))
    results = report["results"]
    batched = results["mlip batched"]["structures_per_minute"]
    for name in ("ase", "torch-sim"):
        if name in results:
            speedup = batched / results[name]["structures_per_minute"]
            difference = np.abs(np.subtract(results[name]["energies"], results["mlip batched"]["energies"]))
            per_atom = difference / np.array([len(c) for c in cells])
            print(f"mlip batched vs {name}: {speedup:.2f}x the structures per minute; relaxed energies differ by "
                  f"at most {per_atom.max() * 1000:.3f} meV/atom")
            report[f"speedup_vs_{name}"] = speedup
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
