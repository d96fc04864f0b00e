"""Relax positions and cell (FrechetCellFilter) and print the lattice constant.

    python md_examples/relax.py --model potentials/si-allegro/model.pt --structure bulk:Si:diamond:5.43:2x2x2
"""

import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE

from _common import parser, setup

p = parser(__doc__.splitlines()[0])
p.add_argument("--optimizer", choices=("FIRE", "BFGS"), default="BFGS")
p.add_argument("--fmax", type=float, default=1e-3, help="eV/Å on atoms and (scaled) cell (default 1e-3)")
p.add_argument("--steps", type=int, default=500)
args = p.parse_args()

atoms = setup(args)
volume0 = atoms.get_volume()
# Small random displacements: a perfect crystal has zero forces by symmetry, rattling checks the
# optimizer really finds the minimum.
atoms.rattle(0.02, seed=args.seed)
optimizer = {"FIRE": FIRE, "BFGS": BFGS}[args.optimizer](FrechetCellFilter(atoms))
converged = optimizer.run(fmax=args.fmax, steps=args.steps)

n = len(atoms)
print(f"converged: {converged} after {optimizer.nsteps} steps")
print(f"energy {atoms.get_potential_energy() / n:.6f} eV/atom, volume {atoms.get_volume() / n:.4f} Å^3/atom")
print(f"residual stress {np.abs(atoms.get_stress()).max() * 160.2177:.4f} GPa")
print("cell lengths (Å):", np.round(atoms.cell.lengths(), 5), "angles (deg):", np.round(atoms.cell.angles(), 3))
if args.structure.startswith("bulk:") and len(args.structure.split(":")) > 3:
    a0 = float(args.structure.split(":")[3])
    # The cubic cell scaled isotropically: a = a0 (V / V0)^(1/3).
    print(f"lattice constant a = {a0 * (atoms.get_volume() / volume0) ** (1 / 3):.4f} Å (start {a0} Å)")
