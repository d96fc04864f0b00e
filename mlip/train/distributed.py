"""Data-parallel training over several processes: torch.distributed, started by torchrun.

    torchrun --nproc-per-node 2 -m mlip train config.yaml          # or: mlip train config.yaml --nproc 2
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m mlip train config.yaml

torchrun starts one process per device and gives each RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; :func:`process_group` reads them. Without them (or
with WORLD_SIZE 1) training runs in this one process, exactly as it always has.

The rule that makes N processes the same optimisation as one: ``batch_size`` (and ``batch_atoms``)
is the *global* batch. The data order is a permutation per (seed, epoch), cut into global batches
(mlip.data.BatchLoader); each process takes a contiguous share of every global batch; each loss
term is divided by its count of labelled values in the whole global batch (summed over the
processes before the backward pass), and DistributedDataParallel's averaging of the gradients is
undone (the loss is multiplied by the number of processes), so the summed gradient is the gradient
of the global batch's loss. Neither the batches nor the position in the run depend on the number
of processes, so a checkpoint resumes exactly with any number of them.

Failure: a process that raises exits non-zero and torchrun's agent ends the others at once,
naming the rank (`mlip train` prints the error with its rank). A process that hangs without dying
makes the others' next collective fail after ``MLIP_DIST_TIMEOUT_S`` seconds.
"""

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

# Collectives of the training loop (gradients, counts, metrics) raise after this long: a rank that
# hangs ends the run instead of holding the devices for the default 10-30 minutes. Steps, validation
# and checkpoint writes take seconds, so 5 minutes leaves ample room.
STEP_TIMEOUT_S = 300.0
# Rank 0 alone converts structure files to HDF5 and computes the statistics while the others wait:
# hours for millions of structures. (A rank that dies is noticed by torchrun at once, not by this.)
PREPARE_TIMEOUT_S = 6 * 3600.0


@dataclass
class Ranks:
    """This process's place in a run: its rank, how many there are, and its device."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # a gloo group with PREPARE_TIMEOUT_S: host values, objects, waits

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes: converted data, checkpoints, log, plots, progress bar."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place, on the tensor's device (no host synchronisation on a GPU)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def sum_host(self, values: List[float]) -> List[float]:
        """Sum of host numbers over the ranks."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.control)
        return tensor.tolist()

    def decide(self, flag: bool) -> bool:
        """Rank 0's decision, for choices that must not differ between ranks (a wall-clock budget)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)])
        dist.broadcast(tensor, 0, group=self.control)
        return bool(tensor[0])

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]

    def gather(self, value: Any) -> List[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def wait(self) -> None:
        """Until every rank gets here (e.g. rank 0 has written the files the others read)."""
        if self.distributed:
            dist.barrier(group=self.control)


class LossOutputs(torch.nn.Module):
    """``model`` with only the outputs the loss reads (``labels``). DistributedDataParallel expects a
    gradient for every weight it can reach from its module's outputs: an output the loss ignores
    (the energy, with energy weight 0) would leave the weights only it reaches waiting."""

    def __init__(self, model: torch.nn.Module, labels: List[str]):
        super().__init__()
        self.model = model
        self.labels = list(labels)

    def forward(self, batch):
        prediction = self.model(batch)
        return {label: prediction[label] for label in self.labels if label in prediction}


@contextmanager
def process_group(device: str, backend: Optional[str] = None) -> Iterator[Ranks]:
    """The ranks of this run, from torchrun's environment, with torch.distributed set up on first use
    and kept for the life of the process (torn down at exit): one process may train run after run
    (stages, folds) in it; torn down and set up again, the second group's first barrier never
    returned. ``device``: the config's; under torchrun, ``cuda`` means the GPU of this local rank.
    ``backend``: nccl on CUDA, gloo on the CPU unless given."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Ranks(torch.device(device))
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    own_device = rank_device(device, local_rank, local_world)
    backend = backend or ("nccl" if own_device.type == "cuda" else "gloo")
    if backend == "nccl" and own_device.type != "cuda":
        raise ValueError(f"distributed_backend: nccl needs device: cuda (the device is {device}); use gloo on the CPU")
    if not dist.is_initialized():
        if own_device.type == "cuda":
            torch.cuda.set_device(own_device)
        timeout = float(os.environ.get("MLIP_DIST_TIMEOUT_S", STEP_TIMEOUT_S))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        atexit.register(_destroy_if_initialized)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=PREPARE_TIMEOUT_S))
    yield Ranks(own_device, rank, world_size, local_rank, control)


def _destroy_if_initialized() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, local_rank: int, local_world: int) -> torch.device:
    """One device per process: ``cuda`` -> ``cuda:LOCAL_RANK``; the CPU is shared."""
    chosen = torch.device(device)
    if chosen.type == "cpu":
        return chosen
    if chosen.index is not None and local_world > 1:
        raise ValueError(f"device: {device} names one GPU, but {local_world} processes run on this node: write "
                         "`device: cuda` (each process takes the GPU of its local rank; CUDA_VISIBLE_DEVICES picks "
                         "which GPUs)")
    if chosen.index is not None:
        return chosen
    if chosen.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start "
                         "at most that many processes per node")
    return torch.device(chosen.type, local_rank)
