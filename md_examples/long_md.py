"""A long NVT run writing a trajectory, with a progress bar (Langevin; resumable by --start).

    python md_examples/long_md.py --steps 100000 --interval 100 --traj si_300K.traj
    ase gui si_300K.traj          # or: python -c "import ase.io; print(len(ase.io.read('si_300K.traj', ':')))"
"""

import numpy as np
from ase import units
from ase.constraints import FixCom
from ase.io import Trajectory
from ase.md.langevin import Langevin
from ase.md import thermalize_momenta
from ase.md.velocitydistribution import Stationary
from tqdm import tqdm

from _common import parser, setup

p = parser(__doc__.splitlines()[0])
p.add_argument("--temperature", type=float, default=300.0, help="K")
p.add_argument("--steps", type=int, default=10000)
p.add_argument("--timestep", type=float, default=1.0, help="fs")
p.add_argument("--friction", type=float, default=0.002, help="1/fs (weak: dynamics stay close to NVE)")
p.add_argument("--interval", type=int, default=100, help="steps between frames")
p.add_argument("--traj", default="long_md.traj")
p.add_argument("--start", help="continue from the last frame (positions and momenta) of this trajectory")
args = p.parse_args()

atoms = setup(args)
rng = np.random.default_rng(args.seed)
if args.start:
    last = Trajectory(args.start)[-1]
    atoms.set_cell(last.cell)
    atoms.set_positions(last.positions)
    atoms.set_momenta(last.get_momenta())
else:
    thermalize_momenta(atoms, args.temperature, rng=rng)
    Stationary(atoms)
# Centre of mass fixed by a constraint (Langevin's fixcm=True is deprecated: slightly wrong NVT).
atoms.set_constraint(FixCom())
dyn = Langevin(atoms, timestep=args.timestep * units.fs, temperature_K=args.temperature,
               friction=args.friction / units.fs, fixcm=False, rng=rng)
with Trajectory(args.traj, "w", atoms) as trajectory, tqdm(total=args.steps, unit="step") as bar:
    dyn.attach(trajectory.write, interval=args.interval)

    def progress():
        bar.update(dyn.nsteps - bar.n)
        bar.set_postfix(T=f"{atoms.get_temperature():.0f} K", Epot=f"{atoms.get_potential_energy() / len(atoms):.4f} eV/atom")

    dyn.attach(progress, interval=max(1, args.interval // 10))
    dyn.run(args.steps)
    bar.update(dyn.nsteps - bar.n)
print(f"wrote {args.traj}: {args.steps // args.interval + 1} frames, every {args.interval * args.timestep} fs")
