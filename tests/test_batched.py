"""Many structures per model call: batched relaxation == ASE one by one, bad frames, the CLI."""

import os

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

from mlip import MLIPCalculator
from mlip.calculators.batched import BatchedModel, _expm_frechet_adjoint, relax_many
from mlip.cli import main
from test_calculator import one_thread  # noqa: F401 (autouse: one torch thread in this module)

SI_MODEL = os.path.join(os.path.dirname(__file__), "..", "potentials", "si-allegro", "model.pt")


def si_structures(count: int, seed: int = 0):
    """Mixed sizes (2-16 atoms): strained, rattled Si crystals and small Si clusters (no cell)."""
    rng = np.random.default_rng(seed)
    structures = []
    for k in range(count):
        if k % 4 == 3:  # a cluster: a fragment of the diamond lattice, rattled
            atoms = bulk("Si", "diamond", a=5.43, cubic=True)[: 3 + k % 5]
            atoms.pbc, atoms.cell = False, np.zeros((3, 3))
        else:
            crystal = [bulk("Si", "diamond", a=5.43), bulk("Si", "diamond", a=5.43, cubic=True),
                       bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))][k % 3]
            strain = np.eye(3) + rng.normal(scale=0.015, size=(3, 3))
            atoms = crystal.copy()
            atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)
        structures.append(atoms)
    return structures


def relax_with_ase(atoms, cell, fmax, steps):
    atoms = atoms.copy()
    atoms.calc = MLIPCalculator(SI_MODEL)
    optimizer = FIRE(FrechetCellFilter(atoms) if cell and atoms.pbc.all() else atoms, logfile=None)
    converged = optimizer.run(fmax=fmax, steps=steps)
    return atoms, converged, optimizer.nsteps


@pytest.mark.parametrize("cell,count", [(True, 20), pytest.param(False, 20, marks=pytest.mark.slow)])
def test_batched_relaxation_equals_ase_one_by_one(cell, count):
    """Cells of 2-16 atoms (crystals and clusters) relaxed in batches of ~40 atoms, structures
    leaving and joining the batch, == each relaxed alone by ASE's FIRE (+ FrechetCellFilter)
    (15 s on a quiet 2-core machine, 40 s on a busy one: ASE's one-by-one runs are most of it)."""
    structures = si_structures(count)
    fmax, steps = 0.05, 200
    results = list(relax_many(BatchedModel(SI_MODEL), structures, fmax=fmax, steps=steps, cell=cell, batch_atoms=40))
    assert sorted(r.frame for r in results) == list(range(count))
    assert [r.frame for r in results] != list(range(count))  # they leave when done, not in input order
    for result in results:
        assert result.error is None
        expected, converged, nsteps = relax_with_ase(structures[result.frame], cell, fmax, steps)
        relaxed = result.atoms
        assert relaxed.info["relax_converged"] == converged
        assert relaxed.info["relax_steps"] == nsteps
        energy_difference = relaxed.get_potential_energy() - expected.get_potential_energy()
        assert abs(energy_difference) / len(relaxed) < 1e-4
        assert np.abs(relaxed.cell.cellpar()[:3] - expected.cell.cellpar()[:3]).max() < 1e-3
        assert np.abs(relaxed.positions - expected.positions).max() < 1e-3
        if cell and relaxed.pbc.all():
            assert np.abs(relaxed.cell.array - structures[result.frame].cell.array).max() > 1e-3  # the cell moved
            np.testing.assert_allclose(relaxed.get_stress(), expected.get_stress(), atol=1e-5)


def test_frechet_adjoint_matches_scipy():
    """The cell forces use sum_ij L(A, E_mn)_ij G_ij (ASE loops over expm_frechet)."""
    from scipy.linalg import expm_frechet

    rng = np.random.default_rng(1)
    a, g = rng.normal(scale=0.3, size=(3, 3)), rng.normal(size=(3, 3))
    expected = np.zeros((3, 3))
    for m in range(3):
        for n in range(3):
            direction = np.zeros((3, 3))
            direction[m, n] = 1.0
            expected[m, n] = (expm_frechet(a, direction, compute_expm=False) * g).sum()
    actual = _expm_frechet_adjoint(torch.tensor(a)[None], torch.tensor(g)[None])[0].numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-12)


def test_batched_stress_and_forces_equal_the_calculator():
    """Per-structure virials of one batched call == MLIPCalculator on each structure alone."""
    structures = si_structures(6, seed=3)
    model = BatchedModel(SI_MODEL)
    results = list(relax_many(model, structures, steps=0, cell=True))
    for result in results:
        atoms = structures[result.frame].copy()
        atoms.calc = MLIPCalculator(SI_MODEL)
        np.testing.assert_allclose(result.atoms.get_forces(), atoms.get_forces(), atol=1e-5)
        assert abs(result.atoms.get_potential_energy() - atoms.get_potential_energy()) < 1e-4
        if atoms.pbc.all():
            np.testing.assert_allclose(result.atoms.get_stress(), atoms.get_stress(), atol=1e-6)
            assert np.abs(atoms.get_stress()).max() > 1e-3


def write_frames(path, structures):
    ase.io.write(path, structures)
    return str(path)


def test_cli_unconverged_frames_are_flagged_not_dropped(tmp_path, capsys):
    structures = si_structures(5, seed=2)
    inputs = write_frames(tmp_path / "in.extxyz", structures)
    output = tmp_path / "relaxed.extxyz"
    code = main(["relax", SI_MODEL, inputs, "--cell", "--steps", "3", "-o", str(output)])
    assert code == 1
    frames = ase.io.read(output, index=":")
    assert [f.info["frame_index"] for f in frames] == list(range(5))
    assert not any(f.info["relax_converged"] for f in frames)
    assert all(f.info["relax_steps"] == 3 for f in frames)
    assert "stress" in frames[0].calc.results and frames[0].get_potential_energy() < 0
    assert "0 converged" in capsys.readouterr().out


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_cli_bad_frame_is_named_and_skipped_or_stops(tmp_path, capsys, on_error):
    """A Cu frame among Si frames (the model knows Si only): named; skipped, or the run stops there,
    and the frames relaxed before it are written either way."""
    structures = si_structures(4, seed=4)
    structures[2] = bulk("Cu", "fcc", a=3.6)
    inputs = write_frames(tmp_path / "in.extxyz", structures)
    output = tmp_path / "relaxed.extxyz"
    # one structure per batch: frames 0 and 1 are finished before frame 2 is read
    argv = ["relax", SI_MODEL, inputs, "--steps", "20", "--batch-atoms", "1", "--on-error", on_error,
            "-o", str(output)]
    code = main(argv)
    assert code != 0
    err = capsys.readouterr().err
    assert "frame 2 of" in err and "['Cu'] not known" in err
    if on_error == "stop":
        assert "stopped at frame 2" in err
    kept = [0, 1] if on_error == "stop" else [0, 1, 3]
    assert [f.info["frame_index"] for f in ase.io.read(output, index=":")] == kept


def test_overlapping_atoms_and_constraints_fail_their_frame_only():
    """Overlapping atoms (found in the batched call) and constraints (which a batched run would
    silently ignore) fail their own structure; the others relax."""
    from ase.constraints import FixAtoms

    structures = si_structures(4, seed=5)
    broken = structures[1].copy()
    broken.positions[1] = broken.positions[0] + 0.1
    structures[1] = broken
    structures[2].set_constraint(FixAtoms([0]))
    results = {r.frame: r for r in relax_many(BatchedModel(SI_MODEL), structures, steps=5)}
    assert "apart" in results[1].error and results[1].atoms is None
    assert "FixAtoms" in results[2].error
    assert results[0].error is None and results[3].error is None


def test_cli_single_frame_keeps_the_ase_path(tmp_path):
    """One frame (or a spec) still goes through ASE's optimizers, BFGS included."""
    inputs = write_frames(tmp_path / "one.extxyz", si_structures(1))
    assert main(["relax", SI_MODEL, inputs, "--optimizer", "BFGS", "--steps", "2"]) in (0, 1)


def ase_md(atoms, ensemble, seed, steps, temperature=800.0, timestep=2.0, friction=0.02):
    """What `mlip md --seed SEED` does with one structure."""
    from ase.md import thermalize_momenta
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    from mlip.calculators.cli import make_dynamics

    atoms = atoms.copy()
    atoms.calc = MLIPCalculator(SI_MODEL)
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    make_dynamics(atoms, ensemble, timestep, temperature, 0.0, friction, rng).run(steps)
    return atoms


@pytest.mark.parametrize("ensemble", ["nve", "nvt"])
def test_batched_md_runs_equal_ase_runs(ensemble):
    """Different structures (a crystal, a cluster) and replicas of one with different seeds, run
    together == each run alone with ASE's VelocityVerlet / Langevin (+ FixCom), same seeds."""
    from mlip.calculators.batched import md_many

    crystal, other, cluster = si_structures(4, seed=6)[0], si_structures(4, seed=6)[1], si_structures(4, seed=6)[3]
    structures, seeds = [crystal, crystal, other, cluster], [0, 1, 2, 3]
    final = md_many(BatchedModel(SI_MODEL), structures, ensemble, 800.0, 8, timestep_fs=2.0, friction_per_fs=0.02,
                    seeds=seeds)
    assert np.abs(final[0].positions - final[1].positions).max() > 1e-3  # replicas differ by their seeds
    for atoms, structure, seed in zip(final, structures, seeds):
        expected = ase_md(structure, ensemble, seed, 8)
        np.testing.assert_allclose(atoms.positions, expected.positions, atol=1e-6)
        np.testing.assert_allclose(atoms.get_momenta(), expected.get_momenta(), atol=1e-5)  # float32 model


def test_cli_md_replicas(tmp_path):
    traj = tmp_path / "md.extxyz"
    inputs = write_frames(tmp_path / "in.extxyz", si_structures(1))
    assert main(["md", SI_MODEL, inputs, "--replicas", "3", "--temperature", "300", "--steps", "4",
                 "--interval", "2", "--traj", str(traj)]) == 0
    frames = ase.io.read(traj, index=":")
    assert [(f.info["step"], f.info["replica"]) for f in frames] == [(s, k) for s in (0, 2, 4) for k in range(3)]
    assert main(["md", SI_MODEL, inputs, "--replicas", "2", "--temperature", "300", "--steps", "2",
                 "--ensemble", "npt"]) != 0  # batched NPT is not there: refused, not run wrongly


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_cli_md_bad_frame_is_named_and_skipped_or_stops(tmp_path, capsys, on_error):
    """MD of every frame of a file with a Cu frame among Si ones: named; skipped (the other runs go
    on, the trajectory holds them only) or the run stops there, keeping the frames already written."""
    structures = si_structures(4, seed=6)
    structures[2] = bulk("Cu", "fcc", a=3.6)
    inputs = write_frames(tmp_path / "in.extxyz", structures)
    traj = tmp_path / "md.extxyz"
    code = main(["md", SI_MODEL, inputs, "--temperature", "300", "--steps", "2", "--interval", "2",
                 "--traj", str(traj), "--on-error", on_error])
    captured = capsys.readouterr()
    assert "frame 2" in captured.err and "['Cu'] not known" in captured.err
    if on_error == "stop":  # one group of runs: frame 2 stopped it before any step
        assert code != 0 and not traj.exists()
    else:
        assert code == 1 and "skipped frames [2]" in captured.out
        frames = ase.io.read(traj, index=":")
        assert [(f.info["step"], f.info["replica"]) for f in frames] == [(s, k) for s in (0, 2) for k in (0, 1, 3)]


def test_cli_md_run_failing_mid_way_is_taken_out_of_the_trajectory(tmp_path, monkeypatch, capsys):
    """--on-error skip, a run that fails after frames were written (e.g. atoms that come too close):
    its group runs again without it, and the trajectory holds no frame of the failed attempt."""
    from mlip.calculators import batched

    run_md = batched.md_many
    attempts = []

    def failing_once(model, structures, *args, **kwargs):
        attempts.append(len(structures))
        if len(attempts) == 1:  # the first attempt writes step 0 of all three runs, then run 1 fails
            observe = args[6]  # md_many(model, structures, ensemble, T, steps, dt, friction, seeds, observer)
            observe(0, [a.copy() for a in structures])
            raise batched.FrameError(1, "atoms 0 and 1 are 0.2 Å apart")
        return run_md(model, structures, *args, **kwargs)

    monkeypatch.setattr(batched, "md_many", failing_once)
    inputs = write_frames(tmp_path / "in.extxyz", si_structures(3, seed=8))
    traj = tmp_path / "md.extxyz"
    code = main(["md", SI_MODEL, inputs, "--temperature", "300", "--steps", "2", "--interval", "2",
                 "--traj", str(traj), "--on-error", "skip"])
    assert code == 1 and attempts == [3, 2]
    assert "frame 1: atoms 0 and 1 are 0.2 Å apart (skipped)" in capsys.readouterr().err
    frames = ase.io.read(traj, index=":")
    assert [(f.info["step"], f.info["replica"]) for f in frames] == [(s, k) for s in (0, 2) for k in (0, 2)]


def test_atoms_far_outside_their_cell_keep_float32_accuracy():
    """MD carries atoms out of the cell; an atom 1e5 cells away must see the same forces in a
    float32 model (the engine wraps in float64 before the cast)."""
    atoms = si_structures(1, seed=7)[0]
    far = atoms.copy()
    far.positions[1] += 1e5 * far.cell.array[0] - 3e4 * far.cell.array[2]
    near, away = (next(iter(relax_many(BatchedModel(SI_MODEL), [a], steps=0))).atoms for a in (atoms, far))
    np.testing.assert_allclose(away.get_forces(), near.get_forces(), atol=1e-4)
    np.testing.assert_allclose(away.get_stress(), near.get_stress(), atol=1e-6)


def test_skin_reuse_follows_the_same_md_trajectory():
    """Neighbor lists kept between steps (skin 0.3 Å) give the energies, step by step, of lists
    built anew every step (skin 0); hot MD carries atoms past half the skin, so some are rebuilt."""
    from mlip.calculators.batched import md_many

    structures = si_structures(4, seed=8)[:2] + [si_structures(4, seed=8)[3]]  # two crystals, a cluster
    runs = {}
    for skin in (0.3, 0.0):
        model, energies = BatchedModel(SI_MODEL, skin=skin), []
        md_many(model, structures, "nvt", 3000.0, 30, timestep_fs=4.0, friction_per_fs=0.02,
                observer=lambda step, frames: energies.append([f.get_potential_energy() for f in frames]), interval=1)
        runs[skin] = (np.array(energies), model.lists_built)
    (reused, built_reused), (fresh, built_fresh) = runs[0.3], runs[0.0]
    assert built_fresh == 3 * 31  # every structure, every step
    assert 3 < built_reused < built_fresh / 2  # rebuilt when atoms moved far, reused in between
    assert np.ptp(fresh, axis=0).max() > 0.1  # the structures moved (eV)
    np.testing.assert_allclose(reused, fresh, atol=1e-5)


def test_skin_lists_are_rebuilt_when_atoms_move_far_or_the_cell_shrinks():
    """A pair that was beyond r_max + skin comes within r_max (an atom moved 4.4 Å; a cell compressed
    by 30 %, all atoms moved with it): the kept lists are rebuilt, energies == a fresh model's."""
    dimer = Atoms("Si2", positions=[[0, 0, 0], [7.0, 0, 0]])
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    crystal.rattle(0.02, seed=1)
    model = BatchedModel(SI_MODEL, skin=1.0)

    def energies(engine, structures, ids):
        x = torch.tensor(np.concatenate([a.positions for a in structures]))
        types = torch.tensor(np.concatenate([engine.atom_types(a) for a in structures]))
        cell = torch.tensor(np.array([a.cell.array for a in structures]))
        pbc = torch.tensor(np.array([a.pbc for a in structures]))
        num_atoms = torch.tensor([len(a) for a in structures])
        return engine.evaluate(x, types, cell, pbc, num_atoms, ids=ids)["energy"].numpy()

    before = energies(model, [dimer, crystal], ids=[0, 1])
    assert model.lists_built == 2
    close, compressed = dimer.copy(), crystal.copy()
    close.positions[1, 0] = 2.6
    compressed.set_cell(crystal.cell.array * 0.7, scale_atoms=True)
    after = energies(model, [close, compressed], ids=[0, 1])
    assert model.lists_built == 4
    expected = energies(BatchedModel(SI_MODEL), [close, compressed], ids=None)
    np.testing.assert_allclose(after, expected, atol=1e-5)
    assert np.abs(after - before).min() > 0.1  # the new pairs count
    expanded = crystal.copy()
    expanded.positions += 0.2  # back to the first cell, shifted: the compressed cell's list covers every pair
    kept = energies(model, [close, expanded], ids=[0, 1])
    assert model.lists_built == 4
    np.testing.assert_allclose(kept, energies(BatchedModel(SI_MODEL), [close, expanded], ids=None), atol=1e-5)
