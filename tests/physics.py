"""Shared helpers for physics tests: tiny models, test structures, transformations."""

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

import mlip.data as data
from mlip.data.stats import DatasetStatistics
from mlip.models import ModelConfig, build_model

TYPE_NAMES = ["Cu", "Ni"]
R_MAX = 4.0

# Tiny widths keep tests fast; the physics (symmetry, locality, smoothness) does not depend on width.
TINY = {
    "allegro": {"num_scalar": 16, "num_tensor": 8, "mlp_hidden": 16, "readout_hidden": 8},
    "nequip": {"num_features": 8, "radial_hidden": 16},
}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


def tiny_model(family: str, head: str = "gradient", dtype=torch.float64, seed: int = 0, r_max: float = R_MAX,
               **overrides):
    torch.manual_seed(seed)
    statistics = DatasetStatistics(TYPE_NAMES, reference_energies=[-3.5, -4.5], force_rms=5.0, avg_num_neighbors=20.0)
    overrides = dict(TINY[family], **overrides)
    model = build_model(ModelConfig(family, "small", head, r_max=r_max, overrides=overrides), statistics, dtype)
    # Untrained readouts are nearly zero; larger weights make every check sensitive.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "readout" in name:
                parameter.mul_(10.0)
    return model.eval()


def triclinic_alloy(seed: int = 0, repeat=(2, 2, 1)) -> Atoms:
    """A rattled, sheared Cu-Ni fcc cell: periodic, triclinic, two species."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
    shear = np.array([[0.0, 0.15, 0.1], [0.05, 0.0, 0.2], [0.1, -0.1, 0.0]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + shear), scale_atoms=True)
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def cluster(seed: int = 0, n: int = 10) -> Atoms:
    """A non-periodic two-species cluster with no atoms closer than ~2 Å."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * 2.3
    positions = grid + rng.normal(scale=0.1, size=grid.shape)
    return Atoms(numbers=rng.choice([29, 28], size=n), positions=positions)


def predict(model, structures, dtype=None):
    """Batched prediction through Potential.forward; numpy float64 results."""
    dtype = dtype or next(model.parameters()).dtype
    mapper = data.TypeMapper(TYPE_NAMES)
    r_max = model.config.hyperparameters()["r_max"]
    graphs = [data.atoms_to_graph(a, r_max, mapper) for a in structures]
    out = model(data.collate(graphs, dtype))
    return {k: v.detach().double().numpy() for k, v in out.items()}


def random_orthogonal(rng, reflect: bool) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if reflect else q  # -q has det -1: a rotation composed with inversion


def assert_symmetric(model, atoms, rng, reflect: bool = True, tolerance: float = 1e-9, translate: float = 0.0):
    """Rotate (and reflect) ``atoms`` by a random orthogonal q, permute and optionally translate them:
    energies must not change; forces and stress must rotate with q. Returns the prediction for ``atoms``."""
    q = random_orthogonal(rng, reflect)
    permutation = rng.permutation(len(atoms))
    moved = atoms[permutation]
    moved.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
    moved.positions = atoms.positions[permutation] @ q.T + rng.normal(size=3) * translate
    before, after = predict(model, [atoms]), predict(model, [moved])
    assert_close(after["energy"], before["energy"], tolerance, "energy")
    assert_close(after["atomic_energies"], before["atomic_energies"][permutation], tolerance, "atomic energies")
    assert np.abs(before["forces"]).max() > 1e-3, "forces vanish: the test would prove nothing"
    assert_close(after["forces"], before["forces"][permutation] @ q.T, 10 * tolerance, "forces")
    if "stress" in before:
        assert_close(after["stress"][0], q @ before["stress"][0] @ q.T, 10 * tolerance, "stress")
    return before


def assert_close(actual, expected, tolerance, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1.0)
    error = np.abs(actual - expected).max() / scale
    assert error < tolerance, f"{what}: relative error {error:.3e} >= {tolerance:.1e}"
