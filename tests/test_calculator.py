"""The ASE calculator: derivatives, domain decomposition, neighbor-list reuse, MD, bad input,
and a small end-to-end fit (EMT Cu -> lattice constant)."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet

import mlip.calculators.ase as ase_module
import mlip.calculators.domains as domains
from mlip import MLIPCalculator
from mlip.data.stats import DatasetStatistics
from mlip.models import ModelConfig, build_model

TYPE_NAMES = ["Cu", "Ni"]
# Narrow models: the properties tested here do not depend on width, and tests stay fast.
TINY = {
    "allegro": {"num_scalar": 8, "num_tensor": 4, "mlp_hidden": 16, "readout_hidden": 8, "num_basis": 6},
    "nequip": {"num_features": 4, "radial_hidden": 8, "num_basis": 6},
}
FAMILIES = ["allegro", "nequip"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared machine: one thread is faster and timings are stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family, head="gradient", r_max=4.0, seed=0, dtype=torch.float64, **overrides):
    """Random weights, rescaled so that forces are O(0.5 eV/Å) on the test crystal whatever the
    initialization of the architecture: every check below must see non-trivial forces and stress."""

    def build(force_rms):
        torch.manual_seed(seed)
        statistics = DatasetStatistics(TYPE_NAMES, reference_energies=[-3.5, -4.5], force_rms=force_rms,
                                       avg_num_neighbors=20.0)
        config = ModelConfig(family, "small", head, r_max=r_max, overrides=dict(TINY[family], **overrides))
        return build_model(config, statistics, dtype).eval()

    probe = strained_triclinic()
    probe.calc = MLIPCalculator(build(1.0))
    rms = float(np.sqrt((probe.get_forces() ** 2).mean()))
    return build(0.5 / rms)  # force_rms scales the model's energies, hence forces, linearly


def strained_triclinic(seed=0, repeat=(2, 1, 1)) -> Atoms:
    """Rattled Cu-Ni fcc under a general (non-symmetric) strain: periodic, triclinic."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
    strain = np.array([[0.03, 0.15, 0.1], [0.05, -0.02, 0.2], [0.1, -0.1, 0.01]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    return atoms


def slab(seed=0) -> Atoms:
    """A rattled two-layer fcc(111) slab: periodic in-plane (oblique cell), open along z."""
    from ase.build import fcc111

    atoms = fcc111("Cu", size=(2, 2, 2), a=3.6, vacuum=None, periodic=False)
    atoms.pbc = [True, True, False]
    rng = np.random.default_rng(seed)
    atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    return atoms


def cluster(seed=0, n=14) -> Atoms:
    """Non-periodic Cu-Ni cluster (no cell), atoms ~2.4 Å apart."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * 2.4
    return Atoms(numbers=rng.choice([29, 28], size=n), positions=grid + rng.normal(scale=0.1, size=grid.shape))


STRUCTURES = {"triclinic": strained_triclinic, "slab": slab, "cluster": cluster}


def relative_error(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)


# --- derivatives ---------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["triclinic", "slab"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forces_are_minus_energy_gradient(family, structure):
    """Central differences (h = 1e-4 Å, error ~h^2) on a few atoms, every component."""
    atoms = STRUCTURES[structure]()
    atoms.calc = MLIPCalculator(tiny_model(family), skin=0.0)
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3, "forces vanish: the check would prove nothing"
    h = 1e-4
    for i in (0, 3, len(atoms) - 1):
        for c in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.calc = atoms.calc
                displaced.positions[i, c] += sign * h
                energies.append(displaced.get_potential_energy())
            numerical = -(energies[0] - energies[1]) / (2 * h)
            assert abs(forces[i, c] - numerical) < 1e-6 * max(1.0, np.abs(forces).max()), (i, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_stress_is_strain_derivative(family):
    """stress = (1/V) dE/d(strain), by ASE's central differences, on a strained triclinic cell."""
    atoms = strained_triclinic()
    atoms.calc = MLIPCalculator(tiny_model(family), skin=0.0)
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-3
    from ase.calculators.fd import calculate_numerical_stress

    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    assert relative_error(stress, numerical) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_atomic_energies_sum_to_energy(family):
    atoms = strained_triclinic()
    atoms.calc = MLIPCalculator(tiny_model(family))
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert abs(energies.sum() - atoms.get_potential_energy()) < 1e-10 * abs(energies.sum())


# --- domain decomposition -----------------------------------------------------------------------------
def test_domains_partition_the_atoms():
    """Every atom is owned by exactly one box; mixed pbc and triclinic cells are split too."""
    for atoms in (strained_triclinic(repeat=(3, 2, 2)), slab(), cluster()):
        owned = domains.split_into_domains(atoms.positions, atoms.cell.array, atoms.pbc, domain_atoms=5)
        assert len(owned) >= 2
        assert np.array_equal(np.sort(np.concatenate(owned)), np.arange(len(atoms)))


@pytest.mark.parametrize("structure", ["triclinic", "cluster"])
@pytest.mark.parametrize("head", ["gradient", "direct"])
@pytest.mark.parametrize("family, overrides", [(family, {}) for family in FAMILIES] + [("nequip", {"correlation": 3})],
                         ids=FAMILIES + ["nequip-correlation-3"])
def test_domains_equal_whole_system(family, overrides, head, structure, monkeypatch):
    """Energies, per-atom energies, forces and stress by domains == one whole-system call (1e-8)."""
    atoms = strained_triclinic(repeat=(2, 2, 1)) if structure == "triclinic" else cluster(n=20)
    # r_max 3 Å: small halos (NequIP's is 2 x 3 Å) keep the test quick; still many periodic images.
    # Density products are per atom: ghost atoms need no more halo than plain NequIP.
    model = tiny_model(family, head, r_max=3.0, **overrides)
    whole = atoms.copy()
    whole.calc = MLIPCalculator(model, domain_threshold=None)

    calls = []
    original = domains.evaluate_by_domains
    monkeypatch.setattr(domains, "evaluate_by_domains", lambda calc, a: calls.append(1) or original(calc, a))
    split = atoms.copy()
    split.calc = MLIPCalculator(model, domain_threshold=4, domain_atoms=5)
    assert len(domains.split_into_domains(atoms.positions, atoms.cell.array, atoms.pbc, 5)) >= 4

    assert relative_error(split.get_forces(), whole.get_forces()) < 1e-8
    assert calls, "the domain path was not taken"
    assert abs(split.get_potential_energy() - whole.get_potential_energy()) < 1e-8 * abs(whole.get_potential_energy())
    assert relative_error(split.get_potential_energies(), whole.get_potential_energies()) < 1e-8
    if head == "gradient" and structure == "triclinic":
        assert relative_error(split.get_stress(), whole.get_stress()) < 1e-8


# --- MD -----------------------------------------------------------------------------------------------
def test_skin_reuse_matches_rebuilding(monkeypatch):
    """Forces with a reused (skin) neighbor list == rebuilding it every step, along hot MD."""
    rebuilds = []
    original = ase_module.skin_list
    monkeypatch.setattr(ase_module, "skin_list", lambda *a, **k: rebuilds.append(1) or original(*a, **k))
    model = tiny_model("nequip")
    atoms = strained_triclinic(repeat=(1, 1, 1))
    atoms.calc = MLIPCalculator(model, skin=0.3)
    rebuilt = MLIPCalculator(model, skin=0.0)
    from ase.md import thermalize_momenta

    thermalize_momenta(atoms, 2000.0, rng=np.random.default_rng(0))  # hot: atoms move ~0.2 Å per 15 steps
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    worst = 0.0
    for _ in range(15):
        dyn.run(1)
        reference = atoms.copy()
        reference.calc = rebuilt
        worst = max(worst, relative_error(atoms.get_forces(), reference.get_forces()))
    assert worst < 1e-12
    skin_rebuilds = len(rebuilds) - 16  # the skin-0 calculator rebuilds on each of its 15 + 1 calls
    assert 1 <= skin_rebuilds < 15, f"the skin list was rebuilt {skin_rebuilds} times in 16 calls"


# --- bad input -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calculator():
    return MLIPCalculator(tiny_model("allegro"))


def test_unknown_element_is_named(calculator):
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.symbols[1] = "Au"
    atoms.calc = calculator
    with pytest.raises(ValueError, match=r"\['Au'\].*\['Cu', 'Ni'\]"):
        atoms.get_potential_energy()


def test_nan_positions(calculator):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[2, 1] = np.nan
    atoms.calc = calculator
    with pytest.raises(ValueError, match=r"atoms \[2\].*NaN"):
        atoms.get_forces()


@pytest.mark.parametrize("by_domains", [False, True])
def test_overlapping_atoms(by_domains):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[1] = atoms.positions[0] + [0.1, 0.0, 0.0]
    atoms.calc = MLIPCalculator(tiny_model("allegro"), domain_threshold=1 if by_domains else None, domain_atoms=2)
    with pytest.raises(ValueError, match="Å apart.*overlapping"):
        atoms.get_potential_energy()


def test_stress_of_non_periodic_structure(calculator):
    atoms = cluster()
    atoms.calc = calculator
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        atoms.get_stress()
    slab_atoms = slab()
    slab_atoms.calc = calculator
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        slab_atoms.get_stress()


def test_incompatible_model_file(tmp_path):
    from mlip.deploy import ModelFileError, deploy_model, read_metadata, save_model

    good = tmp_path / "model.pt"
    model = tiny_model("allegro")
    deploy_model(model, good)
    metadata = dict(read_metadata(good), format_version=999)
    scripted = torch.jit.script(ase_module.resolve_model(model, "cpu")[0])
    save_model(scripted, tmp_path / "future.pt", metadata)
    with pytest.raises(ModelFileError, match="format version 999 is not supported"):
        MLIPCalculator(tmp_path / "future.pt")
    # The good file works and gives the eager model's numbers.
    atoms = strained_triclinic()
    atoms.calc = MLIPCalculator(good)
    energy = atoms.get_potential_energy()
    atoms.calc = MLIPCalculator(model)
    assert abs(atoms.get_potential_energy() - energy) < 1e-10 * abs(energy)


# --- end to end: fit EMT Cu, relax the lattice --------------------------------------------------------------
def emt_cu_dataset(count=40, seed=0):
    """Rattled, isotropically and shear-strained fcc Cu cells labelled by EMT (energy, forces, stress)."""
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    structures = []
    for k in range(count):
        a = rng.uniform(3.45, 3.75)
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        if k % 2:
            strain = np.eye(3) + np.triu(rng.normal(scale=0.02, size=(3, 3)))
            atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(rng.uniform(0.0, 0.1), seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        atoms.info["energy"] = atoms.get_potential_energy()
        atoms.arrays["forces"] = atoms.get_forces()
        atoms.info["stress"] = atoms.get_stress()
        atoms.calc = None
        structures.append(atoms)
    return structures


@pytest.fixture(scope="module")
def emt_cu_model(tmp_path_factory):
    """A tiny float64 Allegro (r_max 4.5 Å) trained by mlip.train on 40 EMT Cu cells (energy per
    atom, forces, stress): full-batch Adam, cosine schedule, 150 epochs, best.pt by validation loss.
    About 25-35 s on this machine."""
    import ase.io

    from mlip.train import config_from_dict, load_checkpoint, model_from_checkpoint, train

    directory = tmp_path_factory.mktemp("emt_cu")
    ase.io.write(directory / "cu.extxyz", emt_cu_dataset())
    config = config_from_dict({
        "run_dir": str(directory / "run"),
        "data": {"train": [str(directory / "cu.extxyz")], "val_fraction": 0.1},
        "model": {"family": "allegro", "preset": "small", "head": "gradient", "r_max": 4.5,
                  "overrides": TINY["allegro"]},
        # Stress weighted up: it alone pins the equilibrium volume (its values are ~1e-2 eV/Å^3).
        "loss": {"energy_per_atom": 10.0, "forces": 1.0, "stress": 1e4},
        "optimizer": {"name": "adam", "lr": 0.03, "ema_decay": None},
        "schedule": {"name": "cosine"},
        "stop": {"max_epochs": 150},
        "batch_size": 36,  # the whole training split: one step per epoch
        "dtype": "float64",
        "threads": 1,
        "progress": False,
    })
    result = train(config)
    assert result.epochs == 150
    return model_from_checkpoint(load_checkpoint(directory / "run" / "best.pt"), use_ema=False).eval()


def test_emt_cu_fit_relaxes_to_emt_lattice_constant(emt_cu_model):
    """A model trained on EMT Cu relaxes fcc Cu to within 0.02 Å of EMT's own lattice constant
    (measured: EMT 3.5898 Å, model 3.5826 Å)."""
    from ase.calculators.emt import EMT
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    def relaxed_lattice_constant(calc):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.calc = calc
        BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-4, steps=200)
        return atoms.get_volume() ** (1 / 3)

    a_emt = relaxed_lattice_constant(EMT())
    a_model = relaxed_lattice_constant(MLIPCalculator(emt_cu_model))
    print(f"lattice constant: EMT {a_emt:.4f} Å, fitted model {a_model:.4f} Å")
    assert abs(a_model - a_emt) < 0.02


def test_nve_conserves_energy(emt_cu_model):
    """Conservative (gradient-head) model fitted to EMT Cu; velocity Verlet, 108 Cu atoms from
    600 K, dt = 2 fs, 150 steps (0.3 ps). Threshold: |drift| < 0.5 meV/atom/ps and total-energy
    span < 1 meV/atom. Measured: drift +0.01 meV/atom/ps, span 0.10 meV/atom, final T ~330 K."""
    from ase.md import thermalize_momenta

    atoms = bulk("Cu", "fcc", a=3.59, cubic=True).repeat(3)
    atoms.calc = MLIPCalculator(emt_cu_model)
    thermalize_momenta(atoms, 600.0, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy() / len(atoms)))
    dyn.run(150)
    times = np.arange(len(energies)) * 2e-3  # ps
    drift = np.polyfit(times, energies, 1)[0] * 1000  # meV/atom/ps
    span = np.ptp(energies) * 1000  # meV/atom
    print(f"NVE: drift {drift:.4f} meV/atom/ps, span {span:.4f} meV/atom, final T {atoms.get_temperature():.0f} K")
    assert 150 < atoms.get_temperature() < 600, "the crystal should equilibrate near half the initial T"
    assert abs(drift) < 0.5 and span < 1.0


# --- command line ---------------------------------------------------------------------------------------------
def test_cli_relax_and_md(tmp_path, capsys):
    """`mlip relax` and `mlip md` run end to end on a structure spec and write readable files."""
    import ase.io

    from mlip.calculators.cli import read_structure
    from mlip.cli import main
    from mlip.deploy import deploy_model

    assert len(read_structure("bulk:Cu:fcc:3.6:2x1x1")) == 8
    model = tmp_path / "model.pt"
    deploy_model(tiny_model("allegro"), model)
    relaxed = tmp_path / "relaxed.extxyz"
    code = main(["relax", str(model), "bulk:Cu:fcc:3.6:1x1x1", "--cell", "--steps", "3", "-o", str(relaxed)])
    assert code in (0, 1)  # 1 = not converged in 3 steps
    assert "cell lengths" in capsys.readouterr().out
    assert len(ase.io.read(relaxed)) == 4
    for ensemble in ("nve", "nvt", "npt"):
        trajectory = tmp_path / f"{ensemble}.traj"
        code = main(["md", str(model), str(relaxed), "--temperature", "300", "--steps", "4", "--interval", "2",
                     "--ensemble", ensemble, "--traj", str(trajectory)])
        assert code == 0
        assert len(ase.io.read(trajectory, ":")) == 3  # steps 0, 2, 4
    assert main(["md", str(model), "bulk:Au:fcc:4.0", "--temperature", "300", "--steps", "1"]) == 2  # clear error
    assert "['Au'] not known" in capsys.readouterr().err


def test_cli_files_keep_a_committees_uncertainty(tmp_path):
    """Frames written by `mlip relax -o` and `mlip md --traj` (.traj and extxyz) from a committee
    carry its energy and member energies; the uncertainties are the spreads of the members' own energies
    and forces."""
    import ase.io

    from mlip.cli import main
    from mlip.deploy import deploy_model
    from mlip.models import build_committee
    from physics import tiny_model as same_statistics_model  # committee members share their statistics

    members = [same_statistics_model("allegro", seed=0), same_statistics_model("allegro", seed=1)]
    model = tmp_path / "committee.pt"
    deploy_model(build_committee(members), model)
    relaxed = tmp_path / "relaxed.extxyz"
    assert main(["relax", str(model), "bulk:Cu:fcc:3.6:1x1x1", "--steps", "2", "-o", str(relaxed)]) in (0, 1)
    frames = [ase.io.read(relaxed)]
    for name in ("md.traj", "md.extxyz"):
        assert main(["md", str(model), str(relaxed), "--temperature", "300", "--steps", "2", "--interval", "2",
                     "--traj", str(tmp_path / name)]) == 0
        frames.append(ase.io.read(tmp_path / name, -1))
    for k, frame in enumerate(frames):
        own, own_forces = [], []
        for member in members:
            atoms = frame.copy()
            atoms.calc = MLIPCalculator(member)
            own.append(atoms.get_potential_energy())
            own_forces.append(atoms.get_forces())
        assert np.allclose(frame.info["committee_energies"], own, rtol=1e-8, atol=1e-6)  # extxyz keeps ~10 digits
        assert np.isclose(frame.info["energy_uncertainty"], np.std(own), rtol=1e-8, atol=1e-6)
        assert np.isclose(frame.get_potential_energy(), np.mean(own), rtol=1e-8, atol=1e-6)
        assert np.std(own) > 1e-4
        # Per atom: half the distance between the two members' forces.
        force_spread = np.linalg.norm(own_forces[0] - own_forces[1], axis=1) / 2
        stored = frame.info["force_uncertainty"] if k == 1 else frame.arrays["force_uncertainty"]  # frame 1: .traj
        assert np.allclose(stored, force_spread, rtol=1e-5, atol=1e-6)  # float32 forces
        if k > 0:  # after MD steps; the relaxed perfect crystal has zero forces in every model
            assert force_spread.min() > 1e-5
