"""Many structures per model call: batched evaluation and FIRE relaxation.

Screening relaxes thousands of small cells; one structure per model call spends most of the time
on fixed per-call costs. Here a batch of structures is one disconnected graph (as in training,
mlip.data.batch.collate): per-structure energies are sums of per-atom energies, forces are per
atom, and each structure's stress comes from its own virial W_b = -sum over edges of b of
r_ij (x) dE/dr_ij.

The deployed forward returns one virial per call (the batch total). Per-structure virials need
the per-edge gradients, which every file written by ``mlip deploy`` exposes as the compiled
method ``potential.energies_and_forces`` (mlip.models.potential.Potential; the same code path as
the forward). The engine calls that method; a model without it gets energies and forces only.

Neighbor lists are kept between steps (SkinLists: MLIPCalculator's skin lists, one per structure,
rebuilt when its atoms moved or its cell was strained beyond what the skin covers); each step
filters them to r_max, so the model sees the edges a fresh list would give.

Relaxation is ASE's FIRE (same parameters, same update) with, for ``cell=True``, ASE's
FrechetCellFilter (cell degrees of freedom = n_atoms * log of the deformation gradient), each
structure with its own FIRE state, vectorised over the batch with scatter sums. A structure
leaves the batch when it converges or runs out of steps and the next one takes its place, up to
``batch_atoms`` atoms per model call.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from ase import Atoms

from ..allocator import reuse_freed_memory
from ..data import keys
from ..data.atoms import DEFAULT_MIN_DISTANCE, TypeMapper, check_structure, matrix_to_voigt
from ..data.neighbors import skin_exceeded, skin_list
from ..deploy.model_file import DTYPES, UnoptimizedScript, accepts_paired_edges
from ..models.potential import stress_from_virial
from ..nn import scatter_sum
from .ase import ModelLike, resolve_model

# Atoms per model call: large enough to amortize the call, small enough for a laptop's memory.
BATCH_ATOMS = 2000


class FrameError(ValueError):
    """A structure that cannot be evaluated (unknown element, overlapping atoms, ...)."""

    def __init__(self, frame: int, message: str):
        super().__init__(f"frame {frame}: {message}")
        self.frame = frame


class OverlapError(ValueError):
    """Structures of a batch (index in the batch -> message) with overlapping atoms."""

    def __init__(self, messages: Dict[int, str]):
        super().__init__("; ".join(f"structure {b} of the batch: {m}" for b, m in messages.items()))
        self.messages = messages


class BatchedModel:
    """A model file evaluated on many structures in one call.

    ``evaluate`` takes concatenated positions (N, 3), atom types (N,), cells (B, 3, 3), pbc (B, 3)
    and atoms per structure (B,) and returns float64 tensors: "energy" (B,) eV, "forces" (N, 3)
    eV/Å and, for gradient-head models with per-edge gradients, "stress" (B, 3, 3) eV/Å^3 (ASE
    sign; zero for structures not periodic in all three directions).
    """

    def __init__(self, model: ModelLike, device="cpu", min_distance: float = DEFAULT_MIN_DISTANCE,
                 reuse_memory: bool = True, skin: float = 1.0):
        """min_distance: Å; closer atoms fail their structure. reuse_memory: as MLIPCalculator's
        (glibc keeps large freed blocks for the next step; process-wide, see mlip.allocator).
        skin: Å (>= 0) added to r_max for the neighbor lists kept between calls (see evaluate)."""
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        if reuse_memory:
            reuse_freed_memory()
        self.device = torch.device(device)
        self.model, self.metadata = resolve_model(model, self.device)
        self.dtype = DTYPES[self.metadata["dtype"]]
        self.r_max = float(self.metadata["r_max"])
        self.type_mapper = TypeMapper(self.metadata["type_names"])
        self.paired = accepts_paired_edges(self.model)
        self.min_distance = float(min_distance)
        self.skin = float(skin)
        self.gradient_head = self.metadata["force_head"] == "gradient"
        inner = self.model.scripted if isinstance(self.model, UnoptimizedScript) else self.model
        potential = getattr(inner, "potential", None)
        self._edge_gradients: Optional[Callable] = getattr(potential, "energies_and_forces", None)
        self.has_stress = self.gradient_head and self._edge_gradients is not None
        self._lists = SkinLists(self.r_max, self.skin, self.paired)

    @property
    def lists_built(self) -> int:
        """Neighbor lists built so far for evaluate(..., ids=...) (each structure's first one included)."""
        return self._lists.built

    def atom_types(self, atoms: Atoms) -> np.ndarray:
        """The model's type indices; a ValueError naming unknown elements, broken cells or
        constraints (which the batched engines do not apply: they would be silently ignored)."""
        check_structure(atoms, self.min_distance)
        if atoms.constraints:
            raise ValueError(f"has constraints ({', '.join(type(c).__name__ for c in atoms.constraints)}), which "
                             "batched runs do not apply: run this structure alone (one-frame `mlip relax`/`mlip md`)")
        return self.type_mapper(atoms.numbers)

    def evaluate(self, positions: torch.Tensor, atom_types: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                 num_atoms: torch.Tensor, ids: Optional[Sequence[Hashable]] = None) -> Dict[str, torch.Tensor]:
        """ids: one key per structure that stays with it from call to call (its input index): its
        neighbor list (r_max + skin) is then kept while its atoms and cell stay within what the skin
        covers (as MLIPCalculator does for one structure), and only the lists of structures that
        entered the batch or moved too far are built. The lists of the latest call are kept; None
        builds every list for this call alone."""
        if ids is None:  # lists for this call alone: no skin
            lists, ids = SkinLists(self.r_max, 0.0, self.paired), range(len(num_atoms))
        else:
            lists = self._lists
        graph = lists.graph(list(ids), positions.detach().to(torch.float64), cell.detach().to(torch.float64),
                            pbc, num_atoms)
        node_graph, edge_index = graph["node_graph"], graph["edge_index"]
        overlaps = self._overlaps(graph["lengths"], edge_index, node_graph, num_atoms)
        if overlaps:
            raise OverlapError(overlaps)
        inputs = (graph["positions"].to(self.dtype), atom_types, edge_index, graph["shifts"].to(self.dtype),
                  len(positions))
        num_graphs = len(num_atoms)
        with torch.jit.optimized_execution(False):
            if self._edge_gradients is None:  # a foreign model: the contract's forward, no stress
                out = self.model(*inputs, True) if self.paired else self.model(*inputs)
                atomic_energies, forces, edge_grad = out[keys.ATOMIC_ENERGIES], out[keys.FORCES], None
            else:
                # (atomic energies, forces, edge vectors, dE/dr per edge[, committee]): older files lack the last
                atomic_energies, forces, edge_vectors, edge_grad = self._edge_gradients(
                    *inputs, False, self.paired)[:4]
        forces = forces.detach().to(torch.float64)
        if not self.gradient_head:  # direct forces: each structure's net force removed (no drift)
            net = scatter_sum(forces, node_graph, num_graphs) / num_atoms.unsqueeze(1).to(forces)
            forces = forces - net[node_graph]
        out = {keys.ENERGY: scatter_sum(atomic_energies.detach().to(torch.float64), node_graph, num_graphs),
               keys.FORCES: forces}
        if self.has_stress and edge_grad is not None:
            vectors, gradients = edge_vectors.detach().to(torch.float64), edge_grad.detach().to(torch.float64)
            virial = scatter_sum(-(vectors.unsqueeze(2) * gradients.unsqueeze(1)), graph["edge_graph"], num_graphs)
            out[keys.STRESS] = stress_from_virial(virial, cell.to(torch.float64), pbc)
        return out

    def _overlaps(self, lengths, edge_index, node_graph, num_atoms) -> Dict[int, str]:
        """Structures (batch index -> message) with two atoms closer than min_distance."""
        if self.min_distance <= 0 or len(lengths) == 0:
            return {}
        if float(lengths.min()) >= self.min_distance:  # one device-side min per step
            return {}
        node_graph = node_graph.cpu().numpy()
        lengths, edge_index = lengths.cpu().numpy(), edge_index.cpu().numpy()
        offsets = np.concatenate([[0], np.cumsum(num_atoms.cpu().numpy())])
        found: Dict[int, str] = {}
        for k in np.argsort(lengths):
            if lengths[k] >= self.min_distance:
                break
            b = int(node_graph[edge_index[0, k]])
            if b not in found:
                i, j = edge_index[:, k] - offsets[b]
                found[b] = (f"atoms {i} and {j} are {lengths[k]:.3g} Å apart (< {self.min_distance} Å): "
                            "overlapping atoms or positions in the wrong units?")
        return found


class SkinLists:
    """The neighbor lists of a batch's structures, kept from call to call (one per key).

    Each is mlip.data.neighbors.skin_list (pairs within r_max + skin, the same list MLIPCalculator
    keeps for one structure), rebuilt when skin_exceeded says a pair within r_max may be missing:
    an atom moved more than half the skin since the build, or the cell was strained since then
    beyond what the skin covers (cell relaxation). Per call, the kept lists are concatenated only
    when a structure entered, left or was rebuilt; the check and the filter to r_max are
    vectorised over the batch, on the positions' device.
    """

    def __init__(self, r_max: float, skin: float, paired: bool):
        self.r_max, self.skin, self.paired = r_max, skin, paired
        self.lists: Dict[Hashable, Dict[str, np.ndarray]] = {}  # key -> skin_list + the positions, cell, pbc at build
        self.keys: Optional[List[Hashable]] = None  # the structures of `joined`, in batch order
        self.joined: Dict[str, torch.Tensor] = {}
        self.built = 0

    def graph(self, keys: List[Hashable], positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
              num_atoms: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The batch's edges within r_max, from float64 positions (N, 3) Å and cells (B, 3, 3): "positions"
        (N, 3) float64 as the model sees them (each structure wrapped and relative to its origin),
        "edge_index" (2, E) (paired as [one direction of every pair; the reverses] if asked),
        "shifts" (E, 3) and "lengths" (E,) float64 Å, "node_graph" (N,), "edge_graph" (E,)."""
        if keys != self.keys or not (torch.equal(num_atoms, self.joined["num_atoms"])
                                     and torch.equal(pbc, self.joined["pbc"])):
            # Structures entered or left: build the lists of the new ones (or of a key now naming
            # another number of atoms or periodicity), forget those of the ones that left.
            sizes, periodic = num_atoms.tolist(), pbc.cpu().numpy()
            kept = {key: self.lists[key] for key, n, p in zip(keys, sizes, periodic) if key in self.lists
                    and len(self.lists[key]["positions"]) == n and (self.lists[key]["pbc"] == p).all()}
            self.lists = kept
            self._build([b for b, key in enumerate(keys) if key not in kept], keys, positions, cell, pbc, num_atoms)
            self._join(keys, positions.device)
        stale = self._stale(positions, cell)
        if bool(stale.any()):
            self._build(stale.nonzero().flatten().tolist(), keys, positions, cell, pbc, num_atoms)
            self._join(keys, positions.device)
        return self._within_r_max(positions, cell)

    def _build(self, batch_indices: List[int], keys, positions, cell, pbc, num_atoms):
        if not batch_indices:
            return
        offsets = np.concatenate([[0], np.cumsum(num_atoms.tolist())])
        positions, cell, pbc = positions.cpu().numpy(), cell.cpu().numpy(), pbc.cpu().numpy()
        for b in batch_indices:
            x = positions[offsets[b]:offsets[b + 1]]
            built = skin_list(x, cell[b], pbc[b], self.r_max + self.skin, self.paired)
            # a few distinct lattice shifts serve many edges: each step multiplies those by the cell
            shifts, shift_index = np.unique(built["cell_shifts"].reshape(-1, 3), axis=0, return_inverse=True)
            self.lists[keys[b]] = dict(built, shifts=shifts, shift_index=shift_index.reshape(-1), positions=x.copy(),
                                       cell=cell[b].copy(), pbc=pbc[b].copy())
            self.built += 1

    def _join(self, keys: List[Hashable], device: torch.device):
        """The kept lists of ``keys`` as one batch (node indices offset per structure)."""
        lists = [self.lists[key] for key in keys]
        sizes = np.array([len(item["positions"]) for item in lists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        # Paired lists are [one direction; reverses] per structure: all first halves, then all second
        # halves, so that edge k + E/2 reverses edge k in the batch too.
        halves = 2 if self.paired else 1
        shift_offsets = np.concatenate([[0], np.cumsum([len(item["shifts"]) for item in lists])[:-1]])
        edge_index, shift_index = [], []
        for half in range(halves):
            for item, offset, shift_offset in zip(lists, offsets, shift_offsets):
                size = item["edge_index"].shape[1] // halves
                edge_index.append(item["edge_index"][:, half * size:(half + 1) * size] + offset)
                shift_index.append(item["shift_index"][half * size:(half + 1) * size] + shift_offset)
        cell = np.array([item["cell"] for item in lists])
        periodic = np.array([item["pbc"].all() for item in lists])
        inverse = np.array([np.linalg.inv(c) if p else np.eye(3) for c, p in zip(cell, periodic)])
        f64 = dict(dtype=torch.float64, device=device)
        index = dict(dtype=torch.int64, device=device)
        node_graph = torch.repeat_interleave(torch.arange(len(lists), device=device), torch.as_tensor(sizes, **index))
        shift_graph = np.repeat(np.arange(len(lists)), [len(item["shifts"]) for item in lists])
        edge_index = torch.as_tensor(np.concatenate(edge_index, axis=1), **index)
        self.keys = list(keys)
        self.joined = {
            "num_atoms": torch.as_tensor(sizes, **index),
            "pbc": torch.as_tensor(np.array([item["pbc"] for item in lists]), device=device),
            "positions": torch.as_tensor(np.concatenate([item["positions"] for item in lists]), **f64),
            "cell": torch.as_tensor(cell, **f64),
            "inverse_cell": torch.as_tensor(inverse, **f64),  # identity where not fully periodic
            "images": torch.as_tensor(np.concatenate([item["images"] for item in lists]), **f64),
            "origin": torch.as_tensor(np.concatenate([item["origin"] if len(item["origin"]) else np.zeros((1, 3))
                                                      for item in lists]), **f64),
            "node_graph": node_graph,
            "edge_index": edge_index,
            "edge_graph": node_graph[edge_index[0]],
            "shifts": torch.as_tensor(np.concatenate([item["shifts"] for item in lists]), **f64),  # (S, 3) cell units
            "shift_graph": torch.as_tensor(shift_graph, **index),  # (S,) structure of each
            "shift_index": torch.as_tensor(np.concatenate(shift_index), **index),  # (E,) row of `shifts`
        }

    def _stale(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the structures whose kept list may miss a pair within r_max."""
        joined = self.joined
        changed = (cell != joined["cell"]).flatten(1).any(dim=1)
        periodic = joined["pbc"].all(dim=1)
        # the deformation D (C = C0 D) since the build; the identity, exactly, for an unchanged cell
        identity = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        deformation = torch.where(changed.view(-1, 1, 1), joined["inverse_cell"] @ cell, identity)
        stretch = torch.where(changed, torch.linalg.svdvals(deformation)[:, -1],
                              torch.ones_like(changed, dtype=cell.dtype))
        node_graph = joined["node_graph"]
        moved = positions - torch.einsum("ni,nij->nj", joined["positions"], deformation[node_graph])
        max_moved = torch.zeros(len(cell), dtype=cell.dtype, device=cell.device).scatter_reduce(
            0, node_graph, moved.norm(dim=1), reduce="amax")
        # a changed cell that is not fully periodic (not a relaxation this engine makes): rebuilt
        return (changed & ~periodic) | skin_exceeded(max_moved, stretch, self.r_max, self.skin)

    def _within_r_max(self, positions: torch.Tensor, cell: torch.Tensor) -> Dict[str, torch.Tensor]:
        joined = self.joined
        node_graph, edge_index = joined["node_graph"], joined["edge_index"]
        # Two float64 subtractions, the large one first: exact for atoms a lattice vector apart.
        translations = torch.einsum("ni,nij->nj", joined["images"], cell[node_graph])  # (N, 3) Å
        relative = (positions - translations) - joined["origin"][node_graph]
        lattice = torch.einsum("si,sij->sj", joined["shifts"], cell[joined["shift_graph"]])  # (S, 3) Å
        shifts = lattice.index_select(0, joined["shift_index"])
        vectors = relative.index_select(0, edge_index[1]) - relative.index_select(0, edge_index[0]) + shifts
        lengths = torch.linalg.vector_norm(vectors, dim=1)
        inside = lengths < self.r_max
        if self.paired:  # keep or drop both directions of a pair together
            inside = inside[: len(inside) // 2].repeat(2)
        kept = inside.nonzero().flatten()
        return {"positions": relative, "edge_index": edge_index.index_select(1, kept),
                "shifts": shifts.index_select(0, kept), "lengths": lengths.index_select(0, kept),
                "node_graph": node_graph, "edge_graph": joined["edge_graph"].index_select(0, kept)}


# --- FIRE over a batch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FIRESettings:
    """ASE's FIRE defaults (ase.optimize.FIRE): the batched relaxation follows the same path."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


def fire_step(x: torch.Tensor, f: torch.Tensor, row_graph: torch.Tensor, state: Dict[str, torch.Tensor],
              settings: FIRESettings = FIRESettings()) -> torch.Tensor:
    """One FIRE step for B independent problems at once (ase.optimize.FIRE.step, per structure).

    x, f: (R, 3) coordinates and forces (minus the gradient), row r belonging to problem
    row_graph[r]. state: "vel" (R, 3), and per problem (B,) "dt", "a", "n_positive" and "started"
    (False until the first step: ASE then starts from zero velocity without a downhill test).
    Updates state in place; returns the new coordinates.
    """
    num = len(state["dt"])

    def per_problem(values):  # (R,) -> (B,)
        return scatter_sum(values, row_graph, num)

    vel, dt, a = state["vel"], state["dt"], state["a"]
    vf = per_problem((f * vel).sum(dim=1))
    f_norm = per_problem((f * f).sum(dim=1)).sqrt()
    v_norm = per_problem((vel * vel).sum(dim=1)).sqrt()
    mix = state["started"] & (vf > 0)
    reset = state["started"] & ~(vf > 0)
    scale = torch.where(mix, a * v_norm / torch.where(f_norm > 0, f_norm, torch.ones_like(f_norm)),
                        torch.zeros_like(a))
    keep = torch.where(mix, 1.0 - a, torch.where(reset, torch.zeros_like(a), torch.ones_like(a)))
    vel = keep[row_graph].unsqueeze(1) * vel + scale[row_graph].unsqueeze(1) * f
    grow = mix & (state["n_positive"] > settings.Nmin)
    dt = torch.where(grow, torch.clamp(dt * settings.finc, max=settings.dtmax), dt)
    a = torch.where(grow, a * settings.fa, a)
    state["n_positive"] = torch.where(mix, state["n_positive"] + 1, torch.where(reset, 0, state["n_positive"]))
    a = torch.where(reset, torch.full_like(a, settings.astart), a)
    dt = torch.where(reset, dt * settings.fdec, dt)

    vel = vel + dt[row_graph].unsqueeze(1) * f
    dr = dt[row_graph].unsqueeze(1) * vel
    dr_norm = per_problem((dr * dr).sum(dim=1)).sqrt()
    shrink = torch.where(dr_norm > settings.maxstep, settings.maxstep / dr_norm, torch.ones_like(dr_norm))
    state.update(vel=vel, dt=dt, a=a, started=torch.ones_like(state["started"]))
    return x + shrink[row_graph].unsqueeze(1) * dr


def _expm_frechet_adjoint(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3): sum_ij L(A, E_mn)_ij G_ij for every direction E_mn, with L the Fréchet derivative
    of the matrix exponential; equal to L(A^T, G), the upper-right block of expm([[A^T, G], [0, A^T]])."""
    block = a.new_zeros(a.shape[0], 6, 6)
    block[:, :3, :3] = a.transpose(1, 2)
    block[:, 3:, 3:] = a.transpose(1, 2)
    block[:, :3, 3:] = g
    return torch.linalg.matrix_exp(block)[:, :3, 3:]


# --- relaxation ------------------------------------------------------------------------------------------


@dataclass
class _Active:
    """The structures in the batch, concatenated: atoms (N rows) and their cells (B)."""

    frames: List[int]  # input index of each structure
    atoms: List[Atoms]  # the input structures (species, pbc, info)
    x0: torch.Tensor  # (N, 3) Å, positions with the cell deformation taken out (ASE's filter coordinates)
    log_deform: torch.Tensor  # (B, 3, 3) n_atoms * log(deformation gradient): the cell coordinates
    orig_cell: torch.Tensor  # (B, 3, 3) Å
    atom_types: torch.Tensor  # (N,)
    pbc: torch.Tensor  # (B, 3)
    relax_cell: torch.Tensor  # (B,) bool
    num_atoms: torch.Tensor  # (B,)
    steps: torch.Tensor  # (B,) int64, FIRE steps taken
    fire: Dict[str, torch.Tensor]

    @property
    def node_graph(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.frames), device=self.x0.device), self.num_atoms)

    def deformation(self) -> torch.Tensor:  # (B, 3, 3)
        return torch.linalg.matrix_exp(self.log_deform / self.num_atoms.view(-1, 1, 1).to(self.log_deform))

    def positions_and_cell(self) -> Tuple[torch.Tensor, torch.Tensor]:
        deform = self.deformation()
        positions = torch.einsum("nj,nij->ni", self.x0, deform[self.node_graph])  # x0 @ F^T
        return positions, self.orig_cell @ deform.transpose(1, 2)


def _start(frames: Sequence[Tuple[int, Atoms, np.ndarray]], cell: bool, device) -> _Active:
    f64 = dict(dtype=torch.float64, device=device)
    num_atoms = torch.tensor([len(a) for _, a, _ in frames], device=device)
    count = len(frames)
    pbc = torch.tensor(np.array([a.pbc for _, a, _ in frames]), device=device)
    fire = {"vel": torch.zeros(int(num_atoms.sum()) + 3 * count, 3, **f64),
            "dt": torch.full((count,), FIRESettings.dt, **f64), "a": torch.full((count,), FIRESettings.astart, **f64),
            "n_positive": torch.zeros(count, dtype=torch.int64, device=device),
            "started": torch.zeros(count, dtype=torch.bool, device=device)}
    return _Active(
        frames=[i for i, _, _ in frames], atoms=[a for _, a, _ in frames],
        x0=torch.tensor(np.concatenate([a.positions for _, a, _ in frames]), **f64),
        log_deform=torch.zeros(count, 3, 3, **f64),
        orig_cell=torch.tensor(np.array([a.cell.array for _, a, _ in frames]), **f64),
        atom_types=torch.tensor(np.concatenate([t for _, _, t in frames]), device=device),
        pbc=pbc, relax_cell=pbc.all(dim=1) & cell, num_atoms=num_atoms,
        steps=torch.zeros(count, dtype=torch.int64, device=device), fire=fire,
    )


def _select(active: _Active, keep: torch.Tensor) -> _Active:
    """The structures where keep (B,) is True."""
    node_keep = keep[active.node_graph]
    count = len(active.frames)
    fire = dict(active.fire)
    atom_vel, cell_vel = _split_rows(active)
    fire["vel"] = torch.cat([atom_vel[node_keep], cell_vel.view(count, 3, 3)[keep].reshape(-1, 3)])
    for name in ("dt", "a", "n_positive", "started"):
        fire[name] = fire[name][keep]
    index = keep.nonzero().flatten().tolist()
    return _Active(frames=[active.frames[i] for i in index], atoms=[active.atoms[i] for i in index],
                   x0=active.x0[node_keep], log_deform=active.log_deform[keep], orig_cell=active.orig_cell[keep],
                   atom_types=active.atom_types[node_keep], pbc=active.pbc[keep], relax_cell=active.relax_cell[keep],
                   num_atoms=active.num_atoms[keep], steps=active.steps[keep], fire=fire)


def _split_rows(active: _Active) -> Tuple[torch.Tensor, torch.Tensor]:
    """FIRE velocities of the atom rows (N, 3) and the cell rows (3B, 3)."""
    n = active.x0.shape[0]
    return active.fire["vel"][:n], active.fire["vel"][n:]


def _join(first: _Active, second: _Active) -> _Active:
    (atoms1, cells1), (atoms2, cells2) = _split_rows(first), _split_rows(second)
    fire = {"vel": torch.cat([atoms1, atoms2, cells1, cells2])}
    for name in ("dt", "a", "n_positive", "started"):
        fire[name] = torch.cat([first.fire[name], second.fire[name]])
    cat = torch.cat
    return _Active(frames=first.frames + second.frames, atoms=first.atoms + second.atoms,
                   x0=cat([first.x0, second.x0]), log_deform=cat([first.log_deform, second.log_deform]),
                   orig_cell=cat([first.orig_cell, second.orig_cell]),
                   atom_types=cat([first.atom_types, second.atom_types]), pbc=cat([first.pbc, second.pbc]),
                   relax_cell=cat([first.relax_cell, second.relax_cell]),
                   num_atoms=cat([first.num_atoms, second.num_atoms]), steps=cat([first.steps, second.steps]),
                   fire=fire)


def _generalized_forces(active: _Active, forces: torch.Tensor, stress: Optional[torch.Tensor]) -> torch.Tensor:
    """(N + 3B, 3): forces on x0 and on the cell coordinates (ASE FrechetCellFilter.get_forces);
    the cell rows are zero for structures whose cell stays fixed."""
    deform = active.deformation()
    atom_rows = torch.einsum("ni,nij->nj", forces, deform[active.node_graph])  # f @ F
    cell_rows = torch.zeros_like(active.log_deform)
    if bool(active.relax_cell.any()):
        # ASE's stress is a Voigt 6-vector: the full tensor it rebuilds is symmetric (upper triangle).
        upper = torch.triu(stress)
        stress = upper + torch.triu(stress, diagonal=1).transpose(1, 2)
        cell = active.orig_cell @ deform.transpose(1, 2)
        volume = torch.linalg.det(cell).abs().view(-1, 1, 1)
        virial = -volume * stress
        gradient = virial @ torch.linalg.inv(deform.transpose(1, 2))
        n = active.num_atoms.view(-1, 1, 1).to(virial)
        cell_rows = _expm_frechet_adjoint(active.log_deform / n, gradient) / n
        cell_rows = cell_rows * active.relax_cell.view(-1, 1, 1).to(cell_rows)
    return torch.cat([atom_rows, cell_rows.reshape(-1, 3)])


@dataclass
class RelaxResult:
    frame: int  # index of the structure in the input
    atoms: Optional[Atoms]  # relaxed, with energy/forces/stress attached; None where it failed
    error: Optional[str] = None  # why it failed (unknown element, overlapping atoms, ...)


def relax_many(
    model: BatchedModel,
    structures: Iterable[Atoms],
    fmax: float = 0.01,
    steps: int = 1000,
    cell: bool = False,
    batch_atoms: int = BATCH_ATOMS,
    stop_on_error: bool = False,
) -> Iterator[RelaxResult]:
    """Relax every structure (FIRE; with ``cell``, also the cell of fully periodic ones through
    ASE's FrechetCellFilter), yielding each as soon as it leaves the batch (converged or out of
    ``steps``), in that order, not the input's.

    A relaxed structure carries a SinglePointCalculator (energy, forces, stress for periodic
    cells) and in its info: ``relax_converged`` (bool), ``relax_steps`` (FIRE steps taken),
    ``relax_fmax`` (eV/Å, max force incl. FrechetCellFilter's cell rows) and ``frame_index`` (input index).
    A structure that cannot be evaluated is yielded with ``error`` set and the others go on; with
    ``stop_on_error`` no further structure enters the batch after it, but the ones already in it
    are finished (no work is lost).
    """
    if cell and not model.has_stress:
        raise ValueError("relaxing the cell needs stresses: this model has a direct-force head or no per-edge "
                         "gradients (re-deploy it with `mlip deploy`)")
    if fmax <= 0 or steps < 0 or batch_atoms < 1:
        raise ValueError(f"need fmax > 0, steps >= 0 and batch_atoms >= 1 (got {fmax}, {steps}, {batch_atoms})")
    device = model.device
    queue = iter(enumerate(structures))
    waiting: Optional[Tuple[int, Atoms, np.ndarray]] = None  # read, checked, not yet in the batch
    pending: List[Tuple[int, Atoms, np.ndarray]] = []
    active: Optional[_Active] = None
    exhausted = False

    while True:
        # Fill the batch up to batch_atoms (always at least one structure).
        if active is not None and not active.frames:
            active = None
        atoms_in_batch = int(active.num_atoms.sum()) if active is not None else 0
        while True:
            if waiting is None and not exhausted:
                try:
                    frame, atoms = next(queue)
                except StopIteration:
                    exhausted = True
                    break
                try:
                    waiting = (frame, atoms, model.atom_types(atoms))
                except ValueError as error:
                    yield RelaxResult(frame, None, str(error))
                    exhausted = exhausted or stop_on_error
                    continue
            if waiting is None or (atoms_in_batch > 0 and atoms_in_batch + len(waiting[1]) > batch_atoms):
                break
            pending.append(waiting)
            atoms_in_batch += len(waiting[1])
            waiting = None
        if pending:
            new = _start(pending, cell, device)
            active = new if active is None else _join(active, new)
            pending = []
        if active is None:
            return

        positions, cells = active.positions_and_cell()
        try:
            out = model.evaluate(positions, active.atom_types, cells, active.pbc, active.num_atoms, active.frames)
        except OverlapError as error:
            bad = torch.zeros(len(active.frames), dtype=torch.bool, device=device)
            for b, message in error.messages.items():
                bad[b] = True
                yield RelaxResult(active.frames[b], None, message)
            if stop_on_error:
                exhausted, waiting = True, None
            active = _select(active, ~bad)
            continue
        stress = out.get(keys.STRESS)
        generalized = _generalized_forces(active, out[keys.FORCES], stress)
        count = len(active.frames)
        row_graph = torch.cat([active.node_graph, torch.arange(count, device=device).repeat_interleave(3)])
        fmax_now = torch.zeros(count, dtype=torch.float64, device=device).scatter_reduce(
            0, row_graph, generalized.norm(dim=1), reduce="amax")
        converged = fmax_now < fmax
        done = converged | (active.steps >= steps)
        if bool(done.any()):
            for b in done.nonzero().flatten().tolist():
                yield RelaxResult(active.frames[b], _finished(active, b, positions, cells, out, bool(converged[b]),
                                                              float(fmax_now[b])))
        rows_done = done[row_graph]
        if bool(done.all()):
            active = None
            continue
        # One FIRE step for the structures that go on (the finished ones leave with the rest of the batch).
        coordinates = torch.cat([active.x0, active.log_deform.reshape(-1, 3)])
        new_coordinates = fire_step(coordinates, generalized, row_graph, active.fire)
        coordinates = torch.where(rows_done.unsqueeze(1), coordinates, new_coordinates)
        n = active.x0.shape[0]
        active.x0, active.log_deform = coordinates[:n], coordinates[n:].view(-1, 3, 3)
        active.steps = active.steps + (~done).to(active.steps)
        if bool(done.any()):
            active = _select(active, ~done)


def _finished(active: _Active, b: int, positions, cells, out, converged: bool, fmax: float) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    node_graph = active.node_graph
    mine = node_graph == b
    atoms = active.atoms[b].copy()
    atoms.calc = None
    atoms.set_cell(cells[b].cpu().numpy())
    atoms.positions = positions[mine].cpu().numpy()
    results = {"energy": float(out[keys.ENERGY][b]), "forces": out[keys.FORCES][mine].cpu().numpy()}
    if keys.STRESS in out and atoms.pbc.all():
        results["stress"] = matrix_to_voigt(out[keys.STRESS][b].cpu().numpy())
    results["free_energy"] = results["energy"]
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(relax_converged=converged, relax_steps=int(active.steps[b]), relax_fmax=fmax,
                      frame_index=active.frames[b])
    return atoms


# --- command line (`mlip relax MODEL many.extxyz -o relaxed.extxyz`) ----------------------------------------


def has_several_frames(spec: str) -> bool:
    """Whether a structure argument is a file holding more than one frame."""
    import os
    from itertools import islice

    import ase.io

    if spec.startswith(("bulk:", "molecule:")) or not os.path.isfile(spec):
        return False
    try:
        return len(list(islice(ase.io.iread(spec, index=":"), 2))) > 1  # reads at most two frames
    except Exception:  # unreadable: the one-structure path reports it, naming the file
        return False


def run_relax_many(args) -> int:
    """Every frame of ``args.structure`` relaxed in batches and written, in input order, to
    ``args.output``. ``args.on_error``: "skip" a frame that cannot be evaluated (named on stderr)
    or "stop" at it (the frames already in the batch are finished); either way every relaxed frame
    is written."""
    import sys
    import time

    import ase.io
    from tqdm import tqdm

    from ..files import atomic_output, check_input, read_atoms
    from .cli import _output_format

    if not args.output:
        raise ValueError("relaxing several structures needs -o/--output (where the relaxed frames go)")
    if args.optimizer != "FIRE":
        raise ValueError(f"batched relaxation uses FIRE; --optimizer {args.optimizer} relaxes one structure only")
    frames = read_atoms(args.structure, "structure file", index=":")
    output_format = _output_format(args.output, "--output", len(frames))
    check_input(args.model, "model file")
    model = BatchedModel(args.model, device=args.device)
    batch_atoms = args.batch_atoms if args.batch_atoms is not None else BATCH_ATOMS
    finished: Dict[int, Atoms] = {}
    failed: Dict[int, str] = {}
    start = time.perf_counter()
    try:
        with tqdm(total=len(frames), desc="relax", unit="structure", file=sys.stderr) as bar:
            for result in relax_many(model, frames, args.fmax, args.steps, args.cell, batch_atoms,
                                     stop_on_error=args.on_error == "stop"):
                if result.error is not None:
                    failed[result.frame] = result.error
                    print(f"frame {result.frame} of {args.structure}: {result.error}", file=sys.stderr)
                else:
                    finished[result.frame] = result.atoms
                bar.update(1)
                bar.set_postfix(converged=sum(a.info["relax_converged"] for a in finished.values()),
                                failed=len(failed))
    finally:  # an error or Ctrl-C never loses the structures already relaxed
        with atomic_output(args.output) as tmp:
            ase.io.write(tmp, [finished[i] for i in sorted(finished)], format=output_format)
    seconds = time.perf_counter() - start
    converged = sum(a.info["relax_converged"] for a in finished.values())
    print(f"{len(finished)} of {len(frames)} structures relaxed in {seconds:.1f} s "
          f"({len(finished) / seconds * 60:.0f} per minute): {converged} converged (fmax {args.fmax} eV/Å), "
          f"{len(finished) - converged} NOT converged within {args.steps} steps (info relax_converged=False)")
    print(f"wrote {args.output}")
    if failed:
        frames_failed = sorted(failed)
        if args.on_error == "stop":
            raise ValueError(f"stopped at frame {frames_failed[0]} of {args.structure}: {failed[frames_failed[0]]} "
                             f"({len(finished)} finished structures written to {args.output}; --on-error skip "
                             "goes on past such frames)")
        print(f"skipped frames {frames_failed} (see above)")
    return 0 if converged == len(frames) else 1


# --- MD of many independent systems --------------------------------------------------------------------------


def md_many(
    model: BatchedModel,
    structures: Sequence[Atoms],
    ensemble: str,
    temperature_K: float,
    steps: int,
    timestep_fs: float = 1.0,
    friction_per_fs: float = 0.01,
    seeds: Optional[Sequence[int]] = None,
    observer: Optional[Callable[[int, List[Atoms]], None]] = None,
    interval: int = 10,
) -> List[Atoms]:
    """Independent MD runs of all ``structures`` at once, one model call per step for all.

    Each run k is the run `mlip md` makes for that structure with ``--seed seeds[k]``: initial
    momenta from np.random.default_rng(seeds[k]) at ``temperature_K`` (ase.md.thermalize_momenta),
    no net momentum (and no rotation for molecules); then "nve": ASE's VelocityVerlet, or "nvt":
    ASE's Langevin (friction in 1/fs, same random numbers, the centre of mass fixed like ASE's
    FixCom constraint). ``observer(step, frames)`` is called at step 0 and every ``interval``
    steps with the current structures (energy, forces[, stress] attached). Returns the final
    structures with their momenta.
    """
    from ase import units
    from ase.md import thermalize_momenta
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    if ensemble not in ("nve", "nvt"):
        raise ValueError(f"batched MD runs nve or nvt, not {ensemble!r} (npt: one structure at a time)")
    if steps < 0 or timestep_fs <= 0 or temperature_K < 0 or interval < 1:
        raise ValueError("need steps >= 0, timestep > 0, temperature >= 0 and interval >= 1")
    seeds = list(range(len(structures))) if seeds is None else list(seeds)
    if len(seeds) != len(structures):
        raise ValueError(f"{len(structures)} structures but {len(seeds)} seeds")
    device, f64 = model.device, dict(dtype=torch.float64, device=model.device)
    rngs = [np.random.default_rng(seed) for seed in seeds]
    frames, types = [], []
    for k, atoms in enumerate(structures):
        try:
            types.append(model.atom_types(atoms))
        except ValueError as error:
            raise FrameError(k, str(error)) from None
        atoms = atoms.copy()
        thermalize_momenta(atoms, temperature_K, rng=rngs[k])
        Stationary(atoms)
        if not atoms.pbc.any():
            ZeroRotation(atoms)
        frames.append(atoms)

    num_atoms = torch.tensor([len(a) for a in frames], device=device)
    node_graph = torch.repeat_interleave(torch.arange(len(frames), device=device), num_atoms)
    atom_types = torch.tensor(np.concatenate(types), device=device)
    cell = torch.tensor(np.array([a.cell.array for a in frames]), **f64)
    pbc = torch.tensor(np.array([a.pbc for a in frames]), device=device)
    x = torch.tensor(np.concatenate([a.positions for a in frames]), **f64)
    masses = torch.tensor(np.concatenate([a.get_masses() for a in frames]), **f64).unsqueeze(1)  # (N, 1)
    p = torch.tensor(np.concatenate([a.get_momenta() for a in frames]), **f64)
    total_mass = scatter_sum(masses, node_graph, len(frames))  # (B, 1)
    dt = timestep_fs * units.fs

    def forces_now():
        try:
            out = model.evaluate(x, atom_types, cell, pbc, num_atoms, ids=range(len(frames)))
        except OverlapError as error:
            b = next(iter(error.messages))
            raise FrameError(b, error.messages[b]) from None
        if ensemble == "nvt":  # FixCom.adjust_forces: no mass-weighted net force
            weight = scatter_sum(masses * masses, node_graph, len(frames))
            out[keys.FORCES] = out[keys.FORCES] - masses * (
                scatter_sum(masses * out[keys.FORCES], node_graph, len(frames)) / weight)[node_graph]
        return out

    def observe(step, out):
        if observer is None:
            return
        from ase.calculators.singlepoint import SinglePointCalculator

        current = []
        for b, atoms in enumerate(frames):
            mine = node_graph == b
            frame = atoms.copy()
            frame.positions, frame.info["step"] = x[mine].cpu().numpy(), step
            frame.set_momenta(p[mine].cpu().numpy(), apply_constraint=False)
            results = {"energy": float(out[keys.ENERGY][b]), "forces": out[keys.FORCES][mine].cpu().numpy()}
            if keys.STRESS in out and frame.pbc.all():
                results["stress"] = matrix_to_voigt(out[keys.STRESS][b].cpu().numpy())
            frame.calc = SinglePointCalculator(frame, **results)
            current.append(frame)
        observer(step, current)

    def center_of_mass(positions):  # (B, 3)
        return scatter_sum(masses * positions, node_graph, len(frames)) / total_mass

    if ensemble == "nvt":  # ase.md.langevin.Langevin.updatevars, per atom (masses differ)
        friction, kT = friction_per_fs / units.fs, temperature_K * units.kB
        sigma = torch.sqrt(2 * kT * friction / masses)
        c1 = dt / 2.0 - dt * dt * friction / 8.0
        c2 = dt * friction / 2 - dt * dt * friction * friction / 8.0
        c3 = np.sqrt(dt) * sigma / 2.0 - dt**1.5 * friction * sigma / 8.0
        c5 = dt**1.5 * sigma / (2 * np.sqrt(3))
        c4 = friction / 2.0 * c5

    out = forces_now()
    observe(0, out)
    for step in range(1, steps + 1):
        forces = out[keys.FORCES]
        if ensemble == "nve":  # ase.md.verlet.VelocityVerlet.step
            p = p + 0.5 * dt * forces
            x = x + dt * p / masses
            out = forces_now()
            p = p + 0.5 * dt * out[keys.FORCES]
        else:  # ase.md.langevin.Langevin.step with a FixCom constraint
            xi = torch.tensor(np.concatenate([rng.standard_normal(size=(len(a), 3)) for rng, a in zip(rngs, frames)]),
                              **f64)
            eta = torch.tensor(np.concatenate([rng.standard_normal(size=(len(a), 3))
                                               for rng, a in zip(rngs, frames)]), **f64)
            # each structure's own generator draws xi, then eta, as ASE's Langevin does
            rnd_pos, rnd_vel = c5 * eta, c3 * xi - c4 * eta
            v = p / masses
            v = v + c1 * forces / masses - c2 * v + rnd_vel
            old = x
            new = old + dt * v + rnd_pos
            new = new + (center_of_mass(old) - center_of_mass(new))[node_graph]  # FixCom.adjust_positions
            v = (new - old - rnd_pos) / dt
            x = new
            out = forces_now()
            v = v + c1 * out[keys.FORCES] / masses - c2 * v + rnd_vel
            p = v * masses
            p = p - masses * (scatter_sum(p, node_graph, len(frames)) / total_mass)[node_graph]  # FixCom momenta
        if step % interval == 0 or step == steps:
            observe(step, out)
    final = []
    for b, atoms in enumerate(frames):
        mine = node_graph == b
        atoms.positions = x[mine].cpu().numpy()
        atoms.set_momenta(p[mine].cpu().numpy(), apply_constraint=False)
        final.append(atoms)
    return final


def run_md_many(args) -> int:
    """`mlip md` over every frame of a file, or ``--replicas K`` copies of one structure (seeds
    SEED, SEED+1, ...): one model call per step for all, in groups of about 2000 atoms run one
    after the other. Frames go to ``--traj`` with info ``replica`` (index of the run) and ``step``.
    ``--on-error skip``: a run that fails (an unknown element, overlapping atoms) is named and left
    out, and its group runs again from the start without it (each run's own seed: the same
    trajectories), its frames of the failed attempt taken out of ``--traj``; "stop" ends there,
    keeping what was written. Exit code 1 if a run was skipped."""
    import os
    import sys

    import ase.io
    from tqdm import tqdm

    from ..files import check_input, read_atoms
    from .cli import _output_format, read_structure

    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.ensemble not in ("nve", "nvt"):
        raise ValueError(f"several runs at once are nve or nvt, not --ensemble {args.ensemble} (npt: one structure)")
    if has_several_frames(args.structure):
        if args.replicas not in (None, 1):
            raise ValueError("--replicas copies one structure; the structure file has several frames already")
        structures = read_atoms(args.structure, "structure file", index=":")
    else:
        structures = [read_structure(args.structure)] * (args.replicas or 1)
    what = "replica" if args.replicas else "frame"
    if args.traj:
        traj_format = _output_format(args.traj, "--traj", len(structures) * (args.steps // args.interval + 1))
    check_input(args.model, "model file")
    model = BatchedModel(args.model, device=args.device)
    if args.traj and os.path.exists(args.traj):
        os.remove(args.traj)  # frames are appended below: start a fresh file
    groups, size = [[]], 0  # consecutive runs, about BATCH_ATOMS atoms per group
    for k, atoms in enumerate(structures):
        if groups[-1] and size + len(atoms) > BATCH_ATOMS:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += len(atoms)

    final, skipped, written = [], [], 0  # written: frames in --traj
    with tqdm(total=args.steps * len(groups), desc=f"md {args.ensemble} x{len(structures)}", unit="step",
              file=sys.stderr) as bar:
        for group in groups:
            done, written_before = bar.n, written
            while group:

                def observe(step, frames, group=group):  # every --interval steps and at the end
                    nonlocal written
                    if args.traj and step % args.interval == 0:  # as `mlip md` on one structure
                        for k, frame in zip(group, frames):
                            frame.info["replica"] = k
                        ase.io.write(args.traj, frames, append=True)
                        written += len(frames)
                    if step > 0:
                        bar.set_postfix(T=f"{np.mean([frame.get_temperature() for frame in frames]):.0f} K (mean)")
                        bar.update(done + step - bar.n)

                try:
                    runs = md_many(model, [structures[k] for k in group], args.ensemble, args.temperature,
                                   args.steps, args.timestep, args.friction, [args.seed + k for k in group], observe,
                                   interval=args.interval)
                except FrameError as error:
                    failed = group[error.frame]
                    message = f"{args.structure}: {what} {failed}: {str(error).split(': ', 1)[1]}"
                    if args.on_error == "stop":
                        raise ValueError(message) from None
                    print(f"{message} (skipped)", file=sys.stderr)
                    skipped.append(failed)
                    group = [k for k in group if k != failed]
                    if written > written_before:  # the failed attempt's frames: the group runs again
                        _keep_first_frames(args.traj, written_before, traj_format)
                        written = written_before
                    bar.n = done
                    bar.refresh()
                    continue
                final += zip(group, runs)
                break
    if args.traj and written:
        print(f"wrote {args.traj}")
    for k, atoms in final:
        print(f"{what} {k}: {args.steps} steps of {args.timestep} fs, T {atoms.get_temperature():.1f} K")
    if skipped:
        print(f"skipped {what}s {sorted(skipped)} (see above)")
    return 1 if skipped else 0


def _keep_first_frames(path: str, count: int, file_format: str) -> None:
    """Cut the trajectory file at ``path`` down to its first ``count`` frames (none: removed)."""
    import os

    import ase.io

    from ..files import atomic_output

    if count == 0:
        os.remove(path)
        return
    frames = ase.io.read(path, index=f":{count}", format=file_format)
    with atomic_output(path) as tmp:
        ase.io.write(tmp, frames, format=file_format)
