"""Energy conservation in NVE (velocity Verlet): total-energy drift in meV/atom/ps.

A conservative (gradient-head) model with a smooth cutoff conserves energy up to the
integrator's O(dt^2) fluctuations; a steady drift means non-smooth forces, a too-long time step,
or a direct-force head.

    python md_examples/nve_drift.py --temperature 600 --timestep 1 --steps 2000
"""

import numpy as np
from ase import units
from ase.md import thermalize_momenta
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

from _common import parser, setup

p = parser(__doc__.splitlines()[0])
p.add_argument("--temperature", type=float, default=600.0, help="K of the initial velocities")
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--timestep", type=float, default=1.0, help="fs")
args = p.parse_args()

atoms = setup(args)
n = len(atoms)
thermalize_momenta(atoms, args.temperature, rng=np.random.default_rng(args.seed))
Stationary(atoms)
dyn = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
times, energies = [], []  # ps, eV/atom
dyn.attach(lambda: (times.append(dyn.get_time() / (1000 * units.fs)), energies.append(atoms.get_total_energy() / n)))
dyn.run(args.steps)

times, energies = np.array(times), np.array(energies)
slope = np.polyfit(times, energies, 1)[0]  # eV/atom/ps, least squares: robust to the O(dt^2) wiggles
print(f"{n} atoms, {args.steps} steps of {args.timestep} fs ({times[-1]:.3f} ps), final T {atoms.get_temperature():.0f} K")
print(f"total energy: drift {slope * 1000:+.4f} meV/atom/ps, "
      f"fluctuation (std) {energies.std() * 1000:.4f} meV/atom, max-min {np.ptp(energies) * 1000:.4f} meV/atom")
