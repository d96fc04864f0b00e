"""NPT molecular dynamics: isotropic MTK barostat + Nose-Hoover chains (ase.md.nose_hoover_chain).

Prints the mean volume and lattice constant (thermal expansion: compare with relax.py at 0 K).

    python md_examples/npt.py --temperature 300 --pressure 0 --steps 4000
"""

import numpy as np
from ase import units
from ase.md import MDLogger
from ase.md.nose_hoover_chain import IsotropicMTKNPT
from ase.md import thermalize_momenta
from ase.md.velocitydistribution import Stationary

from _common import parser, setup

p = parser(__doc__.splitlines()[0])
p.add_argument("--temperature", type=float, default=300.0, help="K")
p.add_argument("--pressure", type=float, default=0.0, help="GPa")
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--timestep", type=float, default=1.0, help="fs")
p.add_argument("--log-interval", type=int, default=50)
args = p.parse_args()

atoms = setup(args)
volume0 = atoms.get_volume()
thermalize_momenta(atoms, args.temperature, rng=np.random.default_rng(args.seed))
Stationary(atoms)
dt = args.timestep * units.fs
# Damping times of 100 and 1000 steps, as ASE recommends for the MTK integrator.
dyn = IsotropicMTKNPT(atoms, timestep=dt, temperature_K=args.temperature, pressure_au=args.pressure * units.GPa,
                      tdamp=100 * dt, pdamp=1000 * dt)
dyn.attach(MDLogger(dyn, atoms, "-", header=True, stress=True, peratom=True), interval=args.log_interval)
volumes = []
dyn.attach(lambda: volumes.append(atoms.get_volume()) if dyn.nsteps >= args.steps // 2 else None)
dyn.run(args.steps)

v = np.mean(volumes)
print(f"second half: <V> = {v / len(atoms):.4f} ± {np.std(volumes) / len(atoms):.4f} Å^3/atom "
      f"({(v / volume0 - 1) * 100:+.2f}% vs the start)")
if args.structure.startswith("bulk:") and len(args.structure.split(":")) > 3:
    a0 = float(args.structure.split(":")[3])
    print(f"<a> = {a0 * (v / volume0) ** (1 / 3):.4f} Å at {args.temperature} K, {args.pressure} GPa")
