"""Hostile input on the calculator side (issue 41): damaged model files (ASE and LAMMPS), bad
calculator arguments, float32 precision far from the origin, degenerate cells and overlapping
atoms (one policy for ASE and LAMMPS), one calculator shared by threads.

Each bad input is one table row: the exception type and that the message names the culprit.
"""

import json
import pathlib
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from mlip import MLIPCalculator
from mlip.data import TypeMapper, atoms_to_graph, collate
from mlip.data.atoms import DEFAULT_MIN_DISTANCE
from mlip.deploy import ModelFileError, read_metadata
from test_calculator import cluster, one_thread, strained_triclinic, tiny_model  # noqa: F401 (one_thread: autouse)
from test_lammps import (LMP, SPECIES, ToyModel, bad_setup, error_of, plugin, rattled_crystal,  # noqa: F401
                         run_zero, write_data, write_toy_model)


# --- 1. model file integrity -----------------------------------------------------------------------
def flip_weight_byte(source: pathlib.Path, target: pathlib.Path) -> None:
    """A copy of a model file with one byte flipped inside its largest tensor record."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26: record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length  # the record's bytes
    data[start + record.file_size // 2] ^= 0x10
    target.write_bytes(bytes(data))


def plain_torchscript(path: pathlib.Path, metadata=None) -> None:
    """A TorchScript archive, with an mlip/metadata.json of our choosing (or none)."""
    extra = {} if metadata is None else {"mlip/metadata.json": metadata}
    torch.jit.save(torch.jit.script(ToyModel(3.5, 1, False, torch.float64)), str(path), _extra_files=extra)


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> pathlib.Path:
    return pathlib.Path(write_toy_model(tmp_path_factory.mktemp("model") / "toy.pt", layers=1))


def metadata_of(toy: pathlib.Path, drop: str = "", **changes) -> str:
    metadata = dict(read_metadata(toy), **changes)
    metadata.pop(drop, None)
    return json.dumps(metadata)


# name -> (writes the bad file from the intact one, words the message must hold besides the path)
BAD_FILES = {
    "flipped weight byte": (flip_weight_byte, "CRC"),
    "truncated": (lambda good, bad: bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2]), "corrupt"),
    "not a zip": (lambda good, bad: bad.write_text("pair_coeff * * is not a model\n"), "corrupt"),
    "zip of something else": (
        lambda good, bad: zipfile.ZipFile(bad, "w").writestr("notes.txt", "hello") or None, "no mlip metadata"),
    "torchscript without metadata": (lambda good, bad: plain_torchscript(bad), "no mlip metadata"),
    "metadata lacks r_max": (lambda good, bad: plain_torchscript(bad, metadata_of(good, drop="r_max")), "r_max"),
    "metadata not JSON": (lambda good, bad: plain_torchscript(bad, "{'format': mlip"), "not valid JSON"),
    "negative r_max": (lambda good, bad: plain_torchscript(bad, metadata_of(good, r_max=-3.0)), "r_max"),
    "future format version": (
        lambda good, bad: plain_torchscript(bad, metadata_of(good, format_version=2)), "format version 2"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_model_file_is_refused_in_python(toy_file, tmp_path, case):
    write, words = BAD_FILES[case]
    bad = tmp_path / "bad.pt"
    write(toy_file, bad)
    for load in (read_metadata, MLIPCalculator):  # what `mlip info` and ASE call
        with pytest.raises(ModelFileError) as info:
            load(bad)
        assert str(bad) in str(info.value) and words in str(info.value), str(info.value)


def test_metadata_given_with_a_module_is_checked(toy_file):
    from mlip.deploy import load_model

    module, metadata = load_model(toy_file)
    with pytest.raises(ModelFileError, match="r_max must be a positive number"):
        MLIPCalculator((module, dict(metadata, r_max=float("nan"))))


def test_cli_refuses_a_damaged_model_file(toy_file, tmp_path, capsys):
    from mlip.cli import main

    bad = tmp_path / "bad.pt"
    flip_weight_byte(toy_file, bad)
    assert main(["info", str(bad)]) != 0
    assert str(bad) in capsys.readouterr().err
    assert main(["info", str(toy_file)]) == 0


def test_intact_model_file_loads_and_computes(toy_file):
    atoms = rattled_crystal(seed=3, repeat=(1, 1, 1))
    atoms.calc = MLIPCalculator(toy_file)
    assert np.isfinite(atoms.get_potential_energy())


@pytest.mark.lammps
@pytest.mark.parametrize("case", ["flipped weight byte", "truncated", "not a zip", "zip of something else"])
def test_bad_model_file_is_refused_in_lammps(plugin, toy_file, tmp_path, case):  # noqa: F811
    write, _ = BAD_FILES[case]
    bad = tmp_path / "bad.pt"
    write(toy_file, bad)
    message = error_of(bad_setup(tmp_path, str(bad)))
    assert str(bad) in message and ("CRC-32" in message if case == "flipped weight byte" else True), message
    # The intact file runs.
    assert np.isfinite(run_zero(rattled_crystal(seed=3, repeat=(1, 1, 1)), str(toy_file), tmp_path)["energy"])


# --- 2. calculator arguments ---------------------------------------------------------------------------
BAD_ARGUMENTS = [
    ({"skin": -0.5}, ValueError, "skin"),
    ({"skin": float("nan")}, ValueError, "skin"),
    ({"skin": "1.0"}, TypeError, "skin"),
    ({"min_distance": -0.1}, ValueError, "min_distance"),
    ({"min_distance": float("inf")}, ValueError, "min_distance"),
    ({"domain_atoms": 0}, ValueError, "domain_atoms"),
    ({"domain_atoms": 2.5}, TypeError, "domain_atoms"),
    ({"threads": 0}, ValueError, "threads"),
    ({"domain_threshold": 0}, ValueError, "domain_threshold"),
    ({"device": "gpu"}, ValueError, "device='gpu'"),
    ({"device": "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"},
     ValueError, "cuda"),
    ({"dtype": "float32"}, TypeError, "dtype"),
    ({"domain_treshold": 100}, TypeError, "domain_treshold"),
    ({"restart": "old.traj"}, TypeError, "restart"),
]


@pytest.mark.parametrize("kwargs, error, words", BAD_ARGUMENTS, ids=[str(row[0]) for row in BAD_ARGUMENTS])
def test_bad_calculator_arguments(toy_file, kwargs, error, words):
    with pytest.raises(error) as info:
        MLIPCalculator(toy_file, **kwargs)
    assert words in str(info.value), str(info.value)


def test_ase_keywords_pass_through(toy_file):
    atoms = rattled_crystal(seed=3, repeat=(1, 1, 1))
    calc = MLIPCalculator(toy_file, label="toy", atoms=atoms, domain_threshold=None, threads=1)
    assert atoms.calc is calc and calc.label == "toy"


def test_threads_sharing_one_calculator(toy_file):
    """Each thread gets its own structure's results (different sizes: a mix-up cannot hide)."""
    calc = MLIPCalculator(toy_file)
    structures = [rattled_crystal(seed=s, repeat=r) for s, r in [(0, (1, 1, 1)), (1, (2, 1, 1)), (2, (1, 2, 1))]]
    expected = []
    for atoms in structures:
        atoms.calc = MLIPCalculator(toy_file)
        expected.append((atoms.get_potential_energy(), atoms.get_forces()))
        atoms.calc = calc
    failures = []

    def work(k):
        for _ in range(20):
            atoms = structures[k].copy()
            atoms.calc = calc
            forces, energy = atoms.get_forces(), atoms.get_potential_energy()
            if forces.shape != expected[k][1].shape or not np.allclose(forces, expected[k][1], atol=1e-10) or (
                    abs(energy - expected[k][0]) > 1e-9):
                failures.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(structures))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy machine would
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, f"threads got other structures' results {len(failures)} times"


# --- 3. float32 edge vectors far from the origin -----------------------------------------------------
@pytest.fixture(scope="module")
def float32_model():
    return tiny_model("nequip", dtype=torch.float32)


def results(atoms, model, **kwargs):
    atoms = atoms.copy()
    atoms.calc = MLIPCalculator(model, **kwargs)
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress()
    return out


def assert_same(got, expected, energy_tol, force_tol):
    assert abs(got["energy"] - expected["energy"]) < energy_tol, (got["energy"], expected["energy"])
    force_error = np.abs(got["forces"] - expected["forces"]).max()
    assert force_error < force_tol, force_error
    if "stress" in expected:
        assert np.abs(got["stress"] - expected["stress"]).max() < force_tol * 1e-2


def dyadic_crystal() -> Atoms:
    """Rattled Cu-Ni in a cell and at positions exactly representable with 9 fractional bits, so
    that a translation by 1e12 lattice vectors is exact in float64: only the code can lose digits."""
    atoms = strained_triclinic()
    atoms.set_cell(np.round(atoms.cell.array * 8) / 8, scale_atoms=False)
    atoms.positions = np.round(atoms.positions * 512) / 512
    return atoms


@pytest.mark.parametrize("by_domains", [False, True], ids=["whole", "domains"])
@pytest.mark.parametrize("how", ["all atoms 1e5 cells", "one atom 1e5 cells", "all atoms 1e12 cells",
                                 "one atom 1e12 cells"])
def test_float32_translation_far_away(float32_model, how, by_domains):
    atoms = dyadic_crystal()
    kwargs = {"domain_threshold": 1, "domain_atoms": 3} if by_domains else {}
    expected = results(atoms, float32_model, **kwargs)
    shifted = atoms.copy()
    lattice_vector = np.array([1, -2, 1]) @ atoms.cell.array
    distance = 1e5 if "1e5" in how else 1e12
    if how.startswith("all"):
        shifted.positions += distance * lattice_vector
    else:
        shifted.positions[1] += distance * lattice_vector
    assert_same(results(shifted, float32_model, **kwargs), expected, energy_tol=1e-6, force_tol=1e-6)


@pytest.mark.parametrize("by_domains", [False, True], ids=["whole", "domains"])
def test_float32_molecule_far_away(float32_model, by_domains):
    atoms = cluster()
    atoms.positions = np.round(atoms.positions * 512) / 512
    kwargs = {"domain_threshold": 1, "domain_atoms": 4} if by_domains else {}
    expected = results(atoms, float32_model, **kwargs)
    atoms.positions += [1e6, -3e5, 2e5]
    assert_same(results(atoms, float32_model, **kwargs), expected, energy_tol=1e-6, force_tol=1e-6)


def test_float32_training_batch_far_away():
    """collate: a molecule at x = 1e6 Å and an unwrapped periodic atom give the same edge vectors."""
    mapper = TypeMapper(["Cu", "Ni"])

    def edge_vectors(atoms):
        batch = collate([atoms_to_graph(atoms, 4.0, mapper)], dtype=torch.float32)
        i, j = batch["edge_index"]
        return (batch["positions"][j] - batch["positions"][i] + batch["edge_shifts"]).double().numpy()

    for atoms, move in [(cluster(), lambda a: a.positions.__iadd__([1e6, 0, 0])),
                        (strained_triclinic(), lambda a: a.positions.__setitem__(1, a.positions[1] + 1e5 * a.cell[0]))]:
        expected = edge_vectors(atoms)
        move(atoms)
        assert np.abs(edge_vectors(atoms) - expected).max() < 1e-5


def test_reused_list_across_the_cell_boundary():
    """An atom that leaves the cell while the skin list is reused: same as a fresh list."""
    model = tiny_model("allegro")
    atoms = strained_triclinic()
    atoms.wrap()
    atoms.calc = MLIPCalculator(model, skin=2.0)
    atoms.get_forces()
    k = int(np.argmin(atoms.get_scaled_positions()[:, 0]))
    step = -0.25 * atoms.cell.array[0] / np.linalg.norm(atoms.cell.array[0])  # 0.25 Å out through the face
    for _ in range(3):
        atoms.positions[k] += step
        got = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
        assert_same(got, results(atoms, model, skin=0.0), energy_tol=1e-10, force_tol=1e-10)
    assert atoms.get_scaled_positions(wrap=False)[k, 0] < 0  # it did leave the cell


# --- 4. degenerate cells and overlapping atoms ---------------------------------------------------------
def tiny_cell():
    return bulk("Cu", "fcc", a=0.1, cubic=True)


def dense_cell():
    rng = np.random.default_rng(0)
    return Atoms("Cu200", positions=rng.random((200, 3)) * 1.5, cell=np.eye(3) * 1.5, pbc=True)


def set_cell_entry(atoms, value, pbc=True):
    cell = atoms.cell.array.copy()
    cell[2] = value
    atoms.set_cell(cell, scale_atoms=False)
    atoms.pbc = pbc
    return atoms


BAD_STRUCTURES = {
    "0.1 Å cell": (tiny_cell, "lattice vector only 0.1 Å"),
    "200 atoms in 3.4 Å^3": (dense_cell, "denser than spheres"),
    "periodic along a zero cell vector": (lambda: set_cell_entry(bulk("Cu", "fcc", a=3.6, cubic=True), 0.0),
                                          "zero volume"),
    "NaN cell": (lambda: set_cell_entry(bulk("Cu", "fcc", a=3.6, cubic=True), np.nan), "NaN"),
    "infinite position": (lambda: _with_position(1, [np.inf, 0, 0]), "atoms [1]"),
    "position at 1e15 Å": (lambda: _with_position(2, [1e15, 0, 0]), "atoms [2]"),
    "overlapping atoms": (lambda: _with_position(1, [0.2, 0, 0]), "atoms 0 and 1 are 0.2 Å apart"),
}


def _with_position(index, position):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[index] = position
    return atoms


@pytest.mark.parametrize("case", list(BAD_STRUCTURES))
@pytest.mark.parametrize("where", ["calculator", "domains", "training graph"])
def test_bad_structures_are_refused_fast(toy_file, case, where):
    make, words = BAD_STRUCTURES[case]
    atoms = make()
    atoms.numbers[:] = 14  # the toy model's Si
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        if where == "training graph":
            atoms_to_graph(atoms, 3.5, TypeMapper(SPECIES))
        else:
            atoms.calc = MLIPCalculator(toy_file, domain_threshold=1 if where == "domains" else None)
            atoms.get_potential_energy()
    assert words in str(info.value), str(info.value)
    assert time.perf_counter() - start < 2.0  # no neighbor list of millions of images first


def pair_at(distance: float) -> Atoms:
    """A periodic Si/O crystal whose atoms 1 and 2 (LAMMPS ids 2 and 3) are ``distance`` Å apart."""
    atoms = rattled_crystal(seed=5, repeat=(1, 1, 1))
    direction = np.array([1.0, 2.0, 2.0]) / 3.0
    atoms.positions[2] = atoms.positions[1] + distance * direction
    return atoms


def lammps_energy(atoms, model: str, tmp_path, pair_style="pair_style mlip") -> str:
    data = write_data(atoms, tmp_path / "pair.data")
    script = textwrap.dedent(f"""\
        units metal
        atom_style atomic
        atom_modify map array
        read_data {data}
        {pair_style}
        pair_coeff * * {model} Si O
        thermo_style custom step pe
        thermo_modify format float %20.15g
        run 0
        """)
    (tmp_path / "in.pair").write_text(script)
    result = subprocess.run([LMP, "-nocite", "-log", "none", "-in", "in.pair"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    return result.stdout + result.stderr


def thermo_energy(output: str) -> float:
    lines = output.splitlines()
    row = lines[next(k for k, line in enumerate(lines) if line.split()[:2] == ["Step", "PotEng"]) + 1]
    return float(row.split()[1])


@pytest.mark.lammps
def test_one_overlap_policy_for_ase_and_lammps(plugin, toy_file, tmp_path):  # noqa: F811
    model = str(toy_file)
    too_close = pair_at(0.9 * DEFAULT_MIN_DISTANCE)
    too_close.calc = MLIPCalculator(model)
    with pytest.raises(ValueError, match=r"atoms 1 and 2 are 0\.27 Å apart"):
        too_close.get_potential_energy()
    output = lammps_energy(too_close, model, tmp_path)
    assert "atoms 2 and 3 (ids) are 0.27 Å apart (< min_distance 0.3" in output, output[-2000:]

    # Above the threshold both compute, and agree.
    legal = pair_at(1.1 * DEFAULT_MIN_DISTANCE)
    legal.calc = MLIPCalculator(model)
    assert abs(thermo_energy(lammps_energy(legal, model, tmp_path)) - legal.get_potential_energy()) < 1e-9

    # The same keyword lowers the threshold in both.
    too_close.calc = MLIPCalculator(model, min_distance=0.2)
    energy = thermo_energy(lammps_energy(too_close, model, tmp_path, "pair_style mlip min_distance 0.2"))
    assert abs(energy - too_close.get_potential_energy()) < 1e-9


@pytest.mark.lammps
@pytest.mark.parametrize("case", ["0.1 Å cell", "200 atoms in 3.4 Å^3"])
def test_lammps_refuses_degenerate_box_fast(plugin, toy_file, tmp_path, case):  # noqa: F811
    atoms = BAD_STRUCTURES[case][0]()
    atoms.numbers[:] = 14
    start = time.perf_counter()
    output = lammps_energy(atoms, str(toy_file), tmp_path)
    words = "edge only 0.1 Å long" if case.startswith("0.1") else "denser than spheres min_distance 0.3"
    assert words in output, output[-2000:]
    assert time.perf_counter() - start < 30  # LAMMPS start-up and the model load, no ghost shell of 1e6 images


@pytest.mark.lammps
@pytest.mark.parametrize("settings, words", [
    ("min_distance -1", "min_distance must be >= 0"),
    ("min_distance", "needs a value"),
    ("4.0", "unknown keyword '4.0'"),
    ("min_distanse 0.1", "unknown keyword 'min_distanse'"),
])
def test_pair_style_keywords(plugin, settings, words):  # noqa: F811
    assert words in error_of(f"units metal\npair_style mlip {settings}\n")
