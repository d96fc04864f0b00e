"""The structure checks of benchmarks/lammps_stability.py on small synthetic trajectories: the
shortest distance (across periodic boundaries), the covalent bond graph of molecules (a stretched
bond is reported broken, a framework ignores its mobile ions) and the mean coordination of crystals
(a disordered frame of the same density is reported changed); which pair came closest, when, and
whether it came closer than any pair of the same elements in the training data."""

import pathlib
import sys

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from lammps_stability import (bonds_kept, closest_pairs, coordination_kept, shortest_distance,  # noqa: E402
                              structure_report, training_minima)
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
    pair = (min(carbon, hydrogen), max(carbon, hydrogen))
    report = bonds_kept(frames + [broken, broken, broken, start])  # broken for 3 frames: a lasting change
    assert not report["kept"], report
    assert report["first_changed_frame"] == len(frames)
    assert pair in report["broken"] and report["formed"] == []
    assert not bonds_kept(frames + [start, broken])["kept"]  # broken at the end: counts


def test_a_bond_stretched_for_one_frame_is_transient():
    """LiPS at 600 K: one P-S bond past its cutoff (2.65 > 2.54 Å) in one frame of 101, back at 2.21 Å in
    the next: a vibration, not a broken framework."""
    start = ethanol()
    carbon, hydrogen = next((i, j) for i, j in sorted(covalent_bonds(start))
                            if (start[i].symbol, start[j].symbol) == ("C", "H"))
    stretched = start.copy()
    bond = stretched.positions[hydrogen] - stretched.positions[carbon]
    stretched.positions[hydrogen] = stretched.positions[carbon] + 2.0 * bond / np.linalg.norm(bond)
    for frames in ([start, stretched, start, start], [start, stretched, stretched, start, start]):
        report = bonds_kept(frames)
        assert report["kept"] and report["transient"] == 1, report
        assert report["first_transient"] == {"frame": 1, "pair": (min(carbon, hydrogen), max(carbon, hydrogen))}
    assert not bonds_kept([start, stretched, stretched, stretched, start])["kept"]
    assert bonds_kept([start, stretched, stretched, stretched, start], persist=4)["kept"]


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


def lips_like(seed=None):
    """Li2PS2 in an 8 Å cell: P-S 2.0 Å, Li-S 2.5 Å, Li-Li 3.0 Å, every other pair farther (S-S 4.7); with
    ``seed``, thermal noise of up to 0.03 Å."""
    atoms = Atoms("Li2PS2", positions=[[1.0, 1.0, 1.0], [4.0, 1.0, 1.0], [1.0, 5.0, 5.0], [3.0, 5.0, 5.0],
                                       [1.0, 1.0, 3.5]], cell=[8.0, 8.0, 8.0], pbc=True)
    return atoms if seed is None else jittered(atoms, seed)


def test_the_closest_pair_is_named_with_its_atoms_frame_and_time():
    """Li atoms 1 and 2 (LAMMPS ids) meet at 1.4 Å across the boundary in frame 3 (step 300 of 1 fs):
    min 1.4 Å, Li-Li, ids [1, 2], frame 3, 0.3 ps; the other pairs keep their own minima."""
    frames = [lips_like(seed) for seed in range(5)]
    for k, atoms in enumerate(frames):
        atoms.info["timestep"] = 100 * k  # as ase reads a LAMMPS dump
    frames[3].positions[1] = [8.0 - 0.4, 1.0, 1.0]  # 1.4 Å from Li 1 through x = 0
    report = structure_report(frames, {"elements": ("P", "S")}, timestep_fs=1.0)
    contact = frames[3].get_distance(0, 1, mic=True)
    assert abs(contact - 1.4) < 0.1 and np.isclose(report["min_distance_A"], contact)
    closest = report["closest_pair"]
    assert (closest["elements"], closest["ids"], closest["frame"]) == ("Li-Li", [1, 2], 3), closest
    assert np.isclose(closest["time_ps"], 0.3) and np.isclose(closest["distance_A"], contact)
    by_pair = report["min_distance_by_pair_A"]
    assert list(by_pair) == sorted(by_pair) and {"Li-Li", "Li-S", "P-S"} <= set(by_pair), by_pair
    assert abs(by_pair["P-S"] - 2.0) < 0.1 and abs(by_pair["Li-S"] - 2.5) < 0.1
    assert "below_training_data" not in report  # no training data given: nothing claimed


def test_pairs_closer_than_the_training_data_are_flagged():
    """Training minima from frames of the unperturbed structure: thermal noise (0.03 Å) stays inside
    the 0.1 Å margin, the Li-Li contact at 1.4 Å (training 3.0) is flagged, and so is an S-S pair
    at 3.0 Å that the training data never had within the 4 Å neighbour cutoff."""
    training = {label: pair["distance_A"] for label, pair in closest_pairs([lips_like(seed) for seed in range(3)]).items()}
    assert "S-S" not in training and abs(training["Li-Li"] - 3.0) < 0.1

    frames = [lips_like(seed) for seed in range(10, 14)]
    assert structure_report(frames, {"elements": ("P", "S")}, training=training)["below_training_data"] == {}

    contact = lips_like(20)
    contact.positions[1] = [2.4, 1.0, 1.0]  # Li-Li 1.4 Å
    contact.positions[4] = [3.0, 5.0, 2.0]  # S-S 3.0 Å (P-S 3.6, Li-S 4.2: not below their training minima)
    outside = structure_report(frames + [contact], {"elements": ("P", "S")}, training=training)["below_training_data"]
    assert set(outside) == {"Li-Li", "S-S"}, outside
    assert np.isclose(outside["Li-Li"]["md_A"], 1.4, atol=0.05) and outside["Li-Li"]["training_A"] == training["Li-Li"]


def test_training_minima_read_the_frames_the_config_selects(tmp_path):
    """A config naming ``../named/frames.extxyz@1:3`` is read from the data folder given instead (frames
    1 and 2 only: frame 0's close Li-Li pair is not training data); a missing file stops with its name."""
    contact = lips_like()
    contact.positions[1] = [2.4, 1.0, 1.0]  # Li-Li 1.4 Å, frame 0: outside the selection
    data = tmp_path / "data"
    data.mkdir()
    ase.io.write(data / "frames.extxyz", [contact, lips_like(1), lips_like(2), contact])
    config = tmp_path / "potential" / "train.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  train: [../named/frames.extxyz@1:3]\n")

    minima = training_minima(str(config), str(data), named_data=str(tmp_path / "named"))
    assert minima["frames"] == 2 and minima["files"] == ["frames.extxyz@1:3"], minima
    expected = {label: pair["distance_A"] for label, pair in closest_pairs([lips_like(1), lips_like(2)]).items()}
    assert minima["min_distance_by_pair_A"] == pytest.approx(expected, abs=1e-6)  # extxyz keeps ~8 digits
    with pytest.raises(FileNotFoundError, match="frames.extxyz"):
        training_minima(str(config), str(tmp_path), named_data=str(tmp_path / "named"))
