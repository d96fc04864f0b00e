"""`mlip relax` and `mlip md`: quick relaxations and MD runs of a deployed model through ASE.

    mlip relax model.pt POSCAR --cell -o relaxed.extxyz
    mlip md model.pt bulk:Cu:fcc:3.61:5x5x5 --temperature 300 --steps 1000 --ensemble nvt --traj md.traj

STRUCTURE is any file ase.io.read reads (last frame; for `mlip relax`, a file of several frames is
relaxed frame by frame, many per model call: mlip/calculators/batched.py), or a spec:
``bulk:SYMBOL[:CRYSTAL[:A[:NxMxK]]]`` (conventional cubic cell where the crystal has one, e.g.
``bulk:Si:diamond:5.43:3x3x3``) or ``molecule:NAME`` (ase.build.molecule, no cell).
"""

import argparse
import contextlib
import math
import os
import sys
from typing import Optional


def read_structure(spec: str):
    """An ase.Atoms from a file name or a ``bulk:...`` / ``molecule:...`` spec; ValueError or OSError
    naming ``spec`` for anything that is not a structure with at least one atom."""
    if spec.startswith("bulk:"):
        atoms = _bulk(spec)
    elif spec.startswith("molecule:"):
        from ase.build import molecule

        name = spec.split(":", 1)[1]
        try:
            atoms = molecule(name)
        except KeyError:
            raise ValueError(f"structure spec {spec!r}: ase.build.molecule does not know {name!r}") from None
    else:
        atoms = _read_file(spec)
    if len(atoms) == 0:
        raise ValueError(f"structure {spec!r} has no atoms")
    from ..data.atoms import check_structure

    try:  # the calculator checks again; here the message can name the file or spec
        check_structure(atoms)
    except ValueError as error:
        raise ValueError(f"structure {spec!r}: {error}") from None
    return atoms


def _bulk(spec: str):
    from ase.build import bulk
    from ase.data import chemical_symbols

    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise ValueError(f"structure spec {spec!r}: expected bulk:SYMBOL[:CRYSTAL[:A[:NxMxK]]]")
    symbol = parts[0]
    if symbol not in chemical_symbols[1:]:
        raise ValueError(f"structure spec {spec!r}: {symbol!r} is not an element symbol")
    crystal = parts[1] if len(parts) > 1 and parts[1] else None
    a = None
    if len(parts) > 2 and parts[2]:
        try:
            a = float(parts[2])
        except ValueError:
            a = math.nan
        if not math.isfinite(a) or a <= 0:
            raise ValueError(f"structure spec {spec!r}: the lattice constant must be a positive number of Å, "
                             f"got {parts[2]!r}")
    repeat = (1, 1, 1)
    if len(parts) > 3:
        try:
            repeat = tuple(int(n) for n in parts[3].lower().split("x"))
        except ValueError:
            repeat = ()
        if len(repeat) != 3 or min(repeat) < 1:
            raise ValueError(f"structure spec {spec!r}: repeat must look like 3x3x3, got {parts[3]!r}")
    # MD wants orthogonal boxes: conventional cubic cells, orthorhombic for hexagonal crystals.
    shape = {"orthorhombic": True} if crystal in ("hcp", "wurtzite") else {"cubic": True}
    try:
        atoms = bulk(symbol, crystal, a=a, **shape)
    except (ValueError, KeyError, RuntimeError, AssertionError) as error:  # ase asserts on degenerate cells
        raise ValueError(f"structure spec {spec!r}: ase.build.bulk failed: {str(error) or type(error).__name__}") from None
    return atoms.repeat(repeat)


def _read_file(path: str):
    from ..files import read_atoms

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no structure file {path!r} (or give a spec: bulk:SYMBOL[:CRYSTAL[:A[:NxMxK]]], molecule:NAME)"
        )
    return read_atoms(path, "structure file", index=-1)


def register(commands) -> None:
    from ..cli import FINITE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, device

    relax = commands.add_parser(
        "relax", help="relax atom positions (and the cell) with a deployed model",
        description="Relax a structure with FIRE or BFGS; --cell also relaxes the cell (FrechetCellFilter; "
                    "needs a model that gives the stress, i.e. a gradient force head).",
    )
    relax.add_argument("model", help="deployed model file (mlip deploy)")
    relax.add_argument("structure", help="structure file, or bulk:SYMBOL[:CRYSTAL[:A[:NxMxK]]], molecule:NAME")
    relax.add_argument("--cell", action="store_true",
                       help="relax the cell too (to zero stress; periodic only; of several frames, the fully periodic "
                            "ones)")
    relax.add_argument("--fmax", type=POSITIVE, default=0.01, help="force convergence, eV/Å (default 0.01)")
    relax.add_argument("--steps", type=NON_NEGATIVE_INT, default=1000, help="maximum optimizer steps (default 1000)")
    relax.add_argument("--optimizer", choices=("FIRE", "BFGS"), default="FIRE")
    relax.add_argument("-o", "--output", help="write the relaxed structure (extxyz or any ase.io format; "
                                              "checked before the relaxation, replaced only when complete)")
    relax.add_argument("--device", type=device, default="cpu")
    relax.add_argument("--batch-atoms", type=POSITIVE_INT, default=None,
                       help="a file of several frames is relaxed in batches of about this many atoms per model "
                            "call (default 2000; mlip/calculators/batched.py)")
    relax.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                       help="several frames: stop at a frame that cannot be evaluated, or skip it (default stop)")
    relax.set_defaults(run=run_relax)

    md = commands.add_parser(
        "md", help="molecular dynamics with a deployed model (ASE integrators)",
        description="NVE (velocity Verlet), NVT (Langevin) or NPT (isotropic MTK, Nose-Hoover chains; needs a "
                    "model that gives the stress, i.e. a gradient force head).",
    )
    md.add_argument("model", help="deployed model file (mlip deploy)")
    md.add_argument("structure", help="structure file, or bulk:SYMBOL[:CRYSTAL[:A[:NxMxK]]], molecule:NAME")
    md.add_argument("--temperature", type=NON_NEGATIVE, required=True, help="K (initial temperature for NVE)")
    md.add_argument("--steps", type=NON_NEGATIVE_INT, required=True)
    md.add_argument("--timestep", type=POSITIVE, default=1.0, help="fs (default 1)")
    md.add_argument("--ensemble", choices=("nve", "nvt", "npt"), default="nvt")
    md.add_argument("--pressure", type=FINITE, default=0.0, help="GPa, NPT only (default 0)")
    md.add_argument("--friction", type=NON_NEGATIVE, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    md.add_argument("--traj", help="write frames to this file (.traj, .extxyz, ...; checked before the run, "
                                   "replaced when the run ends; an interrupted run keeps the frames written)")
    md.add_argument("--interval", type=POSITIVE_INT, default=10, help="steps between written frames (default 10)")
    md.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of the initial velocities and the thermostat")
    md.add_argument("--device", type=device, default="cpu")
    md.add_argument("--replicas", type=POSITIVE_INT, default=None,
                    help="K independent runs of the structure (seeds SEED..SEED+K-1), one model call per step for all "
                         "(a file of several frames: one run per frame); nve/nvt")
    md.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                    help="several runs: stop at a frame that cannot be run, or skip it and run the others (default "
                         "stop; frames already written are kept either way)")
    md.set_defaults(run=run_md)


def _calculator(args):
    from ..files import check_input
    from .ase import MLIPCalculator

    check_input(args.model, "model file")
    return MLIPCalculator(args.model, device=args.device)


def _output_format(path: str, argument: str, frames: int = 1) -> str:
    """The ase.io format of an output file, checked before any work: writable, known, able to hold
    ``frames`` frames."""
    from ase.io.formats import filetype, ioformats

    from ..files import check_output

    check_output(path, argument)
    try:
        name = filetype(path, read=False)
    except Exception:  # ase raises several kinds for a name it cannot place
        raise ValueError(f"{argument} {path!r}: ase.io does not know this file format (use e.g. .extxyz or .traj)") from None
    form = ioformats.get(name)
    if form is None or not form.can_write:
        raise ValueError(f"{argument} {path!r}: ase.io cannot write the {name!r} format (use e.g. .extxyz or .traj)")
    if frames > 1 and form.single:
        raise ValueError(f"{argument} {path!r}: the {name!r} format holds one frame; use .extxyz or .traj")
    return name


def _needs_stress(atoms, what: str, model: str) -> None:
    """Refuse, before any step, a run that needs the stress where the model or the cell gives none."""
    if not atoms.pbc.all():
        raise ValueError(f"{what} needs a structure periodic in all three directions (pbc={atoms.pbc.tolist()})")
    if "stress" not in atoms.calc.implemented_properties:
        raise ValueError(f"{what} needs the stress, which {model} does not give (a direct-force head predicts "
                         "none): use a gradient-head model")


def run_relax(args: argparse.Namespace) -> int:
    import numpy as np
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE
    from tqdm import tqdm

    from ..files import atomic_output
    from .batched import has_several_frames, run_relax_many

    if has_several_frames(args.structure):
        return run_relax_many(args)
    output_format = _output_format(args.output, "--output") if args.output else None
    atoms = read_structure(args.structure)
    atoms.calc = _calculator(args)
    if args.cell:
        _needs_stress(atoms, "--cell", args.model)
    target = FrechetCellFilter(atoms) if args.cell else atoms
    optimizer = {"FIRE": FIRE, "BFGS": BFGS}[args.optimizer](target, logfile=None)
    energy0 = atoms.get_potential_energy()
    converged = False
    latest = atoms.copy()  # the structure of the latest step (what -o gets if the run is stopped)
    with tqdm(total=args.steps, desc="relax", unit="step", file=sys.stderr) as bar:
        try:
            for converged in optimizer.irun(fmax=args.fmax, steps=args.steps):
                fmax = float(np.sqrt((target.get_forces() ** 2).sum(axis=1).max()))
                bar.set_postfix(E=f"{atoms.get_potential_energy():.4f} eV", fmax=f"{fmax:.3g}")
                bar.update(optimizer.nsteps - bar.n)  # irun also yields once before the first step
                latest = atoms.copy()
        except (Exception, KeyboardInterrupt) as error:
            # No lost work: Ctrl-C or an error at step 900 still leaves the structure of step 899 (not
            # after a write error, which the output would meet again).
            if args.output and optimizer.nsteps > 0 and not isinstance(error, OSError):
                import ase.io

                with atomic_output(args.output) as tmp:
                    ase.io.write(tmp, latest, format=output_format)
                print(f"\nmlip relax: stopped after {optimizer.nsteps} steps; wrote the latest structure "
                      f"(not relaxed) to {args.output}", file=sys.stderr)
            raise
    energy = atoms.get_potential_energy()
    n = len(atoms)
    print(f"{'converged' if converged else 'NOT converged'} after {optimizer.nsteps} steps (fmax {args.fmax} eV/Å)")
    print(f"energy {energy:.6f} eV ({energy / n:.6f} eV/atom), change {(energy - energy0) / n * 1000:.3f} meV/atom")
    if atoms.pbc.all():
        lengths, angles = atoms.cell.cellpar()[:3], atoms.cell.cellpar()[3:]
        print(f"cell lengths {np.round(lengths, 5).tolist()} Å, angles {np.round(angles, 3).tolist()} deg, "
              f"volume {atoms.get_volume() / n:.4f} Å^3/atom")
        if "stress" in atoms.calc.implemented_properties:  # a direct-force head gives none
            print(f"stress {np.round(atoms.get_stress() * 160.21766208, 4).tolist()} GPa (xx yy zz yz xz xy)")
    if args.output:
        import ase.io

        with atomic_output(args.output) as tmp:
            ase.io.write(tmp, _frozen(atoms, args.output), format=output_format)
        print(f"wrote {args.output}")
    return 0 if converged else 1


def _frozen(atoms, path: str):
    """A copy carrying the current results, so writers store energy/forces without calling the
    model again. Results ASE has no property name for go to the copy's info (a committee's
    energy_uncertainty, committee_energies) or, one value per atom, its arrays (force_uncertainty):
    extxyz keeps both (and viewers such as OVITO can color atoms by an array); .traj files keep
    only standard arrays, so there the per-atom values go to info too."""
    from ase.calculators.calculator import all_properties
    from ase.calculators.singlepoint import SinglePointCalculator

    from ..data import keys

    frame = atoms.copy()
    results = atoms.calc.results
    for key, value in results.items():
        if key == keys.FORCE_UNCERTAINTY and not path.endswith(".traj"):
            frame.arrays[key] = value
        elif key not in all_properties:
            frame.info[key] = value
    frame.calc = SinglePointCalculator(frame, **{key: value for key, value in results.items() if key in all_properties})
    return frame


def run_md(args: argparse.Namespace) -> int:
    import numpy as np
    from ase.md import thermalize_momenta
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from tqdm import tqdm

    from ..files import atomic_output
    from .batched import has_several_frames, run_md_many

    if args.replicas is not None or has_several_frames(args.structure):
        return run_md_many(args)
    frames = args.steps // args.interval + 1
    traj_format = _output_format(args.traj, "--traj", frames) if args.traj else None
    atoms = read_structure(args.structure)
    atoms.calc = _calculator(args)
    if args.ensemble == "npt":
        _needs_stress(atoms, "--ensemble npt", args.model)
    atoms.get_potential_energy()  # bad input (unknown element, overlaps) fails here, before any file is written
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, args.temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dyn = make_dynamics(atoms, args.ensemble, args.timestep, args.temperature, args.pressure, args.friction, rng)

    n = len(atoms)
    with contextlib.ExitStack() as files, tqdm(total=args.steps, desc=f"md {args.ensemble}", unit="step",
                                                file=sys.stderr) as bar:
        writer = None
        if args.traj:
            tmp = files.enter_context(atomic_output(args.traj))
            writer = files.enter_context(_trajectory_writer(tmp, traj_format, atoms))
            dyn.attach(writer, interval=args.interval)

        def report():
            if dyn.nsteps == 0:  # observers are also called once before the first step
                return
            epot = atoms.get_potential_energy() / n
            postfix = dict(T=f"{atoms.get_temperature():.0f} K", Epot=f"{epot:.4f}",
                           Etot=f"{epot + atoms.get_kinetic_energy() / n:.4f} eV/atom")
            if args.ensemble == "npt":
                postfix["V"] = f"{atoms.get_volume() / n:.3f} Å^3/atom"
            if "force_uncertainty" in atoms.calc.results:  # a committee: watch for unfamiliar structures
                postfix["max_dF"] = f"{atoms.calc.results['force_uncertainty'].max():.3f} eV/Å"
            bar.set_postfix(postfix)
            bar.update(1)

        dyn.attach(report, interval=1)
        try:
            dyn.run(args.steps)
        except (Exception, KeyboardInterrupt) as error:
            # No lost work: the frames written before a blow-up or Ctrl-C are kept under the target's
            # name (complete frames). Not after a write error: that file may end in half a frame.
            if writer is not None and writer.frames and not isinstance(error, OSError):
                writer.close()
                os.replace(tmp, args.traj)
                print(f"\nmlip md: kept the {writer.frames} frames written before the error in {args.traj}",
                      file=sys.stderr)
            raise
    if writer is not None:
        print(f"wrote {args.traj} ({writer.frames} frames)")
    print(f"{args.steps} steps of {args.timestep} fs: T {atoms.get_temperature():.1f} K, "
          f"Epot {atoms.get_potential_energy() / n:.6f} eV/atom")
    return 0


def make_dynamics(atoms, ensemble: str, timestep_fs: float, temperature_K: float, pressure_GPa: float = 0.0,
                  friction_per_fs: float = 0.01, rng: Optional[object] = None):
    """An ASE integrator. NPT uses the MTK barostat with Nose-Hoover chains (ase >= 3.25),
    isotropic cell fluctuations; damping times 100 and 1000 time steps, as ASE recommends."""
    from ase import units

    dt = timestep_fs * units.fs
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt":
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin

        # Keep the centre of mass fixed by a constraint: Langevin's own fixcm=True samples NVT
        # slightly wrongly (deprecated since ase 3.28).
        atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        return Langevin(atoms, timestep=dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                        fixcm=False, rng=rng)
    if ensemble == "npt":
        from ase.md.nose_hoover_chain import IsotropicMTKNPT

        if not atoms.pbc.all():
            raise ValueError(f"NPT needs a structure periodic in all three directions (pbc={atoms.pbc.tolist()})")
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature_K, pressure_au=pressure_GPa * units.GPa,
                               tdamp=100 * dt, pdamp=1000 * dt)
    raise ValueError(f"unknown ensemble {ensemble!r}; choose nve, nvt or npt")


class _trajectory_writer:
    """Writes the current frame with its energy/forces to a new file (.traj via ase.io.Trajectory,
    other formats appended by ase.io.write); a context manager that closes the file."""

    def __init__(self, path: str, format: str, atoms):
        self.path, self.format, self.atoms = path, format, atoms
        self.frames = 0
        self.trajectory = None
        if format == "traj":
            from ase.io import Trajectory

            self.trajectory = Trajectory(path, "w", atoms)

    def __call__(self):
        if self.trajectory is not None:
            self.trajectory.write(_frozen(self.atoms, self.path))
        else:
            import ase.io

            ase.io.write(self.path, _frozen(self.atoms, self.path), format=self.format, append=True)
        self.frames += 1

    def close(self):
        if self.trajectory is not None:
            self.trajectory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
