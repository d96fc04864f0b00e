"""The structure checks of benchmarks/lammps_stability.py on small synthetic trajectories: the
shortest distance (across periodic boundaries), the covalent bond graph of molecules (a stretched
bond is reported broken, a framework ignores its mobile ions) and the mean coordination of crystals
(a disordered frame of the same density is reported changed)."""

import pathlib
import sys

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from lammps_stability import bonds_kept, coordination_kept, shortest_distance, structure_report  # noqa: E402
from potential_checks import covalent_bonds  # noqa: E402


def jittered(atoms, seed, amplitude=0.03):
    """A copy with every atom displaced by up to ``amplitude`` Å (thermal noise, no bond broken)."""
    moved = atoms.copy()
    moved.positions += np.random.default_rng(seed).uniform(-amplitude, amplitude, size=(len(atoms), 3))
    return moved


def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.center(vacuum=5.0)
    atoms.pbc = True
    return atoms


def test_shortest_distance_sees_periodic_images_and_every_frame():
    first = Atoms("Ar2", positions=[[1.5, 5.0, 5.0], [5.0, 5.0, 5.0]], cell=[10.0, 10.0, 10.0], pbc=True)
    across = first.copy()
    across.positions[1] = [9.5, 5.0, 5.0]  # 2.0 Å from the first atom through the boundary at x = 0
    assert np.isclose(shortest_distance([first]), 3.5)
    assert np.isclose(shortest_distance([first, across, first]), 2.0)
    assert shortest_distance([first], cutoff=3.0) == np.inf


def test_a_stretched_bond_is_reported_broken():
    start = ethanol()
    frames = [start] + [jittered(start, seed) for seed in range(3)]
    kept = bonds_kept(frames)
    assert kept["kept"] and kept["bonds"] == 8, kept  # ethanol: C-C, C-O, O-H, 5 C-H

    carbon, hydrogen = next((i, j) for i, j in sorted(covalent_bonds(start))
                            if (start[i].symbol, start[j].symbol) == ("C", "H"))
    broken = jittered(start, 9)
    bond = broken.positions[hydrogen] - broken.positions[carbon]
    broken.positions[hydrogen] = broken.positions[carbon] + 2.0 * bond / np.linalg.norm(bond)  # 1.09 -> 2.0 Å
    report = bonds_kept(frames + [broken, start])
    assert not report["kept"], report
    assert report["first_changed_frame"] == len(frames)
    assert (min(carbon, hydrogen), max(carbon, hydrogen)) in report["broken"] and report["formed"] == []


def test_a_framework_ignores_its_mobile_ions():
    """elements=("C", "O"): a hydrogen leaving its molecule changes nothing; a C-O bond breaking does."""
    start = ethanol()
    hydrogen_gone = start.copy()
    hydrogen_gone.positions[-1] += [3.0, 0.0, 0.0]
    assert not bonds_kept([start, hydrogen_gone])["kept"]
    assert bonds_kept([start, hydrogen_gone], elements=("C", "O"))["kept"]
    oxygen = start.get_chemical_symbols().index("O")
    oxygen_gone = start.copy()
    oxygen_gone.positions[oxygen] += [0.0, 0.0, 3.0]
    assert not bonds_kept([start, oxygen_gone], elements=("C", "O"))["kept"]


def test_coordination_of_a_crystal_and_of_a_disordered_frame():
    """Diamond Si within 2.9 Å: 4 neighbours, kept under thermal noise; the same atoms placed at random
    in the same cell (a liquid-like frame: ~5 neighbours and close pairs) are reported changed."""
    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    frames = [crystal] + [jittered(crystal, seed, 0.1) for seed in range(3)]
    kept = coordination_kept(frames, shell=2.9)
    assert kept["kept"] and kept["first"] == 4.0 and abs(kept["last"] - 4.0) < 0.1, kept

    disordered = crystal.copy()
    disordered.positions = np.random.default_rng(0).uniform(0.0, 1.0, (len(crystal), 3)) @ crystal.cell.array
    changed = coordination_kept(frames + [disordered] + frames, shell=2.9)  # not only the last frame
    assert not changed["kept"] and changed["max_relative_deviation"] > 0.1, changed

    report = structure_report(frames + [disordered], {"shell": 2.9})
    assert report["frames"] == 5 and report["min_distance_A"] < 2.0 and not report["coordination"]["kept"]
