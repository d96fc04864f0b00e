"""MACE (mace-torch==0.3.16) side of the benchmark: one case per process, one JSON line out.

Run with the peer venv made by setup.sh, e.g.
    ~/.cache/mlip-bench/mace-venv/bin/python benchmarks/peers/run_mace.py --atoms 864 --dtype float32
MD and training (--case train). Only the eager path: MACE's ASE calculator evaluates the eager
model (its TorchScript file is meant for LAMMPS), and ``compile_mode`` (torch.compile)
recompiles for every new system size.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402


def build(dtype: str, atomic_numbers=(29,)):
    """The matched small MACE model (PEERS.md): 75.9 K parameters for Cu."""
    import torch

    # mace must be imported before e3nn: e3nn 0.4.4 loads its constants with torch.load, which
    # only works once mace has switched off torch's weights_only default.
    from mace import modules
    from e3nn import o3

    # MACE builds its parameters in torch's default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        return modules.ScaleShiftMACE(
            r_max=common.R_MAX,
            num_bessel=8,
            num_polynomial_cutoff=6,
            max_ell=3,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2,
            num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps("32x0e+32x1o"),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.zeros(len(atomic_numbers)),
            avg_num_neighbors=common.AVG_NUM_NEIGHBORS,
            atomic_numbers=list(atomic_numbers),
            correlation=3,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
            radial_MLP=[64, 64, 64],
            radial_type="bessel",
        )
    finally:
        torch.set_default_dtype(previous)


def run_train(args) -> None:
    """Training steps on 3BPA molecules: forward, energy + force MSE, backward, Adam step."""
    import torch
    from mace import data, tools
    from mace.tools import torch_geometric

    torch.set_default_dtype(getattr(torch, args.dtype))  # MACE's data and model follow it
    numbers = [1, 6, 7, 8]
    model = build(args.dtype, numbers)
    model.train()
    z_table = tools.AtomicNumberTable(numbers)
    structures = common.read_train_structures(args.train_data, args.batch_size * args.train_steps)
    keys = data.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    graphs = []
    for atoms in structures:
        # ASE's reader put the labels on a calculator; MACE reads them from info / arrays.
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        config = data.config_from_atoms(atoms, key_specification=keys)
        graphs.append(data.AtomicData.from_config(config, z_table=z_table, cutoff=common.R_MAX))
    # Batches are built before timing: data loading is not what is compared.
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=args.batch_size, shuffle=False)
    batches = [batch.to_dict() for batch in loader]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        out = model(batch, training=True, compute_force=True)
        n = batch["ptr"][1:] - batch["ptr"][:-1]
        loss = torch.mean(((out["energy"] - batch["energy"]) / n) ** 2)
        loss = loss + torch.mean((out["forces"] - batch["forces"]) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = common.time_train_steps(step, batches)
    common.emit_train("mace", args.path, args.dtype, args.batch_size / seconds, args.threads,
                      batch_size=args.batch_size, atoms=len(structures[0]), dataset="3bpa")


def main():
    args = common.md_args(__doc__.splitlines()[0], paths=["eager"], default_path="eager")
    common.quiet_warnings()
    common.set_threads(args.threads)
    if args.case == "train":
        run_train(args)
        return
    from mace.calculators import MACECalculator

    model = build(args.dtype)
    calc = MACECalculator(models=model, device="cpu", default_dtype=args.dtype)
    atoms = common.cu_fcc(args.atoms)
    atoms.calc = calc
    ms = common.time_md(atoms, args.steps, args.warmup)
    common.emit("mace", args.path, args.dtype, args.atoms, ms, args.threads)


if __name__ == "__main__":
    main()
