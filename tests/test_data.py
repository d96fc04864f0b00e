"""extxyz -> graphs -> HDF5 -> batches, label mapping, statistics, and input checks."""

import gzip
import pickle

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlip.data import (
    BatchLoader,
    GraphDataset,
    LabelKeys,
    TypeMapper,
    atoms_to_graph,
    collate,
    compute_statistics,
    convert_to_hdf5,
    iter_structures,
    keys,
    split_indices,
)
from mlip.data.hdf5 import recompute_hash
from mlip.data.neighbors import periodic_basis

R_MAX = 4.0


def emt_structures(n=12, seed=0):
    """Rattled Cu/Al/Ni bulk cells of several sizes, a slab (periodic in-plane only) and a
    molecule-like cluster without a cell, labelled by EMT."""
    rng = np.random.default_rng(seed)
    structures = []
    for k in range(n):
        element = ["Cu", "Al", "Ni"][k % 3]
        atoms = bulk(element, "fcc", a=3.6, cubic=k % 2 == 0).repeat((1, 1, 1 + k % 3))
        if k % 4 == 0:
            atoms[0].symbol = "Ni" if element != "Ni" else "Cu"  # mixed species
        atoms.rattle(0.05, seed=k)
        atoms.set_cell(atoms.cell * rng.uniform(0.98, 1.02), scale_atoms=True)
        atoms.info["config_type"] = "bulk"
        structures.append(atoms)
    slab = fcc111("Cu", (2, 2, 3), vacuum=4.0)
    slab.pbc = [True, True, False]
    del slab.info["adsorbate_info"]  # a dict: extxyz cannot store it
    slab.info["config_type"] = "slab"
    cluster = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
    cluster.info["config_type"] = "cluster"
    structures += [slab, cluster]
    for atoms in structures:
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces()
        if atoms.pbc.all():
            atoms.get_stress()
    return structures


@pytest.fixture(scope="module")
def extxyz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "emt.extxyz"
    ase.io.write(path, emt_structures())
    return path


@pytest.fixture(scope="module")
def h5(extxyz):
    output = extxyz.with_suffix(".h5")
    digest = convert_to_hdf5(extxyz, output, R_MAX, type_names=["Al", "Ni", "Cu"], progress=False)
    return output, digest


def in_memory_graphs(path, type_names=("Al", "Ni", "Cu")):
    mapper = TypeMapper(type_names)
    return [atoms_to_graph(a, R_MAX, mapper, LabelKeys()) for a in ase.io.read(path, ":")]


# --- round trip --------------------------------------------------------------------------------


def test_hdf5_round_trip_is_exact(extxyz, h5):
    path, _ = h5
    expected = in_memory_graphs(extxyz)
    data = GraphDataset.from_hdf5(path)
    assert len(data) == len(expected) == 14
    assert data.r_max == R_MAX and data.type_names == ["Al", "Ni", "Cu"]
    assert list(data.config_types) == ["bulk"] * 12 + ["slab", "cluster"]
    assert data.num_atoms.tolist() == [len(g[keys.ATOM_TYPES]) for g in expected]

    # Unordered, repeated, and contiguous indices: all read in one call per array.
    for indices in ([5, 0, 13, 5, 12, 7], [2, 3, 4], list(range(14))):
        got = collate(data.get_batch(indices))
        want = collate([expected[i] for i in indices])
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key

    for i in (0, 12, 13):
        graph = data[i]
        assert set(graph) == set(expected[i])
        for key, value in expected[i].items():
            assert graph[key].dtype == value.dtype and np.array_equal(graph[key], value), key
    # The slab and the cluster carry no stress: it needs a fully periodic cell.
    assert data.has_label(keys.STRESS).tolist() == [True] * 12 + [False, False]


def test_labels_match_the_reference_calculator(extxyz, h5):
    data = GraphDataset.from_hdf5(h5[0])
    for i, atoms in enumerate(emt_structures()):
        graph = data[i]
        np.testing.assert_allclose(graph[keys.ENERGY], atoms.get_potential_energy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(graph[keys.FORCES], atoms.get_forces(), rtol=0, atol=1e-6)
        # The same structure, atoms wrapped into the cell: moved by whole lattice vectors, if at all.
        moved = (graph[keys.POSITIONS] - atoms.positions) @ np.linalg.inv(periodic_basis(atoms.cell.array, atoms.pbc))
        np.testing.assert_allclose(moved, np.round(moved), rtol=0, atol=1e-6)
        assert not np.round(moved)[:, ~atoms.pbc].any()
        if atoms.pbc.all():
            voigt = atoms.get_stress()
            np.testing.assert_allclose(np.diag(graph[keys.STRESS]), voigt[:3], atol=1e-8)
            np.testing.assert_allclose(graph[keys.STRESS][1, 2], voigt[3], atol=1e-8)


def test_hash_is_content_based(extxyz, h5, tmp_path):
    path, digest = h5
    data = GraphDataset.from_hdf5(path)
    assert data.content_hash == digest == recompute_hash(path)
    assert len(digest) == 64
    again = convert_to_hdf5(extxyz, tmp_path / "again.h5", R_MAX, type_names=["Al", "Ni", "Cu"], progress=False)
    assert again == digest  # deterministic
    # Written in many small blocks (as for a file larger than memory): the same content.
    blocks = convert_to_hdf5(extxyz, tmp_path / "blocks.h5", R_MAX, type_names=["Al", "Ni", "Cu"], progress=False,
                             buffer_atoms=7)
    assert blocks == digest == recompute_hash(tmp_path / "blocks.h5")
    one_block = GraphDataset.from_hdf5(path).get_batch(range(14))
    many_blocks = GraphDataset.from_hdf5(tmp_path / "blocks.h5").get_batch(range(14))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(one_block, many_blocks) for k in x)
    other = convert_to_hdf5(extxyz, tmp_path / "rmax.h5", R_MAX + 0.5, type_names=["Al", "Ni", "Cu"], progress=False)
    assert other != digest
    # A gzip-compressed copy converts to the same content.
    gz = tmp_path / "emt.extxyz.gz"
    with open(extxyz, "rb") as source, gzip.open(gz, "wb") as target:
        target.write(source.read())
    assert convert_to_hdf5(gz, tmp_path / "gz.h5", R_MAX, type_names=["Al", "Ni", "Cu"], progress=False) == digest
    # Default type names: sorted by atomic number, recorded in the file.
    convert_to_hdf5(ase.io.read(extxyz, ":"), tmp_path / "types.h5", R_MAX, progress=False)
    assert GraphDataset.from_hdf5(tmp_path / "types.h5").type_names == ["Al", "Ni", "Cu"]


def test_dataset_pickles_for_worker_processes(h5):
    data = GraphDataset.from_hdf5(h5[0])
    data[0]  # opens the file
    clone = pickle.loads(pickle.dumps(data))
    assert np.array_equal(clone[3][keys.POSITIONS], data[3][keys.POSITIONS])


def test_in_memory_dataset_matches_file(extxyz, h5):
    memory = GraphDataset.from_atoms(ase.io.read(extxyz, ":"), R_MAX, type_names=["Al", "Ni", "Cu"])
    stored = GraphDataset.from_hdf5(h5[0])
    assert list(memory.config_types) == list(stored.config_types)
    a, b = collate(memory.get_batch([1, 8, 13])), collate(stored.get_batch([1, 8, 13]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(IndexError, match="out of range"):
        memory.get_batch([14])


def test_file_selection_reads_the_selected_structures(extxyz, tmp_path):
    """ASE's file@selection: a gzipped file's structures 2..4 convert to the same graphs as those
    structures of the whole file; a selection that is not one fails by name."""
    packed = tmp_path / "emt.extxyz.gz"
    packed.write_bytes(gzip.compress(extxyz.read_bytes()))
    whole = GraphDataset.from_atoms(ase.io.read(extxyz, ":"), R_MAX, type_names=["Al", "Ni", "Cu"])
    output = tmp_path / "selected.h5"
    convert_to_hdf5(f"{packed}@2:5", output, R_MAX, type_names=["Al", "Ni", "Cu"], progress=False)
    selected = GraphDataset.from_hdf5(output)
    assert len(selected) == 3
    a, b = collate(whole.get_batch([2, 3, 4])), collate(selected.get_batch([0, 1, 2]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = list(iter_structures(f"{extxyz}@-1"))
    assert len(last) == 1 and np.array_equal(last[0].positions, ase.io.read(extxyz, -1).positions)
    with pytest.raises(ValueError, match="not a structure selection"):
        list(iter_structures(f"{extxyz}@first"))
    with pytest.raises(FileNotFoundError, match="no such structure file"):
        list(iter_structures(f"{tmp_path / 'absent.extxyz'}@0:2"))


# --- label keys ----------------------------------------------------------------------------------


def test_label_keys_mapping(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    forces = np.random.default_rng(1).normal(size=(4, 3))
    stress = np.array([1.0, 2.0, 3.0, 0.1, 0.2, 0.3]) * 1e-2
    atoms.info["REF_energy"] = -12.5
    atoms.arrays["REF_forces"] = forces
    atoms.info["REF_stress"] = stress
    # A calculator with other numbers: the mapped keys must win over it.
    atoms.calc = SinglePointCalculator(atoms, energy=99.0, forces=np.zeros((4, 3)), stress=np.zeros(6))
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, atoms)

    ref_keys = LabelKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress")
    convert_to_hdf5(path, tmp_path / "ref.h5", R_MAX, label_keys=ref_keys, progress=False)
    data = GraphDataset.from_hdf5(tmp_path / "ref.h5")
    assert data.label_keys == ref_keys
    graph = data[0]
    assert graph[keys.ENERGY] == -12.5
    np.testing.assert_allclose(graph[keys.FORCES], forces, atol=1e-8)
    voigt_matrix = np.array([[1, 0.3, 0.2], [0.3, 2, 0.1], [0.2, 0.1, 3]]) * 1e-2
    np.testing.assert_allclose(graph[keys.STRESS], voigt_matrix, rtol=0, atol=1e-12)

    # Default keys: ASE's reader moved energy/forces/stress into the calculator results.
    graph = GraphDataset.from_atoms(ase.io.read(path, ":"), R_MAX)[0]
    assert graph[keys.ENERGY] == 99.0 and not graph[keys.FORCES].any() and not graph[keys.STRESS].any()


def test_missing_energy_key_names_the_key(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.info["dft_energy"] = -1.0
    path = tmp_path / "e.extxyz"
    ase.io.write(path, atoms)
    with pytest.raises(KeyError, match=r"structure 0 \(Cu4\).*no energy under the key 'REF_energy'.*dft_energy"):
        convert_to_hdf5(path, tmp_path / "e.h5", R_MAX, label_keys=LabelKeys(energy="REF_energy"), progress=False)
    assert list(tmp_path.iterdir()) == [path]  # no output, no temporary file left behind


# --- statistics ------------------------------------------------------------------------------------


def two_species_graphs(e_ref, n=10, with_forces=True, seed=0):
    """Graphs with E = sum of known per-species energies + a composition-independent zero."""
    rng = np.random.default_rng(seed)
    mapper = TypeMapper(["Cu", "Au"])
    graphs, counts = [], []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.8, cubic=True).repeat((1, 1, 1 + k % 3))
        gold = rng.random(len(atoms)) < rng.uniform(0.1, 0.9)
        atoms.symbols[gold] = "Au"
        n_types = np.bincount(mapper(atoms.numbers), minlength=2)
        results = {"energy": float(n_types @ e_ref)}
        if with_forces:
            results["forces"] = rng.normal(size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, **results)
        graphs.append(atoms_to_graph(atoms, R_MAX, mapper, LabelKeys()))
        counts.append(n_types)
    return graphs, np.array(counts)


def test_statistics_recover_known_reference_energies():
    e_ref = np.array([-3.7, -4.4])
    graphs, counts = two_species_graphs(e_ref)
    stats = compute_statistics(graphs, ["Cu", "Au"])
    np.testing.assert_allclose(stats.reference_energies, e_ref, rtol=0, atol=1e-10)
    forces = np.concatenate([g[keys.FORCES] for g in graphs])
    assert stats.force_rms == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-12)
    edges = sum(g[keys.EDGE_INDEX].shape[1] for g in graphs)
    assert stats.avg_num_neighbors == pytest.approx(edges / counts.sum(), rel=1e-12)
    assert stats.type_names == ["Cu", "Au"]

    # The same through a GraphDataset read in small chunks.
    chunked = compute_statistics(GraphDataset(graphs), ["Cu", "Au"], batch_size=3)
    assert chunked.reference_energies == pytest.approx(stats.reference_energies, abs=1e-12)
    assert chunked.force_rms == stats.force_rms


def test_statistics_isolated_atoms_and_no_forces():
    e_ref = np.array([-3.7, -4.4])
    graphs, counts = two_species_graphs(e_ref + np.array([0.0, 0.5]), with_forces=False)
    energies = np.array([float(g[keys.ENERGY]) for g in graphs])
    stats = compute_statistics(graphs, ["Cu", "Au"], isolated_atom_energies={"Cu": -3.7, "Au": -4.4, "H": 0.0})
    assert stats.reference_energies == [-3.7, -4.4]
    residual = (energies - counts @ e_ref) / counts.sum(axis=1)
    assert residual.std() > 0.01  # the fallback scale is not trivially zero
    assert stats.force_rms == pytest.approx(residual.std(), rel=1e-12)
    with pytest.raises(KeyError, match=r"isolated-atom energies missing for \['Au'\]"):
        compute_statistics(graphs, ["Cu", "Au"], isolated_atom_energies={"Cu": -3.7})
    # mean_binding_energy: both references raised by the mean energy per atom beyond them (their difference
    # stays the isolated atoms'); what is left per atom then averages to zero
    shifted = compute_statistics(graphs, ["Cu", "Au"], isolated_atom_energies={"Cu": -3.7, "Au": -4.4},
                                 mean_binding_energy=True)
    np.testing.assert_allclose(shifted.reference_energies, e_ref + residual.mean(), rtol=1e-12)
    assert abs(residual.mean()) > 0.05 and shifted.extra["mean_binding_energy_per_atom"] == pytest.approx(residual.mean())
    left = (energies - counts @ np.array(shifted.reference_energies)) / counts.sum(axis=1)
    assert abs(left.mean()) < 1e-12 and shifted.force_rms == pytest.approx(stats.force_rms, rel=1e-12)


# --- splits and batches ----------------------------------------------------------------------------


def test_split_indices():
    train, val = split_indices(100, 0.2, seed=5)
    assert len(val) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert np.array_equal(split_indices(100, 0.2, seed=5)[1], val)
    assert not np.array_equal(split_indices(100, 0.2, seed=6)[1], val)
    assert len(split_indices(5, 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, seed=0)


def test_batch_order_depends_only_on_seed_and_epoch(h5):
    data = GraphDataset.from_hdf5(h5[0])
    train, _ = split_indices(len(data), 0.25, seed=0)

    def order(loader, epoch):
        return [b[keys.STRUCTURE_INDEX].tolist() for b in loader.epoch(epoch)]

    loader = BatchLoader(data, batch_size=4, indices=train, seed=11)
    first = [order(loader, e) for e in range(3)]
    resumed = BatchLoader(data, batch_size=4, indices=train, seed=11)
    assert order(resumed, 2) == first[2]  # a fresh loader (resumed run) starting at epoch 2
    assert first[0] != first[1]
    assert order(BatchLoader(data, batch_size=4, indices=train, seed=12), 0) != first[0]
    for epoch in first:
        assert sorted(sum(epoch, [])) == train.tolist()  # each structure once per epoch
    assert len(loader) == len(first[0]) == 3

    batch = next(iter(loader.epoch(0)))
    chosen = batch[keys.STRUCTURE_INDEX].numpy()
    assert batch[keys.NUM_ATOMS].tolist() == data.num_atoms[chosen].tolist()  # variable sizes
    assert batch[keys.POSITIONS].shape == (data.num_atoms[chosen].sum(), 3)
    fixed = BatchLoader(data, batch_size=5, shuffle=False, drop_last=True)
    assert len(fixed) == 2 and order(fixed, 7) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


# --- bad input -----------------------------------------------------------------------------------


def bad_inputs():
    nan = bulk("Cu", "fcc", a=3.6, cubic=True)
    nan.positions[2, 1] = np.nan
    overlap = bulk("Cu", "fcc", a=3.6, cubic=True)
    overlap.positions[1] = overlap.positions[0] + [0.1, 0.1, 0.0]
    flat = bulk("Cu", "fcc", a=3.6, cubic=True)
    flat.cell[2] = [0.0, 0.0, 0.0]
    image = bulk("Cu", "fcc", a=3.6, cubic=True)
    image.positions[3] = image.positions[0] + image.cell[0]  # the same site, one cell over
    unknown = molecule("H2O")
    unknown.center(vacuum=3.0)
    return [
        (nan, ValueError, r"positions of atoms \[2\] are NaN"),
        (overlap, ValueError, r"atoms 0 and 1 are 0.141 Å apart"),
        (flat, ValueError, r"structure is periodic along \[True, True, True\] but its cell has zero volume"),
        (image, ValueError, r"atoms 0 and 3 are 0 Å apart"),
        (unknown, ValueError, r"element\(s\) \['H', 'O'\] not known to this model; it knows \['Cu'\]"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_input_raises_clear_error(case, tmp_path):
    atoms, error, message = bad_inputs()[case]
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0)
    good = bulk("Cu", "fcc", a=3.6, cubic=True)
    good.calc = SinglePointCalculator(good, energy=-2.0)
    with pytest.raises(error, match=r"structure 1 \(.*\): " + message):
        convert_to_hdf5([good, atoms], tmp_path / "bad.h5", R_MAX, type_names=["Cu"], progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(error, match=message):
        atoms_to_graph(atoms, R_MAX, TypeMapper(["Cu"]), LabelKeys())
