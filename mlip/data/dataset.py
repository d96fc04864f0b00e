"""Datasets of graphs (in memory or in an HDF5 file), conversion, splits and batches.

Typical use::

    convert_to_hdf5("train.extxyz", "train.h5", r_max=5.0, label_keys=LabelKeys(energy="REF_energy"))
    data = GraphDataset.from_hdf5("train.h5")
    train, val = split_indices(len(data), val_fraction=0.1, seed=1)
    loader = BatchLoader(data, batch_size=8, indices=train, seed=1)
    for epoch in range(start_epoch, n_epochs):
        for batch in loader.epoch(epoch):  # the order depends only on (seed, epoch)
            ...
"""

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import keys
from .atoms import DEFAULT_MIN_DISTANCE, LabelKeys, TypeMapper, atoms_to_graph
from .batch import collate
from .hdf5 import GraphWriter, HDF5Graphs
from .neighbors import DEFAULT_BACKEND

PathLike = Union[str, os.PathLike]
Graph = Dict[str, np.ndarray]


class GraphDataset:
    """Indexable structures as graph dicts (see :func:`mlip.data.atoms.atoms_to_graph`).

    Backed by a list of graphs in memory or by an HDF5 file read lazily (:meth:`from_hdf5`);
    both give the same arrays. ``get_batch`` reads several structures at once, which for a file
    is one read per array instead of one per structure.
    """

    def __init__(
        self,
        graphs: Sequence[Graph],
        r_max: Optional[float] = None,
        type_names: Optional[Sequence[str]] = None,
        label_keys: Optional[LabelKeys] = None,
        config_types: Optional[Sequence[str]] = None,
    ):
        self._graphs: Optional[List[Graph]] = list(graphs)
        self._file: Optional[HDF5Graphs] = None
        self.r_max = r_max
        self.type_names = list(type_names) if type_names is not None else None
        self.label_keys = label_keys
        self.content_hash: Optional[str] = None
        n = len(self._graphs)
        self.config_types = np.array(list(config_types) if config_types is not None else [""] * n, dtype=object)
        if len(self.config_types) != n:
            raise ValueError(f"{len(self.config_types)} config types for {n} structures")
        self.num_atoms = np.array([len(g[keys.ATOM_TYPES]) for g in self._graphs], dtype=np.int64)
        self.num_edges = np.array([g[keys.EDGE_INDEX].shape[1] for g in self._graphs], dtype=np.int64)

    @classmethod
    def from_atoms(
        cls,
        structures: Iterable,
        r_max: float,
        type_names: Optional[Sequence[str]] = None,
        label_keys: LabelKeys = LabelKeys(),
        require: Sequence[str] = (keys.ENERGY,),
        min_distance: float = DEFAULT_MIN_DISTANCE,
        backend: str = DEFAULT_BACKEND,
    ) -> "GraphDataset":
        """In memory, from ase.Atoms or files (see ``iter_structures``: ``file@selection`` works)."""
        sourced = list(iter_sourced_structures(structures))
        structures = [atoms for _, atoms in sourced]
        mapper = TypeMapper(type_names) if type_names is not None else TypeMapper.from_atoms(structures)
        graphs, config_types = [], []
        for k, (where, atoms) in enumerate(sourced):
            graphs.append(_to_graph(atoms, k, where, r_max, mapper, label_keys, require, min_distance, backend))
            config_types.append(str(atoms.info.get("config_type", "")))
        return cls(graphs, r_max, mapper.type_names, label_keys, config_types)

    @classmethod
    def from_hdf5(cls, path: PathLike, cache_bytes: int = 64 << 20) -> "GraphDataset":
        """Lazily from a file written by :func:`convert_to_hdf5`."""
        stored = HDF5Graphs(path, cache_bytes=cache_bytes)
        self = cls.__new__(cls)
        self._graphs, self._file = None, stored
        self.r_max = float(stored.attrs["r_max"])
        self.type_names = json.loads(stored.attrs["type_names"])
        self.label_keys = LabelKeys(**json.loads(stored.attrs["label_keys"]))
        self.content_hash = str(stored.attrs["content_hash"])
        self.config_types = stored.config_types
        self.num_atoms = np.diff(stored.atom_offsets)
        self.num_edges = np.diff(stored.edge_offsets)
        return self

    def __len__(self) -> int:
        return len(self.num_atoms)

    def __getitem__(self, index: int) -> Graph:
        return self.get_batch([index])[0]

    def get_batch(self, indices: Sequence[int]) -> List[Graph]:
        """Graphs of ``indices``, in that order (repeats allowed)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(indices) and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"structure index out of range for a dataset of {n}: {indices.tolist()}")
        indices = np.where(indices < 0, indices + n, indices)
        if self._graphs is not None:
            return [self._graphs[i] for i in indices]
        unique, inverse = np.unique(indices, return_inverse=True)  # the file is read in order
        graphs = self._file.read(unique)
        return [graphs[k] for k in inverse]

    def has_label(self, field: str) -> np.ndarray:
        """(B,) bool: which structures carry ``field`` (keys.ENERGY, FORCES or STRESS)."""
        if self._file is not None:
            return self._file.has[field].copy()
        return np.array([field in g for g in self._graphs])


def convert_to_hdf5(
    inputs: Union[PathLike, Sequence[PathLike], Iterable],
    output: PathLike,
    r_max: float,
    type_names: Optional[Sequence[str]] = None,
    label_keys: LabelKeys = LabelKeys(),
    require: Sequence[str] = (keys.ENERGY,),
    min_distance: float = DEFAULT_MIN_DISTANCE,
    backend: str = DEFAULT_BACKEND,
    compression: Optional[str] = "lzf",
    progress: bool = True,
    buffer_atoms: int = 1 << 20,
) -> str:
    """Read structures, build their graphs at ``r_max`` and write them to ``output``.

    ``inputs``: a file, a list of files (anything ``ase.io.read(path, ":")`` reads), or ase.Atoms.
    Structures are streamed (``ase.io.iread``) so files larger than memory convert. Without
    ``type_names`` the elements found are used, sorted by atomic number (this costs one extra pass
    over the files). The file appears only when complete (written to a temporary name, then
    renamed). Graphs are written in blocks of about ``buffer_atoms`` atoms (memory use while
    converting). Returns the content hash (sha256), also stored in the file as ``content_hash``.
    """
    output = Path(output)
    if type_names is None and not _paths(inputs):
        inputs = list(inputs)  # two passes over a generator of Atoms
    if type_names is None:
        type_names = TypeMapper.from_atoms(iter_structures(inputs)).type_names
    mapper = TypeMapper(type_names)
    attrs = {
        "label_keys": json.dumps(dataclasses.asdict(label_keys)),
        "min_distance": float(min_distance),
        "neighbor_backend": backend,
        "sources": json.dumps([os.fspath(p) for p in _paths(inputs)]),
    }
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = GraphWriter(tmp, r_max, mapper.type_names, attrs, compression=compression, buffer_atoms=buffer_atoms)
    try:
        from tqdm import tqdm

        for k, (where, atoms) in enumerate(tqdm(iter_sourced_structures(inputs), desc=f"graphs -> {output.name}",
                                                unit=" structures", disable=not progress, mininterval=1.0)):
            graph = _to_graph(atoms, k, where, r_max, mapper, label_keys, require, min_distance, backend)
            writer.append(graph, atoms.info.get("config_type", ""))
        digest = writer.close()
        os.replace(tmp, output)
    except BaseException:
        if writer.file.id.valid:
            writer.file.close()
        tmp.unlink(missing_ok=True)
        raise
    return digest


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Random train / validation indices (sorted), the same for the same (n, val_fraction, seed)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1  # a requested validation set is never silently empty
    order = np.random.default_rng([int(seed), 0x5B117]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class BatchLoader:
    """Batches of structures (variable sizes), collated to torch tensors, optionally shared across ranks.

    The global batches of epoch k are a function of (seed, k, batch_size, batch_atoms) only: a
    permutation of the structures per (seed, epoch), cut into consecutive batches of at most
    ``batch_size`` structures and, with ``batch_atoms``, at most that many atoms (a structure larger
    than ``batch_atoms`` forms a batch alone). So training resumed at epoch k sees the batches it
    would have seen without interruption, whatever the number of processes.

    ``shard = (rank, world_size)``: this process collates only its share of each global batch, a
    contiguous run of structures with about 1/world_size of the batch's atoms (:func:`shares`). A rank
    whose share is empty (a global batch with fewer structures than ranks) gets a stand-in batch of
    the global batch's first structure, flagged ``keys.STAND_IN``: its loss must count zero.
    ``prefetch``: collate the next batch in a worker thread while the caller uses the current one.
    Each batch also carries ``keys.STRUCTURE_INDEX``: the dataset indices of its structures.
    """

    def __init__(
        self,
        dataset: GraphDataset,
        batch_size: int,
        indices: Optional[Sequence[int]] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
        batch_atoms: Optional[int] = None,
        shard: Tuple[int, int] = (0, 1),
        prefetch: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if batch_atoms is not None and batch_atoms < 1:
            raise ValueError(f"batch_atoms must be at least 1, got {batch_atoms}")
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"shard {shard}: rank must be in [0, world_size)")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.batch_atoms = None if batch_atoms is None else int(batch_atoms)
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.dtype = dtype
        self.device = device
        self.rank, self.world_size = int(rank), int(world_size)
        self.prefetch = prefetch

    def __len__(self) -> int:
        """Global batches per epoch (of epoch 0 with ``batch_atoms``: their number varies with the order)."""
        if self.batch_atoms is not None:
            return self.num_batches(0)
        full, rest = divmod(len(self.indices), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def num_batches(self, epoch: int) -> int:
        return len(self.global_batches(epoch))

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.indices)

    def global_batches(self, epoch: int) -> List[np.ndarray]:
        """Dataset indices of each global batch of ``epoch``, in order."""
        order = self.epoch_order(epoch)
        if self.batch_atoms is None:
            batches = [order[b:b + self.batch_size] for b in range(0, len(order), self.batch_size)]
        else:
            batches = _cut_by_atoms(order, self.dataset.num_atoms[order], self.batch_size, self.batch_atoms)
        if self.drop_last and batches and len(batches[-1]) < self.batch_size and self.batch_atoms is None:
            batches.pop()
        return batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        """This rank's batches of ``epoch``, from global batch ``start`` on (a resumed epoch)."""
        chosen = [self._share(batch) for batch in self.global_batches(epoch)[start:]]
        if not self.prefetch:
            for indices, stand_in in chosen:
                yield self._collate(indices, stand_in)
            return
        # One batch ahead: the worker collates batch k + 1 (HDF5 read, edge pairing, tensors) while
        # the caller trains on batch k. The order is the list above, whatever the timing.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlip-prefetch") as worker:
            pending = worker.submit(self._collate, *chosen[0]) if chosen else None
            for k in range(len(chosen)):
                batch = pending.result()
                if k + 1 < len(chosen):
                    pending = worker.submit(self._collate, *chosen[k + 1])
                yield batch

    def _share(self, batch: np.ndarray) -> Tuple[np.ndarray, bool]:
        cuts = shares(self.dataset.num_atoms[batch], self.world_size)
        mine = batch[cuts[self.rank]:cuts[self.rank + 1]]
        if len(mine) == 0:
            return batch[:1], True
        return mine, False

    def _collate(self, indices: np.ndarray, stand_in: bool) -> Dict[str, torch.Tensor]:
        batch = collate(self.dataset.get_batch(indices), dtype=self.dtype, device=self.device)
        batch[keys.STRUCTURE_INDEX] = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        if stand_in:
            batch[keys.STAND_IN] = torch.tensor(True)  # on the host: read without a device synchronisation
        return batch


def shares(num_atoms: np.ndarray, parts: int) -> np.ndarray:
    """Cut points ``[0, c_1, ..., n]`` of a batch of ``n`` structures into ``parts`` contiguous runs
    with about equal numbers of atoms; every run holds a structure when ``n >= parts`` (else the
    first ``n`` runs hold one each and the rest are empty)."""
    n = len(num_atoms)
    if n <= parts:
        return np.minimum(np.arange(parts + 1), n)
    cumulative = np.concatenate([[0], np.cumsum(num_atoms)])
    targets = cumulative[-1] * np.arange(1, parts) / parts
    upper = np.searchsorted(cumulative, targets)  # first cut at or above each target
    closer_below = targets - cumulative[upper - 1] < cumulative[upper] - targets
    cuts = np.concatenate([[0], upper - closer_below, [n]])
    for k in range(1, parts):  # at least one structure per run
        cuts[k] = max(cuts[k], cuts[k - 1] + 1)
    for k in range(parts - 1, 0, -1):
        cuts[k] = min(cuts[k], cuts[k + 1] - 1)
    return cuts


def _cut_by_atoms(order: np.ndarray, num_atoms: np.ndarray, max_structures: int, max_atoms: int) -> List[np.ndarray]:
    """Consecutive runs of ``order``: a run ends where the next structure would exceed
    ``max_structures`` structures or ``max_atoms`` atoms."""
    batches, start, atoms = [], 0, 0
    for k, n in enumerate(num_atoms.tolist()):
        if k > start and (k - start == max_structures or atoms + n > max_atoms):
            batches.append(order[start:k])
            start, atoms = k, 0
        atoms += n
    if len(order) > start:
        batches.append(order[start:])
    return batches


def _paths(inputs) -> List[PathLike]:
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in inputs):
        return list(inputs)
    return []


def iter_graph_chunks(sourced: Sequence[Tuple[Optional[str], object]], r_max: float, type_names: Sequence[str],
                      label_keys: LabelKeys = LabelKeys(), require: Sequence[str] = (),
                      max_atoms: int = 2000) -> Iterator[GraphDataset]:
    """GraphDatasets of consecutive structures of ``sourced`` ((where, atoms) pairs of
    :func:`iter_sourced_structures`), about ``max_atoms`` atoms each: the neighbor lists of one chunk
    are in memory at a time, not those of a whole file (predictions over large files). Errors name
    the file and frame, and the structure's index in ``sourced``."""
    mapper = TypeMapper(type_names)
    graphs, config_types, atoms_in_chunk = [], [], 0
    for k, (where, atoms) in enumerate(sourced):
        graphs.append(_to_graph(atoms, k, where, r_max, mapper, label_keys, require, DEFAULT_MIN_DISTANCE,
                                DEFAULT_BACKEND))
        config_types.append(str(atoms.info.get("config_type", "")))
        atoms_in_chunk += len(atoms)
        if atoms_in_chunk >= max_atoms:
            yield GraphDataset(graphs, r_max, mapper.type_names, label_keys, config_types)
            graphs, config_types, atoms_in_chunk = [], [], 0
    if graphs:
        yield GraphDataset(graphs, r_max, mapper.type_names, label_keys, config_types)


def iter_structures(inputs) -> Iterator:
    """ase.Atoms from files (streamed; ASE's ``file@selection`` picks some, e.g. ``data.extxyz@0:900``)
    or from an iterable of Atoms."""
    for _, atoms in iter_sourced_structures(inputs):
        yield atoms


def iter_sourced_structures(inputs) -> Iterator[Tuple[Optional[str], object]]:
    """(where, atoms) of :func:`iter_structures`: ``where`` is "FILE, frame I" (I counts the frames
    of the file, whatever the selection) for structures read from files, None for given Atoms."""
    paths = _paths(inputs)
    if paths:
        import ase.io
        from ase.io.formats import UnknownFileTypeError

        for path in paths:
            file, selection = split_selection(path)
            if not file.exists():
                raise FileNotFoundError(f"no such structure file: {file}")
            start, step = selection.start or 0, selection.step or 1
            count = 0
            with _uncompressed(file) as plain:
                try:
                    for atoms in ase.io.iread(plain, selection, do_not_split_by_at_sign=True):
                        # A selection from the end or backwards would need the file's length: count in it.
                        in_file = start >= 0 and step > 0
                        frame = f"frame {start + count * step}" if in_file else f"structure {count} of {path}"
                        count += 1
                        yield f"{file}, {frame}", atoms
                except UnknownFileTypeError as error:  # e.g. an empty file: not a traceback
                    raise ValueError(f"{file}: {error}") from None
            if count == 0:  # data that silently trains (or evaluates) on nothing
                raise ValueError(f"{path}: no structures (an empty file, or a selection past its end)")
    else:
        for atoms in inputs:
            yield None, atoms


def split_selection(path: PathLike) -> Tuple[Path, slice]:
    """ASE's ``file@selection`` convention: ``data.extxyz@0:900`` -> (data.extxyz, slice(0, 900)); a
    path without ``@`` selects every structure. A structure file whose name holds ``@`` needs a
    selection of its own (``name@x.xyz@:``), as in ASE."""
    from ase.io.formats import string2index

    path = os.fspath(path)
    name, at, selection = os.path.basename(path).rpartition("@")
    if not at:
        return Path(path), slice(None)
    try:
        index = string2index(selection)
    except ValueError:
        index = None
    if isinstance(index, int):
        index = slice(index, (index + 1) or None)  # one structure, still a list of one
    if not isinstance(index, slice):
        raise ValueError(f"{path}: '{selection}' after '@' is not a structure selection such as 0:900, -100: "
                         "or ::10")
    return Path(os.path.join(os.path.dirname(path), name)), index


_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


@contextlib.contextmanager
def _uncompressed(path: Path):
    """A compressed file decompressed to a temporary file (same name minus the suffix, so ASE
    still guesses the format). ASE's extxyz reader seeks back and forth, which in a gzip stream
    means decompressing again from the start: 4.8 s instead of 0.3 s for a 2 MB file, and
    quadratic in the file size."""
    if path.suffix not in _COMPRESSED:
        yield path
        return
    module = importlib.import_module(_COMPRESSED[path.suffix])
    with tempfile.TemporaryDirectory(prefix="mlip-") as tmp:
        plain = Path(tmp) / path.stem
        with module.open(path, "rb") as source, open(plain, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        yield plain


def _to_graph(atoms, k, where, r_max, mapper, label_keys, require, min_distance, backend) -> Graph:
    """atoms_to_graph, with the failing structure named in the error: its file and frame (``where``)
    and its index ``k`` among all inputs (its index in the graph file)."""
    try:
        return atoms_to_graph(atoms, r_max, mapper, label_keys, require, min_distance, backend)
    except (ValueError, KeyError) as error:
        message = error.args[0] if error.args else str(error)
        prefix = f"{where}: " if where else ""
        raise type(error)(f"{prefix}structure {k} ({atoms.get_chemical_formula()}): {message}") from error
