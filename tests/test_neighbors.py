"""Neighbor lists against a brute-force enumeration of periodic images."""

import itertools

import numpy as np
import pytest

from mlip.data.neighbors import BACKENDS, neighbor_list, pair_edges


def brute_force(positions, cell, pbc, r_max):
    """Every (i, j, S) with |x_j - x_i + S @ cell| < r_max, except i == j with S == 0.

    The image range along a periodic direction k comes from the plane spacing 1 / |b_k| (b_k the
    reciprocal vector): |r . b_k| = |f_k + S_k| must stay below r_max |b_k|, where f_k is the
    fractional coordinate of x_j - x_i along k. Non-periodic directions are completed with
    orthonormal vectors only to define the b_k; they never shift atoms.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    periodic = np.flatnonzero(pbc)
    ranges = [[0], [0], [0]]
    if len(periodic):
        free = np.linalg.svd(cell[periodic])[2][len(periodic):]
        reciprocal = np.linalg.inv(np.concatenate([cell[periodic], free]))  # columns b_k
        fractional = (positions[None] - positions[:, None]).reshape(-1, 3) @ reciprocal
        for col, k in enumerate(periodic):
            extent = r_max * np.linalg.norm(reciprocal[:, col]) + np.abs(fractional[:, col]).max()
            m = int(np.ceil(extent)) + 1
            ranges[k] = range(-m, m + 1)
    shifts = np.array(list(itertools.product(*ranges)), dtype=np.int64)
    vectors = positions[None, :, None] - positions[:, None, None] + (shifts @ cell)[None, None]
    i, j, s = np.nonzero(np.linalg.norm(vectors, axis=-1) < r_max)
    keep = ~((i == j) & (shifts[s] == 0).all(axis=1))
    return i[keep], j[keep], shifts[s][keep]


def edge_set(i, j, shifts):
    return sorted(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.asarray(shifts).tolist())))


def random_case(rng):
    """A random triclinic cell (sometimes smaller than the cutoff, sometimes left-handed), random
    periodicity, and atoms that may sit outside the cell."""
    scale = rng.choice([1.2, 2.5, 5.0])
    cell = np.diag(rng.uniform(1.0, 2.0, 3)) * scale + rng.uniform(-1, 1, (3, 3)) * scale * rng.choice([0.2, 0.9])
    if rng.random() < 0.3:
        cell[0] *= -1
    pbc = rng.random(3) < 0.6
    positions = rng.uniform(-0.5, 1.5, (int(rng.integers(1, 7)), 3)) @ cell
    mode = rng.integers(3)
    if mode == 1:
        cell[~pbc] = 0.0  # ASE writes zero vectors along non-periodic directions
    elif mode == 2:
        positions += rng.uniform(-20, 20, positions.shape) * ~pbc  # far outside the cell
    return positions, cell, pbc, float(rng.uniform(1.5, 4.5))


CASES = []
_rng = np.random.default_rng(1234)
while len(CASES) < 60:
    case = random_case(_rng)
    periodic_cell = case[1][case[2]]
    if abs(np.linalg.det(periodic_cell @ periodic_cell.T)) > 1e-3:
        CASES.append(case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_cells_match_brute_force(backend):
    small_cells = multi_edges = 0
    for positions, cell, pbc, r_max in CASES:
        edge_index, shifts = neighbor_list(positions, cell, pbc, r_max, backend=backend)
        assert edge_index.dtype == np.int64 and shifts.dtype == np.int64
        assert (shifts[:, ~pbc] == 0).all()
        expected = edge_set(*brute_force(positions, cell, pbc, r_max))
        assert edge_set(edge_index[0], edge_index[1], shifts) == expected, (pbc, cell, r_max)
        pairs = list(zip(edge_index[0].tolist(), edge_index[1].tolist()))
        multi_edges += len(pairs) > len(set(pairs))
        small_cells += bool(pbc.any() and np.linalg.norm(cell[pbc], axis=1).min() < r_max)
    # The random cases do exercise the hard parts.
    assert small_cells > 5 and multi_edges > 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pbc", [[True, True, True], [True, True, False], [True, False, False]])
def test_small_triclinic_cell_self_images(backend, pbc):
    """One atom in a cell smaller than the cutoff: all edges go to its own images."""
    cell = np.array([[2.0, 0.0, 0.0], [0.7, 1.9, 0.0], [0.3, -0.4, 2.2]])
    positions = np.array([[0.3, 0.2, 0.1]])
    edge_index, shifts = neighbor_list(positions, cell, pbc, 3.0, backend=backend)
    assert (edge_index == 0).all() and len(shifts) >= 2
    assert edge_set(edge_index[0], edge_index[1], shifts) == edge_set(*brute_force(positions, cell, pbc, 3.0))
    # A full list is symmetric: the image S of an atom is matched by the image -S.
    assert set(map(tuple, shifts.tolist())) == set(map(tuple, (-shifts).tolist()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset, separation", [(0.0, 40.0), (-50.0, 40.0), (1e4, 3000.0)])
def test_molecule_with_zero_cell(backend, offset, separation):
    """Also a sparse gas: matscipy once took 20 s when its box spanned 3000 Å."""
    rng = np.random.default_rng(7)
    positions = rng.uniform(0, 6, (15, 3)) + offset
    positions[:5] += separation  # a second cluster far away: no edges between the two
    edge_index, shifts = neighbor_list(positions, np.zeros((3, 3)), [False] * 3, 3.5, backend=backend)
    assert (shifts == 0).all()
    assert edge_set(edge_index[0], edge_index[1], shifts) == edge_set(
        *brute_force(positions, np.zeros((3, 3)), [False] * 3, 3.5)
    )
    assert not ((edge_index[0] < 5) & (edge_index[1] >= 5)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_vectors_follow_convention(backend):
    """r_ij = x_j - x_i + S @ cell is shorter than the cutoff and is the minimum image here."""
    rng = np.random.default_rng(3)
    cell = np.array([[6.0, 0.0, 0.0], [1.5, 5.5, 0.0], [-1.0, 0.8, 6.2]])
    positions = rng.uniform(-0.3, 1.3, (12, 3)) @ cell  # some atoms outside the cell
    edge_index, shifts = neighbor_list(positions, cell, True, 2.9, backend=backend)
    vectors = positions[edge_index[1]] - positions[edge_index[0]] + shifts @ cell
    assert (np.linalg.norm(vectors, axis=1) < 2.9).all()
    # The same vectors from ASE's independent implementation.
    from ase import Atoms
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    i, j, d_vec = ase_neighbor_list("ijD", Atoms("H12", positions=positions, cell=cell, pbc=True), 2.9)
    order = np.lexsort((d_vec[:, 2], d_vec[:, 1], d_vec[:, 0], j, i))
    ours = np.lexsort((vectors[:, 2], vectors[:, 1], vectors[:, 0], edge_index[1], edge_index[0]))
    np.testing.assert_allclose(vectors[ours], d_vec[order], atol=1e-10)


def test_backends_identical():
    """Same sorted edge arrays, not just the same set, so results don't depend on the backend."""
    for positions, cell, pbc, r_max in CASES[:20]:
        a = neighbor_list(positions, cell, pbc, r_max, backend="vesin")
        b = neighbor_list(positions, cell, pbc, r_max, backend="matscipy")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        # ... sorted by (i, j, shift) lexicographically.
        edge_index, shifts = a
        order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], edge_index[1], edge_index[0]))
        np.testing.assert_array_equal(order, np.arange(len(order)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_periodic_cell_raises(backend):
    positions = np.zeros((2, 3))
    positions[1] = 1.0
    flat = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 3.0, 0.0]])  # coplanar rows
    with pytest.raises(ValueError, match="degenerate"):
        neighbor_list(positions, flat, True, 2.0, backend=backend)
    with pytest.raises(ValueError, match="degenerate"):
        neighbor_list(positions, np.zeros((3, 3)), [True, False, False], 2.0, backend=backend)
    # The same flat cell is fine where it is periodic only in-plane.
    neighbor_list(positions, flat, [True, True, False], 2.0, backend=backend)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r_max must be positive"):
        neighbor_list(np.zeros((1, 3)), np.eye(3), True, 0.0)
    with pytest.raises(ValueError, match="unknown neighbor-list backend"):
        neighbor_list(np.zeros((1, 3)), np.eye(3), True, 1.0, backend="nope")


def test_pair_edges_reorders_full_lists_into_reverse_pairs():
    """[one direction; reverses]: the same edge set, edge k + E/2 = (j, i, -S) of edge k, for
    every random case (self-images of small cells, mixed periodicity, molecules)."""
    for positions, cell, pbc, r_max in CASES:
        edge_index, shifts = neighbor_list(positions, cell, pbc, r_max)
        paired_index, paired_shifts = pair_edges(edge_index, shifts)
        half = edge_index.shape[1] // 2
        assert edge_set(paired_index[0], paired_index[1], paired_shifts) == edge_set(edge_index[0], edge_index[1], shifts)
        assert (paired_index[:, half:] == paired_index[::-1, :half]).all()
        assert (paired_shifts[half:] == -paired_shifts[:half]).all()


def test_pair_edges_refuses_asymmetric_lists():
    edge_index, shifts = neighbor_list(np.random.default_rng(0).uniform(0, 3, (6, 3)), np.eye(3) * 3, True, 2.5)
    for keep in (np.arange(edge_index.shape[1]) != 3,  # one edge without its reverse
                 np.ones(edge_index.shape[1], dtype=bool)):
        broken_shifts = shifts.copy()
        if keep.all():  # same count, but an image that has no reverse
            broken_shifts[0] += 1
        with pytest.raises(ValueError, match="not symmetric"):
            pair_edges(edge_index[:, keep], broken_shifts[keep])
