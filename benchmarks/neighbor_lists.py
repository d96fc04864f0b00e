"""Time mlip's neighbor-list backends (vesin, matscipy) and ase.neighborlist on periodic Cu FCC.

    python benchmarks/neighbor_lists.py [--r-max 5] [--repeats 7] [--sizes 864 4000 16384]

Prints a markdown table of the median wall time of ``repeats`` calls (after one warm-up call),
and checks that all three give the same edge set. vesin and matscipy are compiled code (one
thread); ASE's is numpy.
"""

import argparse
import statistics
import time

import numpy as np
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlip.data.neighbors import neighbor_list

CU_LATTICE = 3.61  # Å
REPEATS = {864: (6, 6, 6), 4000: (10, 10, 10), 16384: (16, 16, 16)}


def cu_fcc(num_atoms: int, seed: int = 0):
    """Periodic Cu FCC, slightly rattled so no distance sits exactly on a shell."""
    atoms = bulk("Cu", "fcc", a=CU_LATTICE, cubic=True) * REPEATS[num_atoms]
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: imports, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sorted_edges(i, j, shifts):
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    return np.stack([i[order], j[order]]), shifts[order]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r-max", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(REPEATS), choices=sorted(REPEATS))
    args = parser.parse_args()

    print(f"Periodic Cu FCC, r_max = {args.r_max} Å, full list, median of {args.repeats} calls\n")
    print("| atoms | edges/atom | vesin | matscipy | ase.neighborlist | matscipy / vesin "
          "| mlip neighbor_list (vesin) | mlip neighbor_list (matscipy) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        atoms = cu_fcc(n)
        pos, cell, pbc = atoms.positions, atoms.cell.array, atoms.pbc

        results = {b: neighbor_list(pos, cell, pbc, args.r_max, backend=b) for b in ("vesin", "matscipy")}
        i, j, s = ase_neighbor_list("ijS", atoms, args.r_max)
        reference = sorted_edges(i, j, s)
        for backend, (edge_index, shifts) in results.items():
            if not (np.array_equal(edge_index, reference[0]) and np.array_equal(shifts, reference[1])):
                raise AssertionError(f"{backend} and ase.neighborlist disagree for {n} atoms")

        raw = {"vesin": vesin_raw(pos, cell, args.r_max), "matscipy": matscipy_raw(pos, cell, args.r_max)}
        t = {b: median_time(call, args.repeats) for b, call in raw.items()}
        t["ase"] = median_time(lambda: ase_neighbor_list("ijS", atoms, args.r_max), max(3, args.repeats // 2))
        for b in ("vesin", "matscipy"):
            t["mlip " + b] = median_time(lambda b=b: neighbor_list(pos, cell, pbc, args.r_max, backend=b), args.repeats)
        edges_per_atom = results["vesin"][0].shape[1] / n
        print(
            f"| {n} | {edges_per_atom:.1f} | {t['vesin'] * 1e3:.1f} ms | {t['matscipy'] * 1e3:.1f} ms | "
            f"{t['ase'] * 1e3:.0f} ms | {t['matscipy'] / t['vesin']:.2f} | {t['mlip vesin'] * 1e3:.1f} ms | "
            f"{t['mlip matscipy'] * 1e3:.1f} ms |"
        )
    print("\nAll three give identical edge sets (checked above). The first three columns call each library "
          "directly; the last two are mlip's neighbor_list, which also sorts the edges (i, j, shift).")


def vesin_raw(pos, cell, r_max):
    import vesin

    calculator = vesin.NeighborList(cutoff=r_max, full_list=True)
    return lambda: calculator.compute(pos, cell, [True] * 3, "ijS")


def matscipy_raw(pos, cell, r_max):
    from matscipy.neighbours import neighbour_list

    return lambda: neighbour_list("ijS", positions=pos, cutoff=r_max, cell=cell, pbc=np.ones(3, dtype=bool))


if __name__ == "__main__":
    main()
