"""mlip model files in torch-sim: its batched state in, the same numbers as MLIPCalculator out."""

import numpy as np
import pytest
import torch

ts = pytest.importorskip("torch_sim", reason='torch-sim is not installed (pip install "mlip[torchsim]")')

from mlip import MLIPCalculator  # noqa: E402
from mlip.deploy.compile import deploy_model  # noqa: E402
from mlip.integrations.torchsim import MLIPModel  # noqa: E402
from physics import tiny_model, triclinic_alloy  # noqa: E402


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("torchsim") / "model.pt"
    deploy_model(tiny_model("allegro", dtype=torch.float64), path)
    return str(path)


def different_cells():
    """Triclinic Cu-Ni cells of 4 to 16 atoms, each rattled and strained differently."""
    return [triclinic_alloy(seed=1, repeat=(1, 1, 1)), triclinic_alloy(seed=2, repeat=(2, 1, 1)),
            triclinic_alloy(seed=3, repeat=(2, 2, 1)), triclinic_alloy(seed=4, repeat=(1, 1, 2))]


def test_torchsim_model_equals_the_calculator(model_file):
    structures = different_cells()
    model = MLIPModel(model_file)
    state = ts.io.atoms_to_state(structures, device=model.device, dtype=model.dtype)
    out = model(state)
    start = 0
    for b, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = MLIPCalculator(model_file)
        n = len(atoms)
        assert abs(float(out["energy"][b]) - atoms.get_potential_energy()) < 1e-6
        np.testing.assert_allclose(out["forces"][start:start + n].numpy(), atoms.get_forces(), atol=1e-6)
        stress = out["stress"][b].numpy()  # (3, 3), ASE sign
        voigt = [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]]
        np.testing.assert_allclose(voigt, atoms.get_stress(), atol=1e-6)
        assert np.abs(atoms.get_stress()).max() > 1e-3  # non-trivial stresses are compared
        start += n


def test_torchsim_optimiser_runs_an_mlip_model(model_file):
    """torch-sim's own batched FIRE with cell relaxation lowers every structure's enthalpy."""
    structures = different_cells()[:2]
    model = MLIPModel(model_file)
    state = ts.io.atoms_to_state(structures, device=model.device, dtype=model.dtype)
    before = model(state)["energy"]
    relaxed = ts.optimize(system=state, model=model, optimizer=ts.frechet_cell_fire, max_steps=20,
                          convergence_fn=ts.generate_force_convergence_fn(1e-3))
    after = model(relaxed)["energy"]
    assert (after < before).all()


def test_torchsim_integrator_runs_an_mlip_model(model_file):
    """torch-sim's batched NVE conserves each system's energy with mlip forces (a few steps)."""
    structures = different_cells()[:2]
    model = MLIPModel(model_file)
    state = ts.io.atoms_to_state(structures, device=model.device, dtype=model.dtype)
    dt = torch.tensor(0.0005 * ts.units.MetalUnits.time, dtype=model.dtype)  # 0.5 fs (torch-sim: ps)
    init, step = ts.nve(model=model, dt=dt, kT=torch.tensor(600 * ts.units.MetalUnits.temperature, dtype=model.dtype))
    md_state = init(state, seed=0)

    def total_energy(s):
        kinetic = ts.calc_kinetic_energy(momenta=s.momenta, masses=s.masses, system_idx=s.system_idx)
        return s.energy + kinetic

    before, potential_before = total_energy(md_state), md_state.energy.clone()
    for _ in range(10):
        md_state = step(md_state, dt=dt)
    exchanged = (md_state.energy - potential_before).abs()  # eV moved between potential and kinetic
    assert (exchanged > 0.5).all()
    assert ((total_energy(md_state) - before).abs() < 1e-2 * exchanged).all()  # measured: 0.1-0.3 %
