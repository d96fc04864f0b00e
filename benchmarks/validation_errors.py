"""Errors of a model file on the validation split a training config carves out of its data: the
numbers a shipping rule compares (a retrained potential against the model it would replace, both
on the same structures; the test set stays unseen until the decision).

    python benchmarks/validation_errors.py potentials/si-allegro/train.yaml potentials/si-allegro/model.pt

The split is the trainer's (mlip.data.dataset.split_indices with data.val_fraction and data.split_seed,
or the run's seed). Prints the energy MAE per atom (meV/atom) and the force MAE (meV/Å).
"""

import argparse

import ase.io
import numpy as np

from mlip import MLIPCalculator
from mlip.data.dataset import split_indices
from mlip.train.config import load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="training config (its data section defines the split)")
    parser.add_argument("model", help="model file to evaluate")
    args = parser.parse_args()
    config = load_config(args.config)
    if config.data.validation:
        raise SystemExit(f"{args.config}: data.validation names its own validation files: use mlip evaluate on them")
    frames = [atoms for path in config.data.train for atoms in ase.io.read(path, ":")]
    seed = config.seed if config.data.split_seed is None else config.data.split_seed
    _, validation = split_indices(len(frames), config.data.val_fraction, seed)
    calc = MLIPCalculator(args.model)
    energy, forces = [], []
    for k in validation:
        reference = frames[k]
        atoms = reference.copy()
        atoms.calc = calc
        energy.append(abs(atoms.get_potential_energy() - reference.get_potential_energy()) / len(atoms))
        forces.append(np.abs(atoms.get_forces() - reference.get_forces()).ravel())
    print(f"{len(validation)} validation structures: energy MAE {1000 * np.mean(energy):.2f} meV/atom, "
          f"force MAE {1000 * np.mean(np.concatenate(forces)):.1f} meV/Å")


if __name__ == "__main__":
    main()
