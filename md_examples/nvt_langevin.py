"""NVT molecular dynamics with a Langevin thermostat; prints the mean temperature and energy.

    python md_examples/nvt_langevin.py --temperature 600 --steps 2000
"""

import numpy as np
from ase import units
from ase.constraints import FixCom
from ase.md import MDLogger
from ase.md.langevin import Langevin
from ase.md import thermalize_momenta
from ase.md.velocitydistribution import Stationary

from _common import parser, setup

p = parser(__doc__.splitlines()[0])
p.add_argument("--temperature", type=float, default=300.0, help="K")
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--timestep", type=float, default=1.0, help="fs")
p.add_argument("--friction", type=float, default=0.01, help="1/fs (time constant 100 fs)")
p.add_argument("--log-interval", type=int, default=50)
args = p.parse_args()

atoms = setup(args)
rng = np.random.default_rng(args.seed)
thermalize_momenta(atoms, args.temperature, rng=rng)
Stationary(atoms)
# Centre of mass fixed by a constraint (Langevin's fixcm=True is deprecated: slightly wrong NVT).
atoms.set_constraint(FixCom())
dyn = Langevin(atoms, timestep=args.timestep * units.fs, temperature_K=args.temperature,
               friction=args.friction / units.fs, fixcm=False, rng=rng)
dyn.attach(MDLogger(dyn, atoms, "-", header=True, peratom=True), interval=args.log_interval)

samples = []  # (T, Epot per atom) over the second half, after equilibration
dyn.attach(lambda: samples.append((atoms.get_temperature(), atoms.get_potential_energy() / len(atoms)))
           if dyn.nsteps >= args.steps // 2 else None)
dyn.run(args.steps)
T, E = np.array(samples).T
print(f"second half: <T> = {T.mean():.1f} ± {T.std():.1f} K (target {args.temperature} K), "
      f"<Epot> = {E.mean():.5f} eV/atom")
