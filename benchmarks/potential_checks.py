"""Physical sanity of the shipped potentials: long NVT MD stays intact, relaxed lattice = DFT's.

    python benchmarks/potential_checks.py [--ps 10] [--seed 0] [--only si|ge|mo|li|3bpa|aspirin|lips [--model FILE]]
                                          [--data ../shared/data]

- Si (potentials/si-allegro): 10 ps Langevin NVT at 1000 K on a 64-atom diamond cell: no two atoms
  closer than 1.9 Å, mean coordination (< 2.9 Å) stays near 4, the temperature holds. Then a
  cell + positions relaxation (FIRE, FrechetCellFilter) compared with the DFT lattice constant
  implied by the training data (see dft_lattice_constant).
- Ge (potentials/ge-allegro): the same as Si (64-atom diamond cell, 1000 K, below the melting point
  of 1211 K; closest 2.0 Å, coordination within 3.1 Å between 3 and 5).
- Mo (potentials/mo-allegro): the same on a 54-atom bcc cell at 1000 K (closest 2.2 Å, mean
  coordination within 2.95 Å between 6 and 10) and the relaxed bcc lattice constant.
- Li (potentials/li-allegro): the same on a 54-atom bcc cell at 300 K (Li melts at 454 K; closest
  2.2 Å, mean coordination within 3.2 Å between 6 and 10).
- 3BPA (potentials/3bpa-nequip): 10 ps Langevin NVT at 600 K, 0.5 fs steps: the covalent bond graph
  (ASE natural cutoffs x 1.2) of every sampled frame equals the starting one: no bond breaks or forms.
  A committee file also reports its energy uncertainty (member spread) over the sampled frames,
  and its largest per-atom force uncertainty in each.
- rMD17 aspirin (potentials/rmd17-aspirin-nequip): the same at 500 K, the temperature of MD17's MD.
- LiPS (potentials/lips-nequip; a candidate with `--only lips --model FILE`): 10 ps
  Langevin NVT at 600 K, 1 fs steps, from the data's first frame (83 atoms, its cell): no two atoms
  closer than 1.6 Å (the data's closest pair: P-S 1.82 Å), no S-S bond (S-S within 2.4 Å; the DFT
  frames' closest S-S pair is 2.66 Å), and the P-S bond graph (pairs within 2.8 Å; in the 1000 DFT
  frames P-S distances leave a gap from 2.61 to 3.34 Å and this graph never changes) stays the
  starting one: the thiophosphate units stay intact while the lithium ions move. Reports the
  lithium mean square displacement.
--model checks another file (a candidate) in place of the shipped one. Exit status 1 if a check fails.
"""

import argparse
import os
import sys
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.constraints import FixCom
from ase.md import thermalize_momenta
from ase.neighborlist import natural_cutoffs, neighbor_list
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_nvt(atoms, temperature, timestep_fs, picoseconds, check, every=100, seed=0):
    """Langevin NVT; ``check(atoms)`` runs every ``every`` steps and returns a problem or None."""
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature, rng=rng)
    atoms.set_constraint(FixCom())  # Langevin's own fixcm is deprecated (slightly wrong NVT)
    dynamics = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                        fixcm=False, rng=rng)
    steps = int(round(picoseconds * 1000 / timestep_fs))
    temperatures, problems = [], []
    start = time.perf_counter()
    with tqdm(total=steps, desc=f"NVT {temperature} K", unit="step") as bar:
        for done in range(0, steps, every):
            dynamics.run(min(every, steps - done))
            bar.update(min(every, steps - done))
            temperatures.append(atoms.get_temperature())
            problem = check(atoms)
            if problem:
                problems.append(f"t = {(done + every) * timestep_fs / 1000:.2f} ps: {problem}")
                break
    seconds = time.perf_counter() - start
    half = len(temperatures) // 2
    return {
        "steps": steps,
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / steps,
        "mean_temperature_second_half": float(np.mean(temperatures[half:])) if temperatures else float("nan"),
        "problems": problems,
    }


def dft_lattice_constant(training_file, repeat):
    """Cubic lattice constant at zero pressure implied by the mlearn 'Elastic' DFT cells.

    The Elastic cells are a repeat x repeat x repeat conventional reference cell (Si diamond 2x2x2,
    Mo bcc 3x3x3, Li bcc 1x1x1) under +-0.5..8 % strains. The reference lattice constant is read
    from an unstrained axis; the small residual pressure of the reference is removed with a linear
    fit of the pressure against the volumetric strain of the uniaxial cells (right angles, one axis
    strained; recognised by their geometry, as the files number the strain modes 0-2 for Si/Ge and
    1-6 for Mo/Li) with |strain| <= 2 %: a0 = a_ref (1 + eps_V(P=0))^(1/3).
    """
    import ase.io

    cells = [a for a in ase.io.read(training_file, ":") if a.info.get("config_type") == "Elastic"]
    reference = float(np.median([sorted(a.cell.lengths())[1] for a in cells])) / repeat
    volume_ref = (repeat * reference) ** 3
    strains, pressures = [], []
    for a in cells:
        if np.allclose(a.cell.angles(), 90.0, atol=1e-6) and np.ptp(a.cell.lengths()) > 1e-6:
            eps_v = a.get_volume() / volume_ref - 1
            if abs(eps_v) <= 0.021:
                strains.append(eps_v)
                pressures.append(-a.get_stress()[:3].mean())
    slope, intercept = np.polyfit(strains, pressures, 1)
    eps_zero = -intercept / slope
    return reference * (1 + eps_zero) ** (1 / 3), reference, len(strains)


# element: (crystal, starting a (Å), MD supercell, NVT K, closest allowed (Å), shell (Å),
#           allowed mean coordination within the shell, Elastic reference repeat)
CRYSTALS = {
    "Si": ("diamond", 5.43, 2, 1000, 1.9, 2.9, (3.0, 5.0), 2),  # crystal or liquid-like Si: 4-5
    "Ge": ("diamond", 5.78, 2, 1000, 2.0, 3.1, (3.0, 5.0), 2),  # below the 1211 K melting point; bonds 2.50 Å
    "Mo": ("bcc", 3.16, 3, 1000, 2.2, 2.95, (6.0, 10.0), 3),  # bcc: 8 nearest neighbours at 2.74 Å
    "Li": ("bcc", 3.44, 3, 300, 2.2, 3.2, (6.0, 10.0), 1),  # melts at 454 K; 8 neighbours at 2.98 Å
}


def check_crystal(element, model, data, picoseconds, seed):
    """NVT of a supercell stays a solid of sane coordination; relaxed a0 within 0.02 Å of DFT's."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from mlip import MLIPCalculator

    structure, a0, size, temperature, closest, shell, (low, high), elastic_repeat = CRYSTALS[element]
    results = {}
    atoms = bulk(element, structure, a=a0, cubic=True).repeat((size, size, size))
    atoms.calc = MLIPCalculator(model)

    def intact(a):
        i, d = neighbor_list("id", a, shell)
        if neighbor_list("d", a, closest).size:
            return f"two atoms closer than {closest} Å"
        coordination = np.bincount(i, minlength=len(a)).mean()
        if not low < coordination < high:
            return f"mean coordination {coordination:.2f} within {shell} Å (expected {low}-{high})"
        return None

    results[f"nvt_{temperature}K"] = run_nvt(atoms, temperature, 1.0, picoseconds, intact, seed=seed)

    crystal = bulk(element, structure, a=a0, cubic=True)
    crystal.calc = MLIPCalculator(model)
    FIRE(FrechetCellFilter(crystal), logfile=None).run(fmax=1e-4, steps=500)
    a_model = float(np.cbrt(crystal.get_volume()))
    training = os.path.join(data, "mlearn_zuo2020", f"{element}_training.extxyz.gz")
    a_dft, a_reference, n = dft_lattice_constant(training, elastic_repeat)
    results["lattice_constant"] = {
        "model": a_model,
        "dft": a_dft,
        "dft_reference_cell": a_reference,
        "fit_points": n,
        "difference": a_model - a_dft,
    }
    failures = list(results[f"nvt_{temperature}K"]["problems"])
    if abs(a_model - a_dft) > 0.02:
        failures.append(f"lattice constant {a_model:.4f} Å vs DFT {a_dft:.4f} Å (> 0.02 Å apart)")
    return results, failures


def covalent_bonds(atoms, elements=None) -> set:
    """Pairs (i < j) closer than 1.2 x the sum of ASE's natural (covalent) radii, periodic images
    included; with ``elements``, only pairs of atoms of those elements (e.g. a P-S framework whose
    lithium ions move)."""
    cutoffs = [1.2 * c for c in natural_cutoffs(atoms)]
    i, j = neighbor_list("ij", atoms, cutoffs)
    keep = i < j
    if elements is not None:
        mine = np.isin(atoms.get_chemical_symbols(), list(elements))
        keep &= mine[i] & mine[j]
    return {(int(x), int(y)) for x, y in zip(i[keep], j[keep])}


def check_molecule(first_frame_file, temperature, model, data, picoseconds, seed):
    """Langevin NVT (0.5 fs) from the first frame of a training file: the covalent bond graph
    (pairs closer than 1.2 x the sum of ASE's natural radii) must stay the starting one."""
    import ase.io

    from mlip import MLIPCalculator

    atoms = ase.io.read(os.path.join(data, first_frame_file), 0)
    atoms.calc = MLIPCalculator(model)
    reference = covalent_bonds(atoms)
    uncertainties, force_uncertainties = [], []  # eV and eV/Å (largest over atoms), committee files only

    def intact(a):
        if "energy_uncertainty" in a.calc.results:
            uncertainties.append(a.calc.results["energy_uncertainty"])
        if "force_uncertainty" in a.calc.results:
            force_uncertainties.append(a.calc.results["force_uncertainty"].max())
        now = covalent_bonds(a)
        if now != reference:
            broken, formed = sorted(reference - now), sorted(now - reference)
            return f"bonds broken {broken[:5]}, formed {formed[:5]}"
        return None

    key = f"nvt_{temperature}K"
    results = {key: run_nvt(atoms, temperature, 0.5, picoseconds, intact, seed=seed), "bonds": len(reference)}
    if uncertainties:
        results["energy_uncertainty_meV"] = {"mean": 1000 * float(np.mean(uncertainties)),
                                             "max": 1000 * float(np.max(uncertainties))}
    if force_uncertainties:
        results["max_atom_force_uncertainty_meV_per_A"] = {"mean": 1000 * float(np.mean(force_uncertainties)),
                                                          "max": 1000 * float(np.max(force_uncertainties))}
    return results, list(results[key]["problems"])


def check_lips(model, data, picoseconds, seed, temperature=600):
    """NVT of the LiPS cell: thiophosphate units intact, no S-S bond, no overlapping atoms; Li mean square
    displacement."""
    import ase.io

    from mlip import MLIPCalculator

    atoms = ase.io.read(os.path.join(data, "lips_nequip", "lips_val_1000.extxyz.gz"), 0)
    atoms.calc = MLIPCalculator(model)
    phosphorus, sulfur, lithium = (atoms.numbers == 15), (atoms.numbers == 16), (atoms.numbers == 3)

    def ps_bonds(i, j):
        return {(int(x), int(y)) for x, y in zip(i, j) if phosphorus[x] and sulfur[y]}

    reference = ps_bonds(*neighbor_list("ij", atoms, 2.8))
    start = atoms.get_positions()  # unwrapped by ASE's MD (positions are not wrapped back into the cell)

    def intact(a):
        i, j, d = neighbor_list("ijd", a, 2.8)  # one list for the three criteria
        if (d < 1.6).any():
            return "two atoms closer than 1.6 Å"
        close_sulfur = d[sulfur[i] & sulfur[j] & (d < 2.4)]
        if close_sulfur.size:
            return f"an S-S bond formed ({close_sulfur.min():.2f} Å; the DFT frames' closest S-S pair: 2.66 Å)"
        now = ps_bonds(i, j)
        if now != reference:
            return f"P-S bonds broken {sorted(reference - now)[:5]}, formed {sorted(now - reference)[:5]}"
        return None

    key = f"nvt_{temperature}K"
    results = {key: run_nvt(atoms, temperature, 1.0, picoseconds, intact, seed=seed), "ps_bonds": len(reference)}
    displacement = atoms.get_positions() - start
    results["li_msd_A2"] = float((displacement[lithium] ** 2).sum(axis=1).mean())
    results["p_s_msd_A2"] = float((displacement[phosphorus | sulfur] ** 2).sum(axis=1).mean())
    return results, list(results[key]["problems"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--ps", type=float, default=10.0, help="length of each NVT run, ps")
    parser.add_argument("--only", choices=["si", "ge", "mo", "li", "3bpa", "aspirin", "lips"])
    parser.add_argument("--model", help="model file to check instead of the shipped one (needs --only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the thermostat noise")
    args = parser.parse_args(argv)
    if args.model and not args.only:
        parser.error("--model needs --only (which potential's checks to run on it)")
    checks = {
        "si": ("si-allegro", lambda *a: check_crystal("Si", *a)),
        "ge": ("ge-allegro", lambda *a: check_crystal("Ge", *a)),
        "mo": ("mo-allegro", lambda *a: check_crystal("Mo", *a)),
        "li": ("li-allegro", lambda *a: check_crystal("Li", *a)),
        "3bpa": ("3bpa-nequip", lambda *a: check_molecule("3bpa/train_300K.xyz", 600, *a)),
        # rMD17 was sampled at 500 K (MD17's ab-initio MD)
        "aspirin": ("rmd17-aspirin-nequip",
                    lambda *a: check_molecule("rmd17/rmd17_aspirin_train_01.extxyz.gz", 500, *a)),
        "lips": ("lips-nequip", check_lips),
    }
    failed = False
    for key, (name, check) in checks.items():
        if args.only and key != args.only:
            continue
        model = args.model or os.path.join(ROOT, "potentials", name, "model.pt")
        if not os.path.exists(model):
            print(f"{name}: no model file at {model}: not checked (pass a candidate with --only {key} --model FILE)")
            failed |= bool(args.only)  # asked for this check alone: it did not run
            continue
        results, failures = check(model, args.data, args.ps, args.seed)
        print(f"{name}: {results}")
        print(f"{name}: {'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}")
        failed |= bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
