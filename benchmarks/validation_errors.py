"""Errors of a model file on the validation split a training config carves out of its data: the
numbers a shipping rule compares (a retrained potential against the model it would replace, both
on the same structures; the test set stays unseen until the decision).

    python benchmarks/validation_errors.py potentials/si-allegro/train.yaml potentials/si-allegro/model.pt

The split is the trainer's (mlip.data.dataset.split_indices over the structures of data.train, selections
such as ``file@0:900`` included, with data.val_fraction and data.split_seed, or the run's seed); the errors
are `mlip evaluate`'s on those structures, read with the config's label keys. Prints the energy MAE per
atom (meV/atom) and the force MAE (meV/Å).
"""

import argparse
import os
import tempfile

import ase.io

from mlip.data import LabelKeys, iter_structures, split_indices
from mlip.train.config import load_config
from mlip.train.evaluate import evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="training config (its data section defines the split)")
    parser.add_argument("model", help="model file to evaluate")
    args = parser.parse_args()
    config = load_config(args.config)
    if config.data.validation:
        raise SystemExit(f"{args.config}: data.validation names its own validation files: use mlip evaluate on them")
    structures = list(iter_structures(config.data.train))
    seed = config.seed if config.data.split_seed is None else config.data.split_seed
    _, validation = split_indices(len(structures), config.data.val_fraction, seed)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "validation.extxyz")
        ase.io.write(path, [structures[k] for k in validation], format="extxyz")
        errors = evaluate(args.model, [path], LabelKeys(**config.data.keys))["all"]
    print(f"{len(validation)} validation structures: energy MAE {1000 * errors['energy_per_atom_mae']:.2f} meV/atom, "
          f"force MAE {1000 * errors['forces_mae']:.1f} meV/Å")


if __name__ == "__main__":
    main()
