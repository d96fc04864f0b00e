"""The training loop: fresh runs, exact resumption, fine-tuning.

    from mlip.train import load_config, train, resume
    result = train(load_config("train.yaml"))        # writes RUN_DIR/{last,best}.pt, log.jsonl, learning_curve.png
    result = resume("RUN_DIR", max_epochs=200)       # continues exactly where last.pt stopped

Exact resumption: the batch order of epoch k is a function of (seed, k) only (BatchLoader), and a
checkpoint holds weights, optimizer, schedule, EMA, RNG states and the position (epoch, batch in
the epoch). A run stopped anywhere and resumed from its last checkpoint takes the same steps as
an uninterrupted run, so it ends with the same weights (up to floating-point non-associativity if
the thread count changes).

Under torchrun the same functions run data-parallel (mlip.train.distributed): ``batch_size`` is the
global batch, each process trains on its share, and a run resumes exactly with any number of
processes. Rank 0 alone writes files.

On a GPU the step loop does not wait for the device: the loss is summed on the device and read
(with the check that it is finite) every ``sync_every`` steps, at checkpoints and at epoch ends.
"""

import json
import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import yaml

from ..allocator import reuse_freed_memory
from ..data import BatchLoader, keys
from ..data.stats import DatasetStatistics
from ..models import ModelConfig, Potential, adapt_weights, build_model, rebuild_model
from .checkpoint import (BEST, LAST, CheckpointError, is_model_file, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .compiled import CompiledTraining
from .config import TrainConfig, check_device, config_from_dict, config_to_dict
from .data import check_labels, prepare_data, training_statistics
from .distributed import LossOutputs, Ranks, process_group
from .lock import run_directory_lock
from .loss import TERMS, loss_sums, weighted_loss
from .metrics import ErrorMetrics
from .optim import ExponentialMovingAverage, LearningRateSchedule, build_optimizer
from .plots import plot_learning_curve

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOG_FILE, CONFIG_FILE, CURVE_FILE = "log.jsonl", "config.yaml", "learning_curve.png"
PLOT_INTERVAL_S = 60.0  # redraw the learning curve at most this often during a run (and at the end)
GPU_SYNC_EVERY = 20  # steps between reads of the loss on a GPU (on the CPU reading it costs nothing: every step)


@dataclass
class TrainResult:
    run_dir: str
    epochs: int  # completed epochs
    steps: int  # optimizer steps
    stop_reason: str  # max_epochs | max_minutes | patience
    monitor: str  # the validation metric that picked best.pt
    best_metric: float  # its lowest value
    best_epoch: int
    elapsed_s: float  # wall clock of the whole run, resumes included
    history: List[Dict] = field(default_factory=list)  # rows of log.jsonl


def train(config: TrainConfig, on_step: Optional[Callable[["Trainer"], None]] = None) -> TrainResult:
    """A fresh run in ``config.run_dir`` (refused if it already holds a checkpoint, or if another
    process trains there: see mlip.train.lock); data-parallel when started by torchrun."""
    with process_group(config.device, config.distributed_backend) as ranks:
        if ranks.main:
            os.makedirs(config.run_dir, exist_ok=True)
        with _run_directory_lock(config.run_dir, ranks):
            return _train(config, on_step, ranks)


def _train(config: TrainConfig, on_step: Optional[Callable[["Trainer"], None]], ranks: Ranks) -> TrainResult:
    if os.path.exists(os.path.join(config.run_dir, LAST)):
        raise ValueError(f"{config.run_dir} already holds a run (last.pt): resume it with `mlip train --resume "
                         f"{config.run_dir}` or choose another run_dir")
    if config.schedule.cosine_epochs is None:
        # Fixed now, so a resumed run with another stop rule keeps the same learning-rate curve.
        config.schedule.cosine_epochs = config.stop.max_epochs
    if ranks.main:
        for name in ("train.h5", "validation.h5"):  # conversions left by an earlier attempt may be stale
            stale = os.path.join(config.run_dir, "data", name)
            if os.path.exists(stale):
                os.remove(stale)
        with open(os.path.join(config.run_dir, CONFIG_FILE), "w") as f:
            yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    ranks.wait()  # the others must not open a stale conversion before it is gone
    return Trainer(config, on_step=on_step, ranks=ranks).fit()


STAGE_DONE = "stage_done.json"  # in a stage's run directory once it has finished: its TrainResult, history aside


def train_stages(configs: List[TrainConfig]) -> List[TrainResult]:
    """Run the stages of ``load_stages`` in order, each from its predecessor's best weights. Started
    again after an interruption, a finished stage is read back, an interrupted one resumed: a staged
    run stopped anywhere continues where it was. One stage: ``train``."""
    if len(configs) == 1:
        return [train(configs[0])]
    results = []
    with process_group(configs[0].device, configs[0].distributed_backend) as ranks:
        for k, config in enumerate(configs, start=1):
            done = os.path.join(config.run_dir, STAGE_DONE)
            if os.path.exists(done):
                check_continues_unchanged(config, f"stage {k}", finished=True)
                with open(done) as f:
                    results.append(TrainResult(**json.load(f)))
                continue
            started = os.path.exists(os.path.join(config.run_dir, LAST))
            ranks.wait()  # every rank has looked before rank 0 can start this stage
            if started:
                check_continues_unchanged(config, f"stage {k}", finished=False)
                result = resume(config.run_dir, config.stop.max_epochs, config.stop.max_minutes, progress=config.progress)
            else:
                result = train(config)
            if ranks.main:
                summary = {key: v for key, v in asdict(result).items() if key != "history"}
                with open(done + ".tmp", "w") as f:
                    json.dump(summary, f, indent=1)
                os.replace(done + ".tmp", done)
            results.append(result)
    return results


# How a run goes or where it lives, not what it trains: may differ when a run is continued.
_RUN_SETTINGS = {"run_dir", "init_from", "progress", "device", "distributed_backend", "threads", "prefetch",
                 "compile", "checkpoint_every_steps"}


def check_continues_unchanged(config: TrainConfig, what: str, finished: bool) -> None:
    """For commands that run several trainings and, called again, continue them (staged training,
    `mlip cv`): the run in ``config.run_dir`` (``what``: "stage 2", "fold fold_0") continues only
    under the config it was trained with; a changed setting would otherwise be ignored without a
    word (a finished run read back, an interrupted one resumed from its checkpoint's config). An
    interrupted run may change its stop rule (pass it to ``resume``, as ``--resume`` may), and data
    files may move (compared by file name)."""
    trained = _comparable(load_checkpoint(os.path.join(config.run_dir, LAST))["config"])  # stop as last run
    current = _comparable(config_to_dict(config))
    # A setting added to mlip since the run trained is absent from its checkpoint: it ran as the default does.
    for key, default in _comparable(config_to_dict(TrainConfig())).items():
        trained.setdefault(key, default)
    free = ["stop.max_epochs", "stop.max_minutes"] if not finished else []
    if current["schedule.cosine_epochs"] is None:  # _train derived it from the stop the stage started with
        free.append("schedule.cosine_epochs")
    for name in free:
        trained.pop(name, None), current.pop(name, None)
    changed = sorted(key for key in set(trained) | set(current) if trained.get(key) != current.get(key))
    if changed:
        settings = ", ".join(f"{key}: {trained.get(key)!r} -> {current.get(key)!r}" for key in changed)
        state = "finished" if finished else "was interrupted"
        raise ValueError(f"{what} ({config.run_dir}) {state} under another config ({settings}); it continues "
                         "only with the config it started with: restore it, or train in another run_dir")


def _comparable(values: Dict, prefix: str = "") -> Dict[str, object]:
    """Flat {dotted key: value} of a config dict without _RUN_SETTINGS; data files by name only."""
    flat = {}
    for key, value in values.items():
        if not prefix and key in _RUN_SETTINGS:
            continue
        name = prefix + key
        if isinstance(value, dict) and key not in ("keys", "overrides", "isolated_atom_energies"):
            flat.update(_comparable(value, name + "."))
        elif name in ("data.train", "data.validation"):
            flat[name] = [os.path.basename(str(path)) for path in value]
        elif name == "data.isolated_atoms" and value is not None:
            flat[name] = os.path.basename(str(value))
        else:
            flat[name] = value
    return flat


def resume(
    run_dir: str,
    max_epochs: Optional[int] = None,
    max_minutes: Optional[float] = None,
    on_step: Optional[Callable[["Trainer"], None]] = None,
    progress: Optional[bool] = None,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its last.pt; only the stop rule may change. Under
    torchrun with any number of processes (the run's position does not depend on it)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory to resume")
    checkpoint = load_checkpoint(os.path.join(run_dir, LAST))  # replaced atomically: safe to read unlocked
    config = config_from_dict(checkpoint["config"])
    config.run_dir = os.path.abspath(run_dir)  # the directory may have moved since
    if max_epochs is not None:
        config.stop.max_epochs = int(max_epochs)
    if max_minutes is not None:
        config.stop.max_minutes = float(max_minutes)
    if progress is not None:
        config.progress = progress
    with process_group(config.device, config.distributed_backend) as ranks:
        with _run_directory_lock(run_dir, ranks):
            return Trainer(config, checkpoint=checkpoint, on_step=on_step, ranks=ranks).fit()


def _run_directory_lock(run_dir: str, ranks: Ranks):
    """Rank 0 holds the run directory for the whole job (the other ranks belong to its run)."""
    return run_directory_lock(run_dir) if ranks.main else nullcontext()


def checkpoint_weights(checkpoint: Dict, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The model state_dict of a checkpoint, with the EMA weights in place when present."""
    weights = dict(checkpoint["model"])
    if use_ema and checkpoint.get("ema") is not None:
        weights.update(checkpoint["ema"]["shadow"])
    return weights


def model_from_checkpoint(checkpoint: Dict, use_ema: bool = True, device="cpu") -> Potential:
    """The trained potential of a checkpoint (a dict from load_checkpoint), in eval mode."""
    dtype = config_from_dict(checkpoint["config"]).dtype
    return _rebuild(checkpoint, checkpoint_weights(checkpoint, use_ema), dtype).to(device).eval()


def model_from_model_file(path: str) -> Potential:
    """The eager potential inside a deployed model file, in eval mode (to re-deploy it with this
    version of mlip: a model file carries the TorchScript code it was compiled with)."""
    from ..deploy.model_file import read_metadata

    source = load_finetune_source(path)
    return _rebuild(source, source["model"], read_metadata(path)["dtype"]).eval()


def _rebuild(source: Dict, weights: Dict[str, torch.Tensor], dtype: str) -> Potential:
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: leave the global RNG alone
        model = rebuild_model(source["model_config"], DatasetStatistics.from_dict(source["statistics"]), DTYPES[dtype])
    _load_weights(model, weights)
    return model


def _load_weights(model: Potential, weights: Dict[str, torch.Tensor], resuming: bool = False) -> None:
    adapted = adapt_weights(model, weights)
    if resuming and adapted is not weights:
        raise CheckpointError("this run's NequIP was built by an mlip before 2026-12-02, with blocks that cannot reach "
                              "the energy (pruned since): its optimizer state does not fit, so it cannot be resumed; "
                              "fine-tune from it instead (init_from: its run directory)")
    try:
        model.load_state_dict(adapted)
    except RuntimeError as error:
        details = str(error).strip().splitlines()
        raise CheckpointError(
            f"the checkpoint's weights do not fit the {model.config.family} model this mlip version builds from its "
            f"config (was it written by another mlip version?): {' '.join(d.strip() for d in details[1:3])[:400]}"
        ) from None


class Trainer:
    """One run: data, model, optimizer, schedule, EMA and the position in the run."""

    def __init__(self, config: TrainConfig, checkpoint: Optional[Dict] = None,
                 on_step: Optional[Callable[["Trainer"], None]] = None, ranks: Optional[Ranks] = None):
        self.config = config
        self.run_dir = config.run_dir
        self.on_step = on_step
        self.ranks = ranks or Ranks(torch.device(config.device))
        self.device = check_device(str(self.ranks.device))
        self.dtype = DTYPES[config.dtype]
        if config.batch_size < self.ranks.world_size:
            raise ValueError(f"batch_size {config.batch_size} is smaller than the {self.ranks.world_size} processes: "
                             "batch_size is the global batch, shared among them; raise it or start fewer processes")

        # Fine-tuning takes architecture, statistics and weights from the source checkpoint, so the
        # model starts as exactly the source model (its energy scale and reference energies included).
        source = checkpoint
        if source is None and config.init_from:
            source = load_finetune_source(config.init_from)
        if source and "members" in source["model_config"]:
            raise ValueError(f"{config.init_from} is a committee of {len(source['model_config']['members'])} models: "
                             "fine-tune a member (`mlip deploy FILE --member K -o member.pt` writes one alone), then "
                             "build a new committee")
        self.model_config = ModelConfig(**source["model_config"]) if source else config.model
        r_max = float(self.model_config.hyperparameters()["r_max"])

        def open_data():
            return prepare_data(config.data, r_max, os.path.join(self.run_dir, "data"), config.seed,
                                source["type_names"] if source else None, progress=config.progress and self.ranks.main)

        # Rank 0 converts structure files once; the others then open its files.
        if self.ranks.main:
            self.data = open_data()
        self.ranks.wait()
        if not self.ranks.main:
            self.data = open_data()
        check_labels(config, self.data)
        if checkpoint is not None and checkpoint["training_data_hash"] != self.data.content_hash:
            raise ValueError(f"the training data in {self.run_dir}/data differs from the one the checkpoint was "
                             "trained on (content hash mismatch)")
        if source is not None:
            self.statistics = DatasetStatistics.from_dict(source["statistics"])
        else:  # computed once, by rank 0: every rank builds the same model
            self.statistics = self.ranks.broadcast(
                training_statistics(self.data, config.data.isolated_atom_energies, config.data.mean_binding_energy) if self.ranks.main else None)

        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the global RNG alone
            torch.manual_seed(config.seed)
            self.model = build_model(self.model_config, self.statistics, self.dtype).to(self.device)
        if source is not None:
            _load_weights(self.model, checkpoint_weights(source, use_ema=checkpoint is None), resuming=checkpoint is not None)

        shard = (self.ranks.rank, self.ranks.world_size)
        self.train_loader = BatchLoader(self.data.train, config.batch_size, self.data.train_indices, shuffle=True,
                                        seed=config.seed, dtype=self.dtype, device=self.device,
                                        batch_atoms=config.batch_atoms, shard=shard, prefetch=config.prefetch)
        self.val_loader = BatchLoader(self.data.validation, config.batch_size, self.data.val_indices,
                                      shuffle=False, dtype=self.dtype, device=self.device,
                                      batch_atoms=config.batch_atoms, shard=shard, prefetch=config.prefetch)
        # Per weighted loss term, which training structures carry its label (see _fits).
        self._labelled = [self.data.train.has_label(label) for term, (label, _, _) in TERMS.items()
                          if getattr(config.loss, term) > 0]
        self.optimizer = build_optimizer(self.model, config.optimizer)
        self.schedule = LearningRateSchedule(self.optimizer, config.schedule, config.optimizer.lr)
        decay = config.optimizer.ema_decay
        self.ema = ExponentialMovingAverage(self.model, decay) if decay else None

        # Position in the run: `epoch` epochs done, plus `batch_in_epoch` batches of the next one.
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.best, self.best_epoch, self.bad_epochs, self.elapsed_before = math.inf, 0, 0, 0.0
        # Sum of the losses of this epoch's steps, on the device; summed over the ranks, it is the
        # global value (after each _sync_loss rank 0 holds all of it).
        self.epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.epoch_batches = 0
        self.sync_every = 1 if self.device.type == "cpu" else GPU_SYNC_EVERY
        self.resumed = checkpoint is not None
        self._stop_signal: Optional[int] = None  # a SIGINT/SIGTERM waiting for the next step boundary
        self.rng = None
        self._start: Optional[float] = None  # perf_counter at the start of fit()
        self._last_val: Dict[str, str] = {}  # validation numbers shown on the progress bar
        if checkpoint is not None:
            self._load_state(checkpoint)
        # What a training step calls: the model, compiled or not (the same weights either way).
        self.step_model = CompiledTraining(self.model) if config.compile else self.model
        self.ddp = None  # the model as DistributedDataParallel sees it: training steps run through it
        if self.ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Gradients live in DDP's communication buckets (no copy into them, no second copy).
            # static_graph: every step uses the same weights, and some never get a gradient (Allegro's
            # last tensor_linear with a direct head; the energy's with energy weight 0): DDP learns which
            # in the first step, leaves their gradient None (as one process does) and skips the
            # per-step search for unused weights. Every rank's loss reaches the same outputs (see
            # _global_batch_loss), whatever labels its share carries. (DDP also broadcasts the buffers
            # before each step: 32 bytes of reference energies for the 3BPA models, equal anyway.)
            labels = [label for term, (label, _, _) in TERMS.items() if getattr(config.loss, term) > 0]
            self.ddp = DistributedDataParallel(LossOutputs(self.step_model, labels), device_ids=[self.device]
                                               if self.device.type == "cuda" else None,
                                               gradient_as_bucket_view=True, static_graph=True)

    # --- checkpoints --------------------------------------------------------------------------
    def state(self) -> Dict:
        return {
            "config": config_to_dict(self.config),
            "model_config": asdict(self.model_config),
            "statistics": self.statistics.to_dict(),
            "type_names": list(self.data.type_names),
            "training_data_hash": self.data.content_hash,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "rng": rng_state(),
            "position": {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                         "seed": self.config.seed},
            "progress": {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                         "elapsed_s": self.elapsed(), "epoch_loss_sum": float(self.epoch_loss_sum),
                         "epoch_batches": self.epoch_batches},
        }

    def _load_state(self, checkpoint: Dict) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["scheduler"])
        if self.ema is not None and checkpoint["ema"] is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        position, progress = checkpoint["position"], checkpoint["progress"]
        if position["seed"] != self.config.seed:
            raise ValueError("the checkpoint's data-order seed differs from the config's")
        self.epoch, self.step, self.batch_in_epoch = position["epoch"], position["step"], position["batch_in_epoch"]
        self.best, self.best_epoch = float(progress["best"]), int(progress["best_epoch"])
        self.bad_epochs, self.elapsed_before = int(progress["bad_epochs"]), float(progress["elapsed_s"])
        if self.ranks.main:  # the global sum; the other ranks add their shares of the steps to come
            self.epoch_loss_sum.fill_(float(progress["epoch_loss_sum"]))
        self.epoch_batches = int(progress["epoch_batches"])
        self.rng = checkpoint["rng"]

    def save(self, name: str = LAST) -> None:
        """Every rank calls this (the loss is summed over them); rank 0 writes."""
        self._sync_loss()
        if self.ranks.main:
            save_checkpoint(self.state(), os.path.join(self.run_dir, name))

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        config = self.config
        threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        reuse_freed_memory()  # ~1.2x faster steps here (see mlip.allocator)
        self._start = time.perf_counter()
        self._last_plot = time.perf_counter()
        if self.rng is not None:
            set_rng_state(self.rng)
        history = self._open_log()
        stop_reason = ""
        if config.compile and config.progress and self.ranks.main:
            from tqdm import tqdm

            tqdm.write("compile: true: the first training step compiles the model (minutes; again, once, for a "
                       "batch of one structure); Inductor caches its kernels for the next run")
        try:
            with self._stop_requests_at_step_boundaries():
                if not self.resumed:  # the untrained model's errors: the reference point of the learning curve
                    history.append(self._log_row(train_loss=None, validation=self.validate()))
                    self._append_log(history[-1])
                while not stop_reason:
                    if self.epoch >= config.stop.max_epochs:
                        stop_reason = "max_epochs"
                        break
                    if not self._train_epoch():
                        stop_reason = "max_minutes"  # stopped inside an epoch; last.pt holds the position
                        break
                    row = self._end_epoch()
                    history.append(row)
                    self._report(row)
                    self._stop_if_requested(saved=True)  # _end_epoch wrote last.pt at this position
                    if config.stop.patience is not None and self.bad_epochs >= config.stop.patience:
                        stop_reason = "patience"
                    elif self._over_budget():
                        stop_reason = "max_minutes"
                    if time.perf_counter() - self._last_plot > PLOT_INTERVAL_S:
                        self._plot(history)
        finally:
            torch.set_num_threads(threads)
        self._plot(history)
        return TrainResult(self.run_dir, self.epoch, self.step, stop_reason, config.stop.monitor, self.best, self.best_epoch,
                           self.elapsed(), history)

    @contextmanager
    def _stop_requests_at_step_boundaries(self):
        """Ctrl-C (SIGINT) or SIGTERM (a batch system's time limit) during a single-process run
        lets the current optimizer step finish, saves last.pt at that exact position and then
        raises KeyboardInterrupt: `mlip train --resume` continues as if never stopped. A second
        signal stops at once. (Distributed runs keep the default: their ranks would see the
        signal at different steps; they resume from the last checkpoint.)"""
        if self.ranks.distributed or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None:  # asked twice: do not wait for the step
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_if_requested(self, saved: bool = False) -> None:
        """At a step boundary: save the position (unless just ``saved``) and stop if a signal asked."""
        if self._stop_signal is None:
            return
        if not saved:
            self.save(LAST)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(self._stop_signal).name} at step {self.step}: "
                                f"{os.path.join(self.run_dir, LAST)} holds this position; continue with "
                                f"`mlip train --resume {self.run_dir}`")

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False if the wall-clock budget ran out inside it."""
        from tqdm import tqdm

        config = self.config
        every = config.checkpoint_every_steps
        n_batches = self.train_loader.num_batches(self.epoch)
        bar = tqdm(total=n_batches, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{config.stop.max_epochs}",
                   unit="batch", leave=False, disable=not (config.progress and self.ranks.main), dynamic_ncols=True)
        self._throughput = [0.0, 0, 0]  # seconds in steps, structures, atoms (this process, this epoch)
        try:
            global_batches = self.train_loader.global_batches(self.epoch)
            batches = self.train_loader.epoch(self.epoch, start=self.batch_in_epoch)
            for b, batch in enumerate(batches, start=self.batch_in_epoch):
                self.schedule.before_step(self.epoch + b / n_batches)
                start = time.perf_counter()
                loss = self._train_step(batch) if self._fits(global_batches[b]) else None
                self._throughput[0] += time.perf_counter() - start
                if keys.STAND_IN not in batch:
                    self._throughput[1] += int(batch[keys.NUM_ATOMS].shape[0])
                    self._throughput[2] += int(batch[keys.POSITIONS].shape[0])
                self.step += 1
                self.batch_in_epoch = b + 1
                if loss is not None:
                    self.epoch_loss_sum += loss
                    self.epoch_batches += 1
                bar.update(1)
                if self.step % self.sync_every == 0 and self.epoch_batches:
                    mean_loss = self._sync_loss() / self.epoch_batches
                    bar.set_postfix(loss=f"{mean_loss:.4g}", **self._last_val, refresh=False)
                if self.on_step is not None:
                    self.on_step(self)
                if self.batch_in_epoch < n_batches:
                    self._stop_if_requested()
                    over = self._over_budget()
                    if over or (every and self.step % every == 0):
                        self.save(LAST)
                    if over:
                        return False
        finally:
            bar.close()
        return True

    def _train_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on the global batch of which ``batch`` is this rank's share; returns
        this rank's part of the global batch's loss (detached, on the device: not read here)."""
        self.model.train()  # forces with create_graph=True: the force loss reaches the weights
        prediction = (self.ddp or self.step_model)(batch)
        sums = loss_sums(prediction, batch, self.config.loss)
        if self.ranks.distributed:
            loss = self._global_batch_loss(prediction, sums, stand_in=keys.STAND_IN in batch)
            # DistributedDataParallel averages the ranks' gradients; the global batch's gradient is their sum.
            backward = loss * self.ranks.world_size
        else:
            loss = backward = weighted_loss(sums, self.config.loss)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # DDP compares the strides of a (1, n) weight's gradient, (1, 1), with its bucket's, (n, 1):
            # the same memory layout (a dimension of size 1 has no stride), flagged as a "performance" issue.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            backward.backward()
        if self.config.optimizer.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.clip_grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def _fits(self, indices: np.ndarray) -> bool:
        """Whether the global batch of these structures carries a label of a positive loss weight
        (else there is nothing to fit: no step). From the dataset's label flags on the host, so every
        rank answers alike, without a collective or a device read."""
        return any(bool(has[indices].any()) for has in self._labelled)

    def _global_batch_loss(self, prediction, sums, stand_in: bool) -> torch.Tensor:
        """This rank's sums of squared errors divided by the global batch's counts (summed over the
        ranks: one small collective, on the device). A stand-in batch adds nothing to either. A term
        whose label this share lacks enters as a zero that still reaches the weights it reaches on
        the other ranks: DistributedDataParallel waits for a gradient of each of them."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        for term, (label, _, _) in TERMS.items():
            if term not in sums and getattr(self.config.loss, term) > 0 and label in prediction:
                sums[term] = ((prediction[label] * 0.0).sum(), zero)
        counts = torch.stack([sums[term][1].to(torch.float64) if term in sums else zero for term in TERMS])
        if stand_in:
            counts = counts * 0.0
            sums = {term: (squared * 0.0, count) for term, (squared, count) in sums.items()}
        counts = self.ranks.sum(counts)
        return weighted_loss(sums, self.config.loss, counts=dict(zip(TERMS, counts)))

    def _sync_loss(self) -> float:
        """The global sum of this epoch's step losses so far, read on the host (a device
        synchronisation, and a collective between ranks): every rank calls this at the same steps.
        Raises if it is not finite, before any checkpoint could keep the damage."""
        total = self.ranks.sum(self.epoch_loss_sum.clone())
        self.epoch_loss_sum.copy_(total if self.ranks.main else torch.zeros_like(total))
        value = float(total)
        if not math.isfinite(value):
            raise RuntimeError(f"the loss became {value} by step {self.step} (epoch {self.epoch + 1}): lower "
                               "optimizer.lr, enable optimizer.clip_grad_norm or check the labels")
        return value

    def _end_epoch(self) -> Dict:
        train_loss = self._sync_loss() / max(self.epoch_batches, 1)
        self.epoch += 1
        self.batch_in_epoch, self.epoch_batches = 0, 0
        self.epoch_loss_sum.zero_()
        validation = self.validate()
        metric = validation.get(self.config.stop.monitor, train_loss if not validation else None)
        if metric is None:
            raise ValueError(f"stop.monitor {self.config.stop.monitor!r} is not measured on this validation set "
                             f"(measured: {sorted(validation)})")
        row = self._log_row(train_loss, validation)
        seconds, structures, atoms = self._throughput
        structures, atoms = self.ranks.sum_host([structures, atoms])  # of all ranks, in rank 0's time
        if seconds > 0:  # forward + backward + optimizer step only (no data loading, no validation)
            row["train_structures_per_s"] = round(structures / seconds, 2)
            row["train_atoms_per_s"] = round(atoms / seconds, 1)
        self.schedule.after_epoch(metric)
        improved = metric < self.best
        if improved:
            self.best, self.best_epoch, self.bad_epochs = metric, self.epoch, 0
        else:
            self.bad_epochs += 1
        # The log line goes first: a kill between it and last.pt re-runs this epoch, and the resumed
        # run drops log lines past its checkpoint (see _open_log).
        self._append_log(row)
        if improved:
            self.save(BEST)
        self.save(LAST)
        return row

    def validate(self) -> Dict[str, float]:
        """Errors of the (EMA) model on the validation set, and the validation loss.

        Not under torch.no_grad: the gradient head needs autograd for its forces.
        """
        if len(self.val_loader.indices) == 0:
            return {}
        metrics = ErrorMetrics()
        self.model.eval()
        with self.ema.applied(self.model) if self.ema else nullcontext():
            for batch in self.val_loader.epoch(0):  # this rank's shares
                if keys.STAND_IN not in batch:
                    prediction = self.model(batch)
                    metrics.update({k: v.detach() for k, v in prediction.items()}, batch)
        self.model.train()
        if self.ranks.distributed:  # every rank gets the same sums, added in rank order
            parts, metrics = self.ranks.gather(metrics), ErrorMetrics()
            for part in parts:
                metrics.merge(part)
        summary = metrics.summary()
        weights = self.config.loss
        loss = 0.0
        for quantity, weight in (("energy_per_atom", weights.energy_per_atom), ("forces", weights.forces),
                                 ("stress", weights.stress), ("property", weights.property)):
            mse = metrics.mean_squared(quantity)
            if weight > 0 and mse is not None:
                l1 = quantity == "property" and weights.property_loss == "l1"
                loss += weight * (summary[f"{quantity}_mae"] if l1 else mse)
        summary["loss"] = loss
        self._last_val = _postfix(summary)
        return summary

    def _over_budget(self) -> bool:
        budget = self.config.stop.max_minutes
        # Clocks differ between ranks: rank 0 decides for all (a collective, only with a budget).
        return budget is not None and self.ranks.decide(self.elapsed() >= 60.0 * budget)

    # --- log, report, plot ----------------------------------------------------------------------
    def _log_row(self, train_loss: Optional[float], validation: Dict[str, float]) -> Dict:
        row = {"epoch": self.epoch, "step": self.step, "lr": self.schedule.current(),
               "elapsed_s": round(self.elapsed(), 3), "train_loss": train_loss}
        row.update({f"val_{k}": v for k, v in validation.items() if not k.endswith("_count")})
        return row

    def _open_log(self) -> List[Dict]:
        """Rows logged so far; a resumed run forgets rows past its checkpoint (they will be redone)."""
        path = os.path.join(self.run_dir, LOG_FILE)
        rows = []
        if not self.ranks.main:
            return rows  # rank 0 alone reads and writes the log
        if self.resumed and os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [r for r in rows if r["epoch"] <= self.epoch]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if not rows:
            return []
        return rows

    def _append_log(self, row: Dict) -> None:
        if not self.ranks.main:
            return
        with open(os.path.join(self.run_dir, LOG_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")

    def _report(self, row: Dict) -> None:
        if not (self.config.progress and self.ranks.main):
            return
        from tqdm import tqdm

        parts = [f"epoch {row['epoch']:4d}", f"loss {row['train_loss']:.4g}"]
        for key, label, unit in (("val_energy_per_atom_mae", "E/atom MAE", "meV"),
                                 ("val_forces_mae", "F MAE", "meV/Å"), ("val_forces_rmse", "F RMSE", "meV/Å"),
                                 ("val_stress_mae", "S MAE", "meV/Å³")):
            if row.get(key) is not None:
                parts.append(f"{label} {1000 * row[key]:.4g} {unit}")
        if row.get("val_property_mae") is not None:
            parts.append(f"MAE {row['val_property_mae']:.4g} {self.config.property.unit}".rstrip())
        parts.append(f"lr {row['lr']:.2e}")
        tqdm.write(" | ".join(parts))

    def _plot(self, history: List[Dict]) -> None:
        self._last_plot = time.perf_counter()
        if not self.ranks.main:
            return
        plot_learning_curve(history, os.path.join(self.run_dir, CURVE_FILE))


def _postfix(summary: Dict[str, float]) -> Dict[str, str]:
    """Short live validation numbers for the progress bar (meV units)."""
    out = {}
    if "energy_per_atom_mae" in summary:
        out["val_E"] = f"{1000 * summary['energy_per_atom_mae']:.3g}meV/at"
    if "forces_mae" in summary:
        out["val_F"] = f"{1000 * summary['forces_mae']:.3g}meV/Å"
    if "property_mae" in summary:
        out["val_MAE"] = f"{summary['property_mae']:.4g}"
    return out


def load_finetune_source(path: str) -> Dict:
    """Weights, architecture and statistics to fine-tune from: a run directory (its best.pt), a
    checkpoint, or a deployed model file (e.g. a shipped potential), whose metadata carries the
    model config and statistics and whose TorchScript module holds the (EMA) weights."""
    path = prefer_best(path)
    if not is_model_file(path):
        return load_checkpoint(path)
    from ..deploy.model_file import read_metadata

    metadata = read_metadata(path)
    if "model_config" not in metadata or "statistics" not in metadata:
        raise CheckpointError(f"{path}: this model file has no model config in its metadata (written by an older "
                              "mlip), so the model cannot be rebuilt from it to fine-tune or re-deploy")
    # DeployedPotential wraps the Potential (.potential), DeployedProperty the PropertyModel (.model).
    scripted = torch.jit.load(path, map_location="cpu")
    model = scripted.model if metadata.get("task") == "property" else scripted.potential
    return {"model_config": metadata["model_config"], "statistics": metadata["statistics"],
            "type_names": metadata["type_names"], "model": model.state_dict(), "ema": None}


def prefer_best(path: str) -> str:
    """A run directory means its best.pt (fine-tuning wants the best weights, not the latest)."""
    if os.path.isdir(path):
        best = os.path.join(path, BEST)
        return best if os.path.exists(best) else os.path.join(path, LAST)
    return path
