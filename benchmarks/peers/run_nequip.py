"""NequIP (nequip==0.19.1) side of the benchmark: one case per process, one JSON line out.

Run with the peer venv made by setup.sh, e.g.
    ~/.cache/mlip-bench/nequip-venv/bin/python benchmarks/peers/run_nequip.py --atoms 864 --dtype float32
Paths: ``eager`` (the model in Python) or ``aoti`` (an AOTInductor file, compiled once per dtype
into --cache-dir, 20-50 s). PEERS.md measured eager as fast as or faster than AOTI in float32.
"""

import _nequip_framework as nf
from _nequip_framework import common


def build(dtype: str, type_names=("Cu",)):
    """The matched small NequIP model (PEERS.md): 58.4 K parameters for Cu."""
    from nequip.model import NequIPGNNModel

    return NequIPGNNModel(
        seed=0,
        model_dtype=dtype,
        type_names=list(type_names),
        r_max=common.R_MAX,
        num_layers=2,
        l_max=1,
        parity=True,
        num_features=32,
        radial_mlp_depth=2,
        radial_mlp_width=64,
        num_bessels=8,
        polynomial_cutoff_p=6,
        avg_num_neighbors=common.AVG_NUM_NEIGHBORS,
        per_type_energy_scales=1.0,
        per_type_energy_shifts=0.0,
    )


def main():
    args = common.md_args(__doc__.splitlines()[0], paths=["eager", "aoti"], default_path="eager")
    common.quiet_warnings()
    nf.init_nequip()
    if args.case == "md":
        nf.run_md("nequip", lambda: build(args.dtype), args)
    else:
        nf.run_train("nequip", lambda types: build(args.dtype, types), args)


if __name__ == "__main__":
    main()
