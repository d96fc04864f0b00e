"""mlip side of the benchmark: one case per process, one JSON line out (same format as the peers).

Run with mlip's own environment, e.g.
    python benchmarks/run_mlip.py --family allegro --atoms 864 --dtype float32 --path torchscript
Paths: ``eager`` (MLIPCalculator around the Python model), ``torchscript`` (the file written by
``mlip.deploy.deploy_model``, what users load with ``MLIPCalculator("model.pt")``) or ``aoti``
(the AOTInductor package, ``MLIPCalculator("model.pt2")``; compiling it takes minutes). The model is
the ``small`` preset, untrained: speed does not depend on the weights.
"""

import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def build(family: str, dtype: str, type_names=("Cu",)):
    from mlip.data.stats import DatasetStatistics
    from mlip.models import ModelConfig, build_model

    torch.manual_seed(0)
    stats = DatasetStatistics(
        type_names=list(type_names),
        reference_energies=[0.0] * len(type_names),
        force_rms=1.0,
        avg_num_neighbors=common.AVG_NUM_NEIGHBORS,
    )
    config = ModelConfig(family=family, preset="small", r_max=common.R_MAX, head="gradient")
    return build_model(config, stats, dtype=getattr(torch, dtype))


def calculator(family: str, args):
    from mlip import MLIPCalculator

    if args.path == "eager":
        return MLIPCalculator(build(family, args.dtype))
    os.makedirs(args.cache_dir, exist_ok=True)
    extension = ".pt2" if args.path == "aoti" else ".pt"
    path = os.path.abspath(os.path.join(args.cache_dir, f"mlip-{family}-{args.dtype}{extension}"))
    # Rebuilt each time so it never runs a stale file, in a child process: users load a file
    # deployed elsewhere, and scripting + the deploy check would add ~170 MB to this process' peak.
    code = f"import run_mlip; run_mlip.deploy({family!r}, {args.dtype!r}, {path!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return MLIPCalculator(path)


def deploy(family: str, dtype: str, path: str) -> None:
    from mlip.deploy import deploy_model

    deploy_model(build(family, dtype), path, format="aoti" if path.endswith(".pt2") else "torchscript")


def run_md(family: str, args) -> None:
    common.set_threads(args.threads)
    atoms = common.cu_fcc(args.atoms)
    atoms.calc = calculator(family, args)
    ms = common.time_md(atoms, args.steps, args.warmup)
    common.emit(f"mlip-{family}", args.path, args.dtype, args.atoms, ms, args.threads)


def training_step(model, optimizer, synchronize=lambda: None):
    """One optimizer step on a batch (energy per atom and force MSE, the peers' loss): the step
    every training benchmark times; ``synchronize`` waits for a GPU before the clock is read."""

    def step(batch):
        out = model(batch)
        n = batch["num_atoms"].to(torch.float64)
        loss = torch.mean(((out["energy"] - batch["energy"]) / n) ** 2)
        loss = loss + torch.mean((out["forces"] - batch["forces"]) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()

    return step


def run_train(family: str, args) -> None:
    """Training steps on 3BPA molecules: forward, energy + force MSE, backward, Adam step."""
    from mlip.allocator import reuse_freed_memory
    from mlip.data import LabelKeys, TypeMapper, atoms_to_graph, collate

    common.set_threads(args.threads)
    reuse_freed_memory()  # as mlip's trainer does
    type_names = ["C", "H", "N", "O"]
    dtype = getattr(torch, args.dtype)
    model = build(family, args.dtype, type_names)
    model.train()
    mapper = TypeMapper(type_names)
    structures = common.read_train_structures(args.train_data, args.batch_size * args.train_steps)
    graphs = [atoms_to_graph(a, common.R_MAX, mapper, LabelKeys(), require=("energy", "forces")) for a in structures]
    # Batches are built before timing: data loading is not what is compared.
    batches = [collate(graphs[i : i + args.batch_size], dtype=dtype) for i in range(0, len(graphs), args.batch_size)]
    step = training_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    seconds = common.time_train_steps(step, batches)
    common.emit_train(f"mlip-{family}", args.path, args.dtype, args.batch_size / seconds, args.threads,
                      batch_size=args.batch_size, atoms=len(structures[0]), dataset="3bpa")


def main():
    def family_option(parser):
        parser.add_argument("--family", choices=["allegro", "nequip"], default="allegro")

    args = common.md_args(__doc__.splitlines()[0], paths=["eager", "torchscript", "aoti"], default_path="torchscript",
                          extra=family_option)
    common.quiet_warnings()
    if args.case == "md":
        run_md(args.family, args)
    else:
        run_train(args.family, args)


if __name__ == "__main__":
    main()
