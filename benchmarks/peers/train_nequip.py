"""NequIP (nequip==0.19.1) side of ``benchmarks/learning.py``: train on mlip's split, print
validation errors per epoch (one JSON line each), save the best EMA weights.

Runs in the peer venv made by setup.sh; ``learning.py`` starts it with the split file it wrote:
    ~/.cache/mlip-bench/nequip-venv/bin/python benchmarks/peers/train_nequip.py --split S --data D
The training loop is written out here rather than driven by nequip's Lightning/Hydra config so
that every choice matches mlip's trainer one for one: the same train/validation indices,
reference energies, per-type force-RMS scales and average neighbor count (mlip's statistics of
the training part), Adam without AMSGrad, gradient-norm clipping, loss weight x MSE(E/atom) + MSE(F),
an EMA of the weights with mlip's warm-up ((1 + n) / (10 + n), capped at the decay), validation
of the EMA weights, and a fresh random batch order every epoch.

Like ``mlip train``: the untrained model is validated first (epoch 0), the clock starts before it,
``--minutes`` stops the run at the first step past the budget (mid-epoch: that epoch is not
validated), and ``--save`` keeps the EMA weights of the epoch with the lowest validation loss
(energy weight x MSE(E/atom) + MSE(F), mlip's ``stop.monitor: loss``) with what rebuilds the model
(``peers/score_nequip.py`` scores them on a test set). ``--parameters N`` matches a weight count:
the type embedding's width is chosen so that the model has about N weights (see ``matched``).
"""

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

import _nequip_framework as nf
from _nequip_framework import common


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", required=True, help="JSON written by learning.py (indices and statistics)")
    p.add_argument("--data", required=True, help="the extxyz file the split indexes")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--minutes", type=float, help="wall-clock budget of the training (validation included)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--energy-weight", type=float, default=20.0, help="weight of MSE(energy per atom)")
    p.add_argument("--clip", type=float, default=10.0, help="max gradient norm")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--l-max", type=int, default=2)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--type-embed-features", type=int, help="width of the type embedding (nequip's default: --features)")
    p.add_argument("--parameters", type=int, help="choose --type-embed-features for about this many weights")
    p.add_argument("--r-max", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="file for the best EMA weights and the arguments that rebuild the model")
    args = p.parse_args()
    if args.parameters is not None and args.type_embed_features is not None:
        p.error("give --parameters or --type-embed-features, not both")
    return args


def build(args, split):
    from nequip.model import NequIPGNNModel

    types = split["type_names"]
    return NequIPGNNModel(
        seed=args.seed, model_dtype="float32", type_names=types, r_max=args.r_max, num_layers=args.layers,
        l_max=args.l_max, parity=True, num_features=args.features, type_embed_num_features=args.type_embed_features,
        radial_mlp_depth=2, radial_mlp_width=64,
        num_bessels=8, polynomial_cutoff_p=6, avg_num_neighbors=split["avg_num_neighbors"],
        per_type_energy_scales=split["force_rms"],
        per_type_energy_shifts=dict(zip(types, split["reference_energies"])),
    )


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matched(args, split) -> int:
    """The type-embedding width whose model has the weight count nearest ``args.parameters``.

    The type embedding enters only the embedding itself and the self-connections (tensor products
    of the features with it: most of the weights at 64 features), so the count is linear in its
    width: two trial builds give the line. The other hyperparameters keep their names' values.
    """
    counts = [count(build(argparse.Namespace(**{**vars(args), "type_embed_features": w}), split)) for w in (1, 2)]
    width = round(1 + (args.parameters - counts[0]) / (counts[1] - counts[0]))
    if width < 1:
        raise SystemExit(f"--parameters {args.parameters}: even a type embedding of width 1 gives {counts[0]} weights")
    return width


def main():
    args = parse_args()
    common.quiet_warnings()
    common.set_threads(args.threads)
    nf.init_nequip()
    from ase.io import read
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    split = json.load(open(args.split))
    if args.parameters is not None:
        args.type_embed_features = matched(args, split)
    model = build(args, split)
    types = split["type_names"]
    transforms = [ChemicalSpeciesToAtomTypeMapper(model_type_names=types,
                                                  chemical_species_to_atom_type_map={t: t for t in types}),
                  NeighborListTransform(r_max=args.r_max)]
    frames = []
    for atoms in read(args.data, ":"):
        frame = from_ase(atoms)
        for transform in transforms:
            frame = transform(frame)
        frames.append(frame)
    energy, forces = AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY

    def batch_of(indices):
        batch = AtomicDataDict.batched_from_list([frames[i] for i in indices])
        # The model is float32; labels keep float64 so the loss sees the exact reference energies.
        inputs = {k: (v.to(torch.float32) if v.is_floating_point() else v)
                  for k, v in batch.items() if k not in (energy, forces)}
        return inputs, batch[energy].reshape(-1).double(), batch[forces].double(), batch[AtomicDataDict.NUM_NODES_KEY]

    train_idx, val_idx = np.array(split["train"]), np.array(split["val"])
    val_batches = [batch_of(val_idx[i:i + args.batch_size]) for i in range(0, len(val_idx), args.batch_size)]
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(args.seed)
    print(json.dumps({"parameters": count(model), "type_embed_features": args.type_embed_features or args.features}),
          flush=True)

    def validate(epoch):
        """Log the EMA model's validation errors; its validation loss (mlip's monitor)."""
        ema.eval()
        de, dea, df = [], [], []
        for inputs, e_ref, f_ref, num_atoms in val_batches:
            out = ema(inputs)  # forces need autograd: no torch.no_grad here
            error = (out[energy].reshape(-1).double() - e_ref).detach()
            de.append(error.numpy())
            dea.append((error / num_atoms.double()).numpy())
            df.append((out[forces].double() - f_ref).detach().numpy().ravel())
        de, dea, df = np.concatenate(de), np.concatenate(dea), np.concatenate(df)
        print(json.dumps({
            "epoch": epoch, "elapsed_s": round(time.perf_counter() - start, 1),
            "val_energy_rmse": float(np.sqrt((de ** 2).mean())), "val_energy_mae": float(np.abs(de).mean()),
            "val_forces_rmse": float(np.sqrt((df ** 2).mean())), "val_forces_mae": float(np.abs(df).mean()),
        }), flush=True)
        return args.energy_weight * float((dea ** 2).mean()) + float((df ** 2).mean())

    def over_budget():
        return args.minutes is not None and time.perf_counter() - start >= 60.0 * args.minutes

    start, updates, best = time.perf_counter(), 0, float("inf")
    validate(0)  # the untrained model, as mlip train logs it (not a candidate for the best weights)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = rng.permutation(train_idx)
        starts = range(0, len(order), args.batch_size)
        for i in starts:
            inputs, e_ref, f_ref, num_atoms = batch_of(order[i:i + args.batch_size])
            out = model(inputs)
            loss_e = (((out[energy].reshape(-1).double() - e_ref) / num_atoms.double()) ** 2).mean()
            loss_f = ((out[forces].double() - f_ref) ** 2).mean()
            loss = args.energy_weight * loss_e + loss_f
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            updates += 1
            decay = min(args.ema, (1.0 + updates) / (10.0 + updates))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p.detach(), 1.0 - decay)
            if i != starts[-1] and over_budget():  # as mlip: stop mid-epoch, that epoch unvalidated
                return
        val_loss = validate(epoch)
        if val_loss < best:
            best = val_loss
            if args.save:
                save(args, ema, epoch, val_loss)
        if over_budget():
            return


def save(args, ema, epoch: int, val_loss: float) -> None:
    """The EMA weights and the arguments that rebuild the model, written whole or not at all."""
    temporary = args.save + ".tmp"
    torch.save({"state_dict": ema.state_dict(), "args": vars(args), "epoch": epoch, "val_loss": val_loss}, temporary)
    os.replace(temporary, args.save)


if __name__ == "__main__":
    main()
