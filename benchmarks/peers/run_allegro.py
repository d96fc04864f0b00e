"""Allegro (nequip-allegro==0.8.3) side of the benchmark: one case per process, one JSON line out.

Run with the peer venv made by setup.sh, e.g.
    ~/.cache/mlip-bench/allegro-venv/bin/python benchmarks/peers/run_allegro.py --atoms 864 --dtype float32
Paths: ``eager`` (the model in Python) or ``aoti`` (an AOTInductor file, compiled once per dtype
into --cache-dir, 20-50 s). PEERS.md measured AOTI 6x slower than eager for Allegro on CPU.
"""

import _nequip_framework as nf
from _nequip_framework import common


def build(dtype: str, type_names=("Cu",)):
    """The matched small Allegro model (PEERS.md): 31.2 K parameters for Cu."""
    from allegro.model import AllegroModel

    return AllegroModel(
        seed=0,
        model_dtype=dtype,
        type_names=list(type_names),
        r_max=common.R_MAX,
        num_layers=2,
        l_max=1,
        parity=True,
        radial_chemical_embed={
            "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
            "num_bessels": 8,
            "polynomial_cutoff_p": 6,
        },
        radial_chemical_embed_dim=32,
        scalar_embed_mlp_hidden_layers_depth=1,
        scalar_embed_mlp_hidden_layers_width=64,
        num_scalar_features=32,
        num_tensor_features=32,
        allegro_mlp_hidden_layers_depth=1,
        allegro_mlp_hidden_layers_width=64,
        readout_mlp_hidden_layers_depth=1,
        readout_mlp_hidden_layers_width=32,
        avg_num_neighbors=common.AVG_NUM_NEIGHBORS,
        per_type_energy_scales=1.0,
        per_type_energy_shifts=0.0,
    )


def main():
    args = common.md_args(__doc__.splitlines()[0], paths=["eager", "aoti"], default_path="eager")
    common.quiet_warnings()
    nf.init_nequip()
    if args.case == "md":
        nf.run_md("allegro", lambda: build(args.dtype), args)
    else:
        nf.run_train("allegro", lambda types: build(args.dtype, types), args)


if __name__ == "__main__":
    main()
