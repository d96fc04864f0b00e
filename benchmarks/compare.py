"""Side-by-side ASE MD (and training) speed of mlip and its peers: NequIP, Allegro, MACE.

    bash benchmarks/peers/setup.sh                 # once: one venv per peer, outside the repo
    python benchmarks/compare.py --quick           # 108 and 864 atoms, float32, one repeat
    python benchmarks/compare.py                   # 108 ... 16000 atoms, float32 + float64, 2 repeats
    python benchmarks/compare.py --report bench_out/raw-*.jsonl  # table + plot from earlier results

While others edit main, measure one commit of mlip:
    git archive HEAD mlip | tar -x -C /tmp/mlip-$(git rev-parse --short HEAD)
    python benchmarks/compare.py --mlip-src /tmp/mlip-$(git rev-parse --short HEAD)

Every case runs in its own subprocess (peak RSS is per case, no warm caches carried over), and
cases alternate between mlip and the peers (mlip-allegro, allegro, mlip-nequip, nequip, mace,
then the next repeat) so that a change in the machine's load hits both sides alike. Each result
also records how busy the CPUs were with *other* processes while it ran ("outside_load"): on a
shared machine, rows with a high value are not comparable.

Ratios compare an mlip model with its counterpart: Allegro with mlip's allegro family, NequIP
and MACE (both message passing) with mlip's nequip family. Speed ratio = mlip atom-steps/s over
the peer's (above 1: mlip is faster); memory ratio = mlip peak RSS per atom over the peer's
(below 1: mlip needs less).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ("allegro", "nequip", "mace")
COUNTERPART = {"allegro": "mlip-allegro", "nequip": "mlip-nequip", "mace": "mlip-nequip"}
DEFAULT_PEER_PATHS = {"allegro": "eager", "nequip": "eager", "mace": "eager"}
TRAIN_PEERS = ("nequip", "allegro", "mace")  # peers whose runner implements --case train


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[108, 864, 4000, 16000])
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float64"],
                   help="default: both (float32 only with --quick)")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    p.add_argument("--families", nargs="*", default=["allegro", "nequip"], choices=["allegro", "nequip"],
                   help="mlip model families to run")
    p.add_argument("--mlip-paths", nargs="+", default=["torchscript"], choices=["torchscript", "eager", "aoti"])
    p.add_argument("--peer-path", action="append", default=[], metavar="PEER=PATH[,PATH]",
                   help="e.g. nequip=eager,aoti (AOTI compiles once per dtype, 20-300 s); default eager")
    p.add_argument("--peer-malloc", choices=["default", "heap", "both"], default="both",
                   help="run peers with glibc's default malloc, with the heap settings mlip applies to itself "
                        "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, path suffix +heap), or both; ratios "
                        "take each peer's fastest")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per case")
    p.add_argument("--quick", action="store_true", help="108 and 864 atoms, one repeat (float32 unless --dtypes)")
    p.add_argument("--no-md", action="store_true", help="skip the MD cases")
    p.add_argument("--train", action="store_true", help="also training throughput on 3BPA (float32)")
    p.add_argument("--out", default="bench_out", help="output directory (raw JSON lines, table, plot)")
    p.add_argument("--venvs", default=os.environ.get("MLIP_BENCH_VENVS", os.path.expanduser("~/.cache/mlip-bench")))
    p.add_argument("--mlip-python", default=sys.executable, help="python of the environment with mlip")
    p.add_argument("--mlip-src", help="import mlip from this source tree (e.g. a `git worktree` of one commit) "
                                      "instead of the installed one: a fixed revision while others edit main")
    p.add_argument("--max-mem-gb", type=float, default=12.0,
                   help="per case: skip if extrapolated peak RSS exceeds it, and cap the process' data size")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per case")
    p.add_argument("--quiet-below", type=float, default=0.15,
                   help="before each case wait until other processes use less than this fraction of the CPUs")
    p.add_argument("--quiet-wait", type=float, default=180.0, help="seconds to wait for that at most (0: never wait)")
    p.add_argument("--report", metavar="RAW_JSONL", nargs="+",
                   help="only print the table and plot from raw file(s) of earlier runs (merged)")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats = [108, 864], 1
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.quick else ["float32", "float64"]
    paths = dict(DEFAULT_PEER_PATHS)
    for item in args.peer_path:
        peer, _, value = item.partition("=")
        paths[peer] = value
    args.peer_paths = {peer: paths[peer].split(",") for peer in PEERS}
    return args


# --- running one case -------------------------------------------------------------------------------
def cpu_busy_seconds() -> float:
    """CPU time spent by all processes on the machine (user + nice + system + irq), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def mlip_revision(path: str) -> str:
    """Commit of the mlip source measured, with "+dirty" if mlip/ has uncommitted changes
    (for a plain directory, e.g. ``git archive HEAD mlip | tar -x -C /tmp/mlip-REV``, its name)."""
    def git(*cmd):
        return subprocess.run(["git", "-C", path, *cmd], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit or not os.path.exists(os.path.join(git("rev-parse", "--show-toplevel"), "mlip")):
        return os.path.basename(os.path.abspath(path))
    return commit + ("+dirty" if git("status", "--porcelain", "--", ":/mlip") else "")


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the CPUs are less busy than ``threshold``; returns the wait.

    Other people's jobs on a shared machine change a step time by 10x (two OpenMP threads that
    lose their core spin at every barrier), so a case is better started a little later.
    """
    start = time.perf_counter()
    while True:
        busy0, wall0 = cpu_busy_seconds(), time.perf_counter()
        time.sleep(2.0)
        busy = (cpu_busy_seconds() - busy0) / ((time.perf_counter() - wall0) * os.cpu_count())
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait:
            return waited


def run_case(python: str, script: str, case_args, args, label: dict) -> dict:
    env = dict(os.environ)
    if args.mlip_src and label["package"].startswith("mlip"):
        env["PYTHONPATH"] = os.path.abspath(args.mlip_src) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["MLIP_BENCH_CACHE"] = os.path.join(os.path.abspath(args.out), "cache")
    env.update(label.get("env", {}))
    limit = int(args.max_mem_gb * 2**30)

    def cap_memory():
        # A case that outgrows the budget fails with an allocation error instead of waking the
        # kernel's OOM killer, which on a shared machine may pick someone else's process.
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    command = [python, script, *case_args, "--threads", str(args.threads)]
    waited = wait_for_quiet(args.quiet_below, args.quiet_wait) if args.quiet_wait > 0 else 0.0
    busy0, child0, wall0 = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout,
                              preexec_fn=cap_memory, cwd=os.getcwd())
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        stdout, stderr, code = "", f"timed out after {args.timeout:.0f} s", -1
    wall = time.perf_counter() - wall0
    busy, child = cpu_busy_seconds() - busy0, children_cpu_seconds() - child0
    outside = max(0.0, busy - child) / (wall * os.cpu_count())

    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if code == 0 and lines:
        record = json.loads(lines[-1])
    else:
        tail = [line for line in (stderr or "").strip().splitlines() if line.strip()][-3:]
        record = dict(label, error=" | ".join(tail) or f"exit code {code}")
    record.update(path=label["path"], repeat=label["repeat"], wall_s=round(wall, 1), outside_load=round(outside, 3),
                  waited_s=round(waited))
    if label["package"].startswith("mlip"):
        record["mlip_revision"] = mlip_revision(args.mlip_src or HERE)
    return record


def planned_cases(args):
    """(label, python, script, arguments) in the alternating order mlip, peer, mlip, peer, ..."""
    mlip_script = os.path.join(HERE, "run_mlip.py")

    def mlip_cases(family, extra, paths):
        for path in paths:
            label = dict(package=f"mlip-{family}", path=path)
            yield label, args.mlip_python, mlip_script, ["--family", family, "--path", path, *extra]

    def peer_cases(peer, extra, paths):
        python = os.path.join(args.venvs, f"{peer}-venv", "bin", "python")
        script = os.path.join(HERE, "peers", f"run_{peer}.py")
        variants = {"default": [False], "heap": [True], "both": [False, True]}[args.peer_malloc]
        for path in paths or args.peer_paths[peer]:
            for heap in variants:
                label = dict(package=peer, path=path + ("+heap" if heap else ""))
                if heap:  # what mlip.allocator.reuse_freed_memory() sets, by environment before start
                    label["env"] = dict(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str((1 << 31) - 1))
                yield label, python, script, ["--path", path, *extra]

    def alternate(extra, peers, mlip_paths, peer_paths=None):
        # allegro pairs with mlip-allegro, nequip and mace with mlip-nequip
        for family in args.families:
            yield from mlip_cases(family, extra, mlip_paths)
            for peer in peers:
                if COUNTERPART[peer] == f"mlip-{family}":
                    yield from peer_cases(peer, extra, peer_paths)
        for peer in peers:  # peers whose counterpart family was not selected
            if COUNTERPART[peer].removeprefix("mlip-") not in args.families:
                yield from peer_cases(peer, extra, peer_paths)

    if args.train:
        for repeat in range(args.repeats):
            extra = ["--case", "train", "--dtype", "float32"]
            # Training always runs eager models (compiled files are for inference).
            peers = [p for p in args.peers if p in TRAIN_PEERS]
            for label, python, script, case_args in alternate(extra, peers, ["eager"], ["eager"]):
                yield dict(label, case="train", dtype="float32", repeat=repeat), python, script, case_args
    if args.no_md:
        return
    for dtype in args.dtypes:
        for size in sorted(args.sizes):
            for repeat in range(args.repeats):
                extra = ["--case", "md", "--dtype", dtype, "--atoms", str(size)]
                for label, python, script, case_args in alternate(extra, args.peers, args.mlip_paths):
                    yield dict(label, case="md", dtype=dtype, atoms=size, repeat=repeat), python, script, case_args


def estimate_rss_mb(rss_by_atoms: dict, atoms: int):
    """Peak RSS at ``atoms`` extrapolated linearly from the two largest sizes measured (or
    proportionally from one, which overestimates: it scales the fixed ~500 MB of torch too)."""
    sizes = sorted(rss_by_atoms)
    if not sizes:
        return None
    n2, r2 = sizes[-1], rss_by_atoms[sizes[-1]]
    if len(sizes) == 1:
        return r2 * atoms / n2
    n1, r1 = sizes[-2], rss_by_atoms[sizes[-2]]
    return r2 + (r2 - r1) / (n2 - n1) * (atoms - n2)


def run_all(args) -> str:
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, time.strftime("raw-%Y%m%d-%H%M%S.jsonl"))
    missing = {os.path.dirname(os.path.dirname(py)) for _, py, _, _ in planned_cases(args) if not os.path.exists(py)}
    if missing:
        sys.exit(f"missing peer venv(s) {sorted(missing)}: run  bash benchmarks/peers/setup.sh")
    # Peak RSS seen per (package, path, dtype) and size, to skip sizes that cannot fit.
    seen_rss = defaultdict(dict)
    with open(raw_path, "w") as raw:
        for label, python, script, case_args in planned_cases(args):
            key = (label["package"], label["path"], label["dtype"])
            estimate = estimate_rss_mb(seen_rss[key], label.get("atoms")) if label["case"] == "md" else None
            if estimate is not None and estimate > args.max_mem_gb * 1024:
                record = dict(label, skipped=f"estimated peak RSS {estimate / 1024:.1f} GB > --max-mem-gb")
            else:
                record = run_case(python, script, case_args, args, label)
                record.setdefault("case", label["case"])
                if label["case"] == "md" and "peak_rss_mb" in record:
                    seen_rss[key][record["atoms"]] = max(record["peak_rss_mb"], seen_rss[key].get(record["atoms"], 0))
            print(json.dumps(record), flush=True)
            raw.write(json.dumps(record) + "\n")
            raw.flush()
    return raw_path


# --- report --------------------------------------------------------------------------------------------
def load(raw_path):
    with open(raw_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records):
    """Median over repeats of each (case, package, path, dtype, atoms)."""
    groups = defaultdict(list)
    for r in records:
        if "error" in r or "skipped" in r:
            continue
        groups[(r.get("case", "md"), r["package"], r["path"], r["dtype"], r.get("atoms"))].append(r)
    summary = {}
    for key, rs in groups.items():
        out = {"n": len(rs), "outside_load": max(r.get("outside_load", 0.0) for r in rs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
        if key[0] == "md":
            out["ms_per_step"] = statistics.median(r["ms_per_step"] for r in rs)
            out["atom_steps_per_s"] = key[4] / (out["ms_per_step"] / 1e3)
        else:
            out["structures_per_s"] = statistics.median(r["structures_per_s"] for r in rs)
        summary[key] = out
    return summary


def best_path(summary, case, package, dtype, atoms, rate):
    """The fastest path of a package for one case (each side is compared at its best)."""
    options = [(k, v) for k, v in summary.items() if k[0] == case and k[1] == package and k[3] == dtype and k[4] == atoms]
    return max(options, key=lambda kv: kv[1][rate], default=(None, None))


def markdown(records) -> str:
    summary = summarize(records)
    lines = []
    md_keys = sorted((k for k in summary if k[0] == "md"), key=lambda k: (k[3], k[4], k[1], k[2]))
    if md_keys:
        lines += ["### ASE MD (VelocityVerlet, periodic Cu FCC; E, F, stress every step)", "",
                  "| dtype | atoms | package | path | ms/step | atom-steps/s | peak RSS MB | repeats | outside load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in md_keys:
            v = summary[k]
            lines.append(f"| {k[3]} | {k[4]} | {k[1]} | {k[2]} | {v['ms_per_step']:.1f} | {v['atom_steps_per_s']:,.0f} | "
                         f"{v['peak_rss_mb']:.0f} | {v['n']} | {100 * v['outside_load']:.0f} % |")
        lines += ["", "### Ratios (each side at its fastest path)", "",
                  "| dtype | atoms | mlip model | peer | speed ratio (mlip / peer atom-steps/s) | memory-per-atom ratio (mlip / peer) |",
                  "|---|---|---|---|---|---|"]
        cases = sorted({(k[3], k[4]) for k in md_keys})
        for dtype, atoms in cases:
            for peer in PEERS:
                pk, pv = best_path(summary, "md", peer, dtype, atoms, "atom_steps_per_s")
                mk, mv = best_path(summary, "md", COUNTERPART[peer], dtype, atoms, "atom_steps_per_s")
                if pv is None or mv is None:
                    continue
                speed = mv["atom_steps_per_s"] / pv["atom_steps_per_s"]
                memory = mv["peak_rss_mb"] / pv["peak_rss_mb"]  # same atom count: per-atom ratio
                lines.append(f"| {dtype} | {atoms} | {mk[1]} ({mk[2]}) | {peer} ({pk[2]}) | {speed:.2f} | {memory:.2f} |")
    train_keys = sorted(k for k in summary if k[0] == "train")
    if train_keys:
        lines += ["", "### Training throughput (3BPA, 27-atom molecules, float32; forward + loss + backward + Adam)", "",
                  "| package | batch | structures/s | peak RSS MB | ratio (mlip counterpart / peer) |", "|---|---|---|---|---|"]
        for k in train_keys:
            v = summary[k]
            ratio = ""
            if not k[1].startswith("mlip"):
                _, mv = best_path(summary, "train", COUNTERPART[k[1]], k[3], k[4], "structures_per_s")
                if mv is not None:
                    ratio = f"{mv['structures_per_s'] / v['structures_per_s']:.2f}"
            batch = next((r.get("batch_size") for r in records if r.get("package") == k[1] and r.get("case") == "train"), "")
            lines.append(f"| {k[1]} ({k[2]}) | {batch} | {v['structures_per_s']:.1f} | {v['peak_rss_mb']:.0f} | {ratio} |")
    problems = [r for r in records if "error" in r or "skipped" in r]
    if problems:
        lines += ["", "### Not measured", ""]
        for r in problems:
            lines.append(f"- {r['package']} {r['path']} {r['dtype']} {r.get('atoms', 'train')}: "
                         f"{r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


def plot(records, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = summarize(records)
    series = defaultdict(list)
    for (case, package, path, dtype, atoms), v in summary.items():
        if case == "md":
            series[(package, path, dtype)].append((atoms, v["ms_per_step"]))
    colors = {"mlip-allegro": "tab:blue", "mlip-nequip": "tab:green", "allegro": "tab:orange",
              "nequip": "tab:red", "mace": "tab:purple"}
    markers = {"torchscript": "o", "eager": "s", "aoti": "^"}
    fig, ax = plt.subplots(figsize=(8, 6))
    for (package, path, dtype), points in sorted(series.items()):
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=colors.get(package, "gray"), marker=markers.get(path, "x"),
                linestyle="-" if dtype == "float32" else "--", label=f"{package} {path} {dtype}")
    sizes = sorted({a for pts in series.values() for a, _ in pts})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("atoms (periodic Cu FCC)")
    ax.set_ylabel("ms per MD step (energy, forces, stress)")
    ax.set_title("ASE MD step time, small models, CPU (solid float32, dashed float64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    raw_paths = args.report or [run_all(args)]
    records = [r for path in raw_paths for r in load(path)]
    raw_path = raw_paths[-1]
    table = markdown(records)
    base = os.path.splitext(raw_path)[0]
    if len(raw_paths) > 1:  # several runs merged: name the outputs apart from any one run
        base = os.path.join(os.path.dirname(raw_path), time.strftime("merged-%Y%m%d-%H%M%S"))
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    if any(r.get("case", "md") == "md" and "ms_per_step" in r for r in records):
        plot(records, base + ".png")
        print(f"\nplot: {base}.png", file=sys.stderr)
    print()
    print(table)
    print(f"\nraw: {' '.join(raw_paths)}  table: {base}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
