"""Shared command-line bits of the examples: model path, structure, threads."""

import argparse
from pathlib import Path

import torch

from mlip import MLIPCalculator
from mlip.calculators.cli import read_structure

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "potentials" / "si-allegro" / "model.pt"
DEFAULT_STRUCTURE = "bulk:Si:diamond:5.43:3x3x3"  # 216 atoms


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help=f"deployed model (default {DEFAULT_MODEL})")
    p.add_argument("--structure", default=DEFAULT_STRUCTURE,
                   help="structure file or bulk:SYMBOL:CRYSTAL:A:NxMxK spec (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args):
    """The structure with an MLIPCalculator attached."""
    if not Path(args.model).is_file():
        raise SystemExit(f"no model at {args.model}: train one or pass --model (see md_examples/README.md)")
    if args.threads:
        torch.set_num_threads(args.threads)
    atoms = read_structure(args.structure)
    atoms.calc = MLIPCalculator(args.model)
    return atoms
