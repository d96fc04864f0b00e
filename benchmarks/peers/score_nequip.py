"""Test errors of a model saved by ``train_nequip.py --save``: energy and force RMSE as JSON (eV, eV/Å).

Runs in the peer venv (``learning.py`` starts it):
    ~/.cache/mlip-bench/nequip-venv/bin/python benchmarks/peers/score_nequip.py --model M --split S --test T
The model is rebuilt from the saved arguments and ``split.json`` (its statistics), the saved EMA
weights loaded, and every test structure predicted in float32, BATCH structures per call, the
errors accumulated in float64 as mlip's ``evaluate`` does: energy per structure, forces per
Cartesian component.
"""

import argparse
import json

import numpy as np
import torch

import _nequip_framework as nf
from _nequip_framework import common
from train_nequip import build

BATCH = 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="file written by train_nequip.py --save")
    p.add_argument("--split", required=True, help="the split.json the model was trained with")
    p.add_argument("--test", required=True, help="labelled structures (extxyz, anything ase.io reads)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main():
    args = parse_args()
    common.quiet_warnings()
    common.set_threads(args.threads)
    nf.init_nequip()
    from ase.io import read
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    saved = torch.load(args.model, weights_only=False)
    split = json.load(open(args.split))
    model = build(argparse.Namespace(**saved["args"]), split)
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    # e3nn's tensor products compile their code on first use and keep its constants as buffers:
    # a trained model has them, a fresh one not yet. Any other difference is a different model.
    unexpected = [name for name in unexpected if "._compiled_" not in name]
    if missing or unexpected:
        raise SystemExit(f"{args.model} does not fit the model its arguments build: missing {missing}, "
                         f"unexpected {unexpected}")
    model.eval()
    types = split["type_names"]
    transforms = [ChemicalSpeciesToAtomTypeMapper(model_type_names=types,
                                                  chemical_species_to_atom_type_map={t: t for t in types}),
                  NeighborListTransform(r_max=saved["args"]["r_max"])]
    structures = read(args.test, ":")
    energy, forces = AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY
    de, df = [], []
    for start in range(0, len(structures), BATCH):
        frames = []
        for atoms in structures[start:start + BATCH]:
            frame = from_ase(atoms)
            for transform in transforms:
                frame = transform(frame)
            frames.append(frame)
        batch = AtomicDataDict.batched_from_list(frames)
        inputs = {k: (v.to(torch.float32) if v.is_floating_point() else v)
                  for k, v in batch.items() if k not in (energy, forces)}
        out = model(inputs)  # forces need autograd: no torch.no_grad here
        de.append((out[energy].reshape(-1).double() - batch[energy].reshape(-1).double()).detach().numpy())
        df.append((out[forces].double() - batch[forces].double()).detach().numpy().ravel())
    de, df = np.concatenate(de), np.concatenate(df)
    print(json.dumps({"energy_rmse": float(np.sqrt((de ** 2).mean())), "forces_rmse": float(np.sqrt((df ** 2).mean())),
                      "num_structures": len(structures), "epoch": saved["epoch"],
                      "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
