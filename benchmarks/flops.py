"""Floating-point work of one MD step of mlip's small models, and how much of this CPU it uses.

    python benchmarks/flops.py                    # 864 atoms, both families, float32 + float64
    python benchmarks/flops.py --atoms 4000 --threads 2
    python benchmarks/flops.py --atoms 4000 --threads 2 --dtypes float32 --profile   # + where the time goes

One MD step costs one energy + forces (+ virial) evaluation: a forward pass and the backward
pass that gives dE/dr_ij. Matrix-product FLOPs (mm, addmm, bmm, einsum lowered to them) are
counted with the rules of torch.utils.flop_counter, applied by a small dispatch mode of our own:
FlopCounterMode itself cannot be used, its module hooks break ``torch.autograd.grad`` with
respect to a leaf tensor (which is how the forces are computed). Elementwise work (activations,
cutoff, spherical harmonics, scatter sums) is counted apart and roughly, one FLOP per element
written by an arithmetic op; the matrix products are the part that could run near peak.

The CPU's reference is measured, not assumed: a large float32 / float64 matmul on the same
threads gives the achievable GFLOP/s. A nominal peak is printed beside it for cores with two
512-bit FMA pipes (AMD Zen 5, family 26): 64 float32 / 32 float64 FLOPs per cycle and core, at
the clock /proc/cpuinfo reports; on a VM two "cores" may be one core's two hyperthreads.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from run_mlip import build  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / seconds / 1e9


def nominal_peak_gflops(dtype: torch.dtype, cores: int) -> float:
    """Two 512-bit FMA pipes per core: 2 pipes x lanes x 2 FLOPs per FMA, at the reported clock."""
    mhz = 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    lanes = 16 if dtype == torch.float32 else 8
    return cores * 2 * lanes * 2 * mhz / 1e3


def model_inputs(model, atoms_count: int):
    """Flat inputs of one MD evaluation: positions, types, edges within r_max (paired, as the
    calculator passes them), shifts, local count."""
    from mlip.data.neighbors import neighbor_list, pair_edges

    atoms = common.cu_fcc(atoms_count)
    dtype = next(model.parameters()).dtype
    edge_index, cell_shifts = pair_edges(*neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, common.R_MAX))
    return (
        torch.tensor(atoms.positions, dtype=dtype),
        torch.zeros(len(atoms), dtype=torch.int64),
        torch.as_tensor(edge_index),
        torch.tensor(cell_shifts @ atoms.cell.array, dtype=dtype),
        len(atoms),
    )


# Ops that only move, view or create data: no floating-point arithmetic.
NO_ARITHMETIC = {
    "view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "clone", "copy_", "_to_copy",
    "detach", "slice", "select", "unsqueeze", "squeeze", "alias", "index", "index_select", "cat", "stack",
    "zeros", "empty", "new_zeros", "new_empty", "zeros_like", "ones_like", "empty_like", "fill_", "lift_fresh",
    "split", "split_with_sizes", "unbind", "narrow", "as_strided", "_reshape_alias", "full", "scalar_tensor",
    "arange", "eq", "lt", "gt", "le", "ge", "ne", "logical_and", "masked_fill", "where", "gather", "scatter",
    "ones", "new_ones", "full_like", "contiguous", "lift_fresh_copy", "embedding",
}


class CountFlops(TorchDispatchMode):
    """Matrix-product FLOPs by torch's own rules, plus a rough count of elementwise ones."""

    def __init__(self):
        super().__init__()
        self.matmul = 0
        self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.matmul += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet.__name__.rstrip("_") not in NO_ARITHMETIC:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.elementwise += t.numel()
        return out


def evaluate(model, inputs):
    # What one MD step asks of the model: energies and forces (gradient head, so also the
    # edge gradients the virial is made from), without a graph for higher derivatives.
    return model.energies_and_forces(*inputs, create_graph=False, paired=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=864)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["allegro", "nequip"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="also print the ops that take most of an evaluation (torch.profiler, self CPU time)")
    args = parser.parse_args()
    common.quiet_warnings()
    common.set_threads(args.threads)

    peaks = {}
    print(f"CPU reference, {args.threads} threads:")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        peaks[name] = matmul_gflops(dtype)
        print(f"  {name}: 4096^3 matmul {peaks[name]:.0f} GFLOP/s measured; "
              f"nominal 2x512-bit FMA peak {nominal_peak_gflops(dtype, args.threads):.0f} GFLOP/s")

    print(f"\nOne energy + forces evaluation, {args.atoms} atoms Cu FCC (small preset, r_max {common.R_MAX}):")
    print("| family | dtype | edges | matmul GFLOP | elementwise GFLOP (rough) | ms per evaluation "
          "| matmul GFLOP/s achieved | % of measured matmul peak | all counted GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    profiles = []
    for family in args.families:
        for name in args.dtypes:
            model = build(family, name).eval()
            inputs = model_inputs(model, args.atoms)
            counter = CountFlops()
            with counter:
                evaluate(model, inputs)
            seconds = median_seconds(lambda: evaluate(model, inputs), args.repeats)
            matmul = counter.matmul / seconds / 1e9
            total = (counter.matmul + counter.elementwise) / seconds / 1e9
            print(f"| {family} | {name} | {inputs[2].shape[1]} | {counter.matmul / 1e9:.3f} | "
                  f"{counter.elementwise / 1e9:.3f} | {1e3 * seconds:.1f} | {matmul:.1f} | "
                  f"{100 * matmul / peaks[name]:.1f} % | {total:.1f} |")
            if args.profile:
                profiles.append((family, name, top_ops(lambda: evaluate(model, inputs))))
    for family, name, table in profiles:
        print(f"\nWhere an evaluation's time goes, {family} {name} (self CPU time of 3 evaluations, top ops):")
        print(table)


def top_ops(fn, rows: int = 12) -> str:
    """A markdown table of the ops with the most self CPU time over 3 calls of ``fn``, with their share."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| op | calls per evaluation | self ms per evaluation | share |", "|---|---|---|---|"]
    for e in events[:rows]:
        lines.append(f"| {e.key} | {e.count // 3} | {e.self_cpu_time_total / 3e3:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f} % |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
