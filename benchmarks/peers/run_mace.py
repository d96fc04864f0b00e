"""MACE (mace-torch==0.3.16) side of the benchmark: one case per process, one JSON line out.

Run with the peer venv made by setup.sh, e.g.
    ~/.cache/mlip-bench/mace-venv/bin/python benchmarks/peers/run_mace.py --atoms 864 --dtype float32
Only the eager path: MACE's ASE calculator evaluates the eager model (its TorchScript file is
meant for LAMMPS), and ``compile_mode`` (torch.compile) recompiles for every new system size.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402


def build(dtype: str):
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
            num_elements=1,
            hidden_irreps=o3.Irreps("32x0e+32x1o"),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.zeros(1),
            avg_num_neighbors=common.AVG_NUM_NEIGHBORS,
            atomic_numbers=[29],
            correlation=3,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
            radial_MLP=[64, 64, 64],
            radial_type="bessel",
        )
    finally:
        torch.set_default_dtype(previous)


def main():
    args = common.md_args(__doc__.splitlines()[0], paths=["eager"], default_path="eager")
    if args.case != "md":
        sys.exit("run_mace.py: only --case md is implemented (MACE training throughput: see PEERS.md)")
    common.quiet_warnings()
    common.set_threads(args.threads)
    from mace.calculators import MACECalculator

    model = build(args.dtype)
    calc = MACECalculator(models=model, device="cpu", default_dtype=args.dtype)
    atoms = common.cu_fcc(args.atoms)
    atoms.calc = calc
    ms = common.time_md(atoms, args.steps, args.warmup)
    common.emit("mace", args.path, args.dtype, args.atoms, ms, args.threads)


if __name__ == "__main__":
    main()
