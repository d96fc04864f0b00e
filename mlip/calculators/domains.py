"""Evaluate a large system by spatial domains: same numbers as one whole-system call, bounded memory.

The model's memory grows with the number of edges it sees (every edge carries features and their
autograd history). Cutting space into boxes of about ``calc.domain_atoms`` owned atoms and
evaluating them one at a time bounds that memory by the domain size; only integer bookkeeping
(one neighbor list of the whole system at r_max) scales with the system.

Each domain is evaluated exactly as LAMMPS does it on one MPI rank (see mlip.deploy.model_file):

- nodes: the owned atoms first, then ghosts, each ghost an explicit periodic image of some atom
  (its position is the image position; all edge shifts are zero);
- ghosts: every node within ``message_passing_layers`` hops of an owned atom in the r_max graph
  (hop k implies a distance <= k * r_max, so this is the halo L * r_max, only tighter);
- edges: every r_max edge of nodes within L - 1 hops (for Allegro, L = 1: owned centers only).
  A node L hops away enters an owned energy only through its layer-0 (type) features, which need
  no edges, so nothing further out can change the owned energies;
- ``num_local`` = number of owned atoms.

Then owned energies are summed, every node's force is added to the atom it is an image of (a
ghost's force is part of the force on its owner), and the virials are summed (each edge vector is
the same in every domain that holds it, so sum_d W_d = -sum_edges r (x) dE/dr).

Any partition of the atoms into domains gives the same result, so atoms may cross domain borders
during MD without harm. The r_max neighbor list is rebuilt on every call (the calculator's skin
list is not used): vesin needs ~30 ms for 16k atoms, noise next to the model.

Measured (Allegro small, float32, 32000 Cu atoms, one energy+forces+stress call, 1 thread, busy
machine): whole system 15.3 GiB peak RSS, 120 s; domains of ~4000 atoms 2.6 GiB, 53 s; of ~1000
atoms 1.0 GiB, 26 s (md_examples/benchmark_md.py memory).
"""

from typing import Dict, List, Tuple

import numpy as np
import torch

from ..data.atoms import check_min_distance
from ..data.neighbors import lattice_images, neighbor_list, periodic_basis


def evaluate_by_domains(calc, atoms) -> Dict[str, torch.Tensor]:
    """Model outputs of the whole system, computed domain by domain.

    Returns the keys of the model output: "atomic_energies" (N,) float64, "energy" () float64,
    "forces" (N, 3) in the model dtype, for a gradient head "virial" (3, 3) and, for a committee,
    "member_atomic_energies" (N, M) float64 and "member_forces" (N, 3, M) in the model dtype.
    """
    cell = atoms.cell.array.astype(np.float64)  # (3, 3) rows are lattice vectors
    pbc = atoms.pbc.copy()
    # (N, 3) Å, wrapped into the cell in float64: small shifts and node positions (float32 models)
    positions = atoms.positions - lattice_images(atoms.positions, cell, pbc) @ cell
    num_atoms = len(atoms)
    layers = int(calc.metadata["message_passing_layers"])
    if layers < 1:
        raise ValueError(f"model metadata gives message_passing_layers={layers}; it must be >= 1")

    graph = _global_graph(positions, cell, pbc, calc.r_max, calc.min_distance)
    atom_types = calc.type_mapper(atoms.numbers)  # (N,) int64

    device, dtype = calc.device, calc.dtype
    atomic_energies = torch.zeros(num_atoms, dtype=torch.float64, device=device)
    forces = torch.zeros(num_atoms, 3, dtype=torch.float64, device=device)  # summed in float64
    virial = torch.zeros(3, 3, dtype=torch.float64, device=device)
    member_energies = None  # (N, M) float64, committees only
    member_forces = None  # (N, 3, M) float64, committees only

    for owned in split_into_domains(positions, cell, pbc, calc.domain_atoms):
        node_atoms, node_shifts, edge_index = _domain_graph(owned, graph, layers, num_atoms)
        node_positions = positions[node_atoms] + node_shifts @ cell  # (n_nodes, 3) explicit images
        node_positions -= node_positions[0]  # relative to an owned atom, in float64 (as in LAMMPS)
        edge_index_t = torch.as_tensor(edge_index, device=device)
        out = calc.model(
            torch.as_tensor(node_positions, dtype=dtype, device=device),
            torch.as_tensor(atom_types[node_atoms], device=device),
            edge_index_t,
            torch.zeros(edge_index.shape[1], 3, dtype=dtype, device=device),  # images are explicit
            len(owned),
        )
        owned_t = torch.as_tensor(owned, device=device)
        atomic_energies[owned_t] = out["atomic_energies"].to(torch.float64)
        if "member_atomic_energies" in out:
            if member_energies is None:
                member_energies = atomic_energies.new_zeros(num_atoms, out["member_atomic_energies"].shape[1])
            member_energies[owned_t] = out["member_atomic_energies"]
        # A ghost is an image of an atom: its force acts on that atom.
        node_atoms_t = torch.as_tensor(node_atoms, device=device)
        forces.index_add_(0, node_atoms_t, out["forces"].to(torch.float64))
        if "member_forces" in out:
            if member_forces is None:
                member_forces = forces.new_zeros(num_atoms, 3, out["member_forces"].shape[2])
            member_forces.index_add_(0, node_atoms_t, out["member_forces"].to(torch.float64))
        if calc.gradient_head:
            virial += out["virial"].to(torch.float64)
        del out  # free this domain's tensors before the next one

    result = {
        "atomic_energies": atomic_energies,
        "energy": atomic_energies.sum(),
        "forces": forces.to(dtype),
    }
    if calc.gradient_head:
        result["virial"] = virial.to(dtype)
    if member_energies is not None:
        result["member_atomic_energies"] = member_energies
    if member_forces is not None:
        result["member_forces"] = member_forces.to(dtype)
    return result


# --- partition -------------------------------------------------------------------------------------
def split_into_domains(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, domain_atoms: int) -> List[np.ndarray]:
    """Owned atom indices (sorted) of each non-empty box of a grid with about ``domain_atoms`` per box.

    Periodic directions are split along fractional coordinates (boxes follow the cell, triclinic
    or not), non-periodic ones along the atoms' extent perpendicular to the periodic lattice
    vectors. The grid counts are chosen so that boxes are roughly cubic.
    """
    num_atoms = len(positions)
    if domain_atoms < 1:
        raise ValueError(f"domain_atoms must be >= 1, got {domain_atoms}")
    wanted = max(1, int(np.ceil(num_atoms / domain_atoms)))

    basis = periodic_basis(cell, pbc)  # (3, 3) rows: periodic lattice vectors, then free unit vectors
    coords = positions @ np.linalg.inv(basis)  # (N, 3): fractional along periodic rows, Å along free ones
    widths = np.empty(3)
    volume = abs(np.linalg.det(basis))
    for k in range(3):
        if pbc[k]:
            coords[:, k] -= np.floor(coords[:, k])  # wrap into [0, 1)
            # Width of the cell perpendicular to the other two lattice vectors.
            widths[k] = volume / np.linalg.norm(np.cross(basis[(k + 1) % 3], basis[(k + 2) % 3]))
        else:
            low, high = coords[:, k].min(), coords[:, k].max()
            widths[k] = high - low
            coords[:, k] = (coords[:, k] - low) / (widths[k] if widths[k] > 0 else 1.0)

    counts = np.ones(3, dtype=np.int64)
    while counts.prod() < wanted:
        k = int(np.argmax(widths / counts))  # cut the longest box edge
        counts[k] += 1

    box = np.minimum((coords * counts).astype(np.int64), counts - 1)  # (N, 3)
    box_id = (box[:, 0] * counts[1] + box[:, 1]) * counts[2] + box[:, 2]  # (N,)
    order = np.argsort(box_id, kind="stable")  # stable: atoms stay sorted inside a box
    boundaries = np.flatnonzero(np.diff(box_id[order])) + 1
    return np.split(order, boundaries)


# --- graphs ----------------------------------------------------------------------------------------
def _global_graph(positions, cell, pbc, r_max: float, min_distance: float) -> Dict[str, np.ndarray]:
    """The r_max neighbor list of the whole system as CSR (integers only)."""
    edge_index, cell_shifts = neighbor_list(positions, cell, pbc, r_max)  # sorted by center
    if min_distance > 0 and edge_index.shape[1]:
        vectors = positions[edge_index[1]] - positions[edge_index[0]] + cell_shifts @ cell  # (E, 3)
        check_min_distance(np.linalg.norm(vectors, axis=1), edge_index, min_distance)
        del vectors
    pointer = np.zeros(len(positions) + 1, dtype=np.int64)  # edges of atom a: pointer[a]:pointer[a+1]
    np.cumsum(np.bincount(edge_index[0], minlength=len(positions)), out=pointer[1:])
    return {"pointer": pointer, "neighbor": edge_index[1], "cell_shifts": cell_shifts}


def _domain_graph(owned: np.ndarray, graph: Dict[str, np.ndarray], layers: int, num_atoms: int
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes (atom index (n,), integer image shift (n, 3)) and edges (2, e) of one domain.

    Breadth-first over the r_max graph: hop 0 = owned atoms, hop k = new images reached from hop
    k - 1. The edges of every node up to hop ``layers - 1`` are kept.
    """
    pointer, neighbor, cell_shifts = graph["pointer"], graph["neighbor"], graph["cell_shifts"]
    # Image shifts cannot exceed layers x the largest edge shift: fixes the key encoding.
    bound = layers * (int(np.abs(cell_shifts).max()) if len(cell_shifts) else 0)
    width = 2 * bound + 1
    if float(num_atoms) * width**3 >= 2.0**62:
        raise ValueError("halo spans too many periodic images of this small cell for domain decomposition")

    def key(atom, shift):  # one int64 per (atom, image)
        s = shift + bound
        return atom + num_atoms * ((s[:, 0] * width + s[:, 1]) * width + s[:, 2])

    node_atoms = [owned]
    node_shifts = [np.zeros((len(owned), 3), dtype=np.int64)]
    known = np.sort(key(owned, node_shifts[0]))
    frontier_atoms, frontier_shifts, frontier_start = owned, node_shifts[0], 0
    centers, neighbor_keys = [], []
    for _ in range(layers):
        # All r_max edges of the frontier nodes.
        degree = pointer[frontier_atoms + 1] - pointer[frontier_atoms]  # (f,)
        source = np.repeat(np.arange(len(frontier_atoms)), degree)  # (e,) frontier node of each edge
        first = np.repeat(pointer[frontier_atoms] - np.cumsum(degree) + degree, degree)
        edges = first + np.arange(len(source))  # (e,) global edge ids
        target_atoms = neighbor[edges]
        target_shifts = frontier_shifts[source] + cell_shifts[edges]  # image of the neighbor (e, 3)
        target_keys = key(target_atoms, target_shifts)
        centers.append(frontier_start + source)
        neighbor_keys.append(target_keys)

        # New nodes: images not seen before.
        new_keys, first_seen = np.unique(target_keys, return_index=True)
        is_new = ~_contains(known, new_keys)
        first_seen = first_seen[is_new]
        frontier_start = sum(len(a) for a in node_atoms)
        frontier_atoms, frontier_shifts = target_atoms[first_seen], target_shifts[first_seen]
        node_atoms.append(frontier_atoms)
        node_shifts.append(frontier_shifts)
        known = np.sort(np.concatenate([known, new_keys[is_new]]))

    node_atoms_all = np.concatenate(node_atoms)
    node_shifts_all = np.concatenate(node_shifts)
    # Neighbor keys -> node indices.
    all_keys = key(node_atoms_all, node_shifts_all)
    order = np.argsort(all_keys)
    targets = order[np.searchsorted(all_keys, np.concatenate(neighbor_keys), sorter=order)]
    edge_index = np.stack([np.concatenate(centers), targets]).astype(np.int64)
    return node_atoms_all, node_shifts_all, edge_index


def _contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    where = np.searchsorted(sorted_keys, queries)
    where = np.minimum(where, len(sorted_keys) - 1)
    return sorted_keys[where] == queries
