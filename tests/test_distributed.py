"""Data-parallel training (torchrun, gloo, CPU): N processes with a global batch take the same
steps as one process, also across interruptions and changes of the number of processes."""

import json
import math
import os
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase.calculators.singlepoint import SinglePointCalculator

from mlip.cli import main
from mlip.data import BatchLoader, GraphDataset, collate, keys, split_indices
from mlip.data.dataset import shares
from mlip.train import ConfigError, config_from_dict, load_checkpoint, load_stages, resume, train, train_stages
from mlip.train.config import LossConfig
from mlip.train.distributed import Ranks
from mlip.train.loss import loss_sums, weighted_loss
from mlip.train.trainer import Trainer
from test_train import TINY, emt_copper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # 31 structures: 25 for training = 6 global batches of 4 and one of 1 (a rank with an empty share)
    path = tmp_path_factory.mktemp("data") / "cu_emt.extxyz"
    ase.io.write(path, emt_copper(31), format="extxyz")
    return str(path)


def config_dict(data_file, run_dir, **changes):
    raw = {
        "run_dir": str(run_dir),
        "data": {"train": [data_file], "val_fraction": 0.2},
        "model": {"family": "nequip", "r_max": 4.0, "overrides": TINY["nequip"]},
        "optimizer": {"lr": 0.01, "ema_decay": 0.9},
        "loss": {"energy_per_atom": 1.0, "forces": 1.0, "stress": 10.0},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},  # the lr changes at every step
        "stop": {"max_epochs": 2},
        "batch_size": 4,
        "dtype": "float64",
        "threads": 1,
        "checkpoint_every_steps": 2,
        "progress": False,
    }
    raw.update(changes)
    return raw


def torchrun(nproc, *args, fail=None, record=None, env=None, timeout=240):
    """`torchrun --nproc-per-node NPROC -m mlip ARGS` (through tests/torchrun_entry.py)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               **(env or {}))
    env.pop("MLIP_TEST_RAISE", None)
    env.pop("MLIP_TEST_RECORD", None)
    if fail:
        env["MLIP_TEST_RAISE"] = fail
    if record:
        env["MLIP_TEST_RECORD"] = str(record)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(HERE, "torchrun_entry.py"), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(run_dir):
    state = load_checkpoint(run_dir)
    weights = {f"model.{k}": v for k, v in state["model"].items()}
    weights.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    return state, torch.cat([w.reshape(-1) for _, w in sorted(weights.items())])


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(run_dir, reference_dir):
    """Same position, weights (model and EMA) to 1e-10 relative, same logged losses and validation errors."""
    state, weights = final_weights(run_dir)
    reference_state, reference = final_weights(reference_dir)
    assert state["position"] == reference_state["position"]
    relative = float((weights - reference).norm() / reference.norm())
    assert relative < 1e-10, relative
    rows, reference_rows = log_rows(run_dir), log_rows(reference_dir)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference_rows] == [0, 1, 2]
    for row, want in zip(rows, reference_rows):
        for key in ("train_loss", "val_loss", "val_energy_per_atom_mae", "val_forces_rmse", "val_stress_mae", "lr"):
            if want[key] is not None:
                assert row[key] == pytest.approx(want[key], rel=1e-10, abs=0), (row["epoch"], key)
    return relative


@pytest.fixture(scope="module")
def reference(data_file, tmp_path_factory):
    """One process, global batch 4, straight through 2 epochs (14 steps)."""
    return train(config_from_dict(config_dict(data_file, tmp_path_factory.mktemp("runs") / "one"))).run_dir


def assert_each_rank_took_its_share(record, run_dir, first_step):
    """Each of 2 ranks trained on its share only (recorded by tests/torchrun_entry.py): together,
    once, the global batches one process takes, from ``first_step`` to the end of epoch 2."""
    seen = [json.loads((record / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    train_indices, _ = split_indices(31, 0.2, seed=0)
    loader = BatchLoader(GraphDataset.from_hdf5(os.path.join(run_dir, "data", "train.h5")), 4, train_indices, seed=0)
    expected = [batch.tolist() for epoch in (0, 1) for batch in loader.global_batches(epoch)][first_step:]
    assert len(seen[0]) == len(seen[1]) == len(expected) == 14 - first_step
    for first, second, batch in zip(*seen, expected):
        assert first and first + (second or []) == batch
        assert second or len(batch) == 1  # a rank without a share only for the 1-structure batch


def write_config(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow  # 36-70 s here: two starts of two processes; test_resume_with_more_processes covers most of it
def test_two_processes_take_the_steps_of_one(data_file, reference, tmp_path):
    """2 ranks x 2 structures == 1 rank x 4 (weights after 14 Adam steps, logged losses and
    validation errors); then interrupted mid-epoch with 2 ranks, resumed with 1."""
    run = tmp_path / "two"
    config = write_config(tmp_path, config_dict(data_file, run))
    done = torchrun(2, "train", config, record=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"2 ranks vs 1: weights differ by {assert_same_run(run, reference):.1e} (relative)")
    assert done.stdout.count("stopped (max_epochs)") == 1  # rank 0 reports
    assert_each_rank_took_its_share(tmp_path, run, first_step=0)

    interrupted = tmp_path / "two-interrupted"  # 7 global batches per epoch: step 9 is in epoch 2
    killed = torchrun(2, "train", config, "--run-dir", interrupted, fail="*:9:killed")
    assert killed.returncode != 0 and "killed" in killed.stderr
    assert load_checkpoint(interrupted)["position"] == {"epoch": 1, "step": 8, "batch_in_epoch": 1, "seed": 0}
    resume(str(interrupted))
    assert_same_run(interrupted, reference)


@pytest.mark.slow  # 18-38 s here (quiet or loaded machine)
def test_mixed_labels_and_weights_without_gradient(tmp_path):
    """Forces on every other structure only, energy weight 0, global batch 2 on 2 ranks: a rank
    whose structure has no force label, and global batches with nothing to fit (skipped on every
    rank alike), still give the steps of one process. Allegro with a direct head has a weight no
    output depends on (its last layer's tensor features): one process leaves it alone, and so must
    two (DDP would otherwise wait for its gradient, or give it a zero one and Adam state)."""
    structures = emt_copper(31)
    for atoms in structures[1::2]:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    data_file = str(tmp_path / "mixed.extxyz")
    ase.io.write(data_file, structures, format="extxyz")
    raw = config_dict(data_file, tmp_path / "one", stop={"max_epochs": 1}, batch_size=2,
                      loss={"energy_per_atom": 0.0, "forces": 1.0, "stress": 0.0},
                      model={"family": "allegro", "head": "direct", "r_max": 4.0, "overrides": TINY["allegro"]})
    one = train(config_from_dict(raw)).run_dir
    done = torchrun(2, "train", write_config(tmp_path, {**raw, "run_dir": str(tmp_path / "two")}))
    assert done.returncode == 0, done.stderr[-3000:]
    (state, weights), (reference_state, reference) = final_weights(tmp_path / "two"), final_weights(one)
    assert float((weights - reference).norm() / reference.norm()) < 1e-10
    adam = [s["step"] for s in state["optimizer"]["state"].values()]
    reference_adam = [s["step"] for s in reference_state["optimizer"]["state"].values()]
    assert adam == reference_adam and 0 < int(adam[0]) < state["position"]["step"]  # some batches skipped
    # Adam keeps no state for a weight without gradient
    assert len(adam) < len(state["optimizer"]["param_groups"][0]["params"])
    assert log_rows(tmp_path / "two")[-1]["train_loss"] == pytest.approx(log_rows(one)[-1]["train_loss"], rel=1e-10)


def test_resume_with_more_processes(data_file, reference, tmp_path):
    """Interrupted mid-epoch with 1 rank, resumed with 2 (any number resumes exactly: the global
    batches and the position in the run do not depend on it)."""
    run = tmp_path / "one-interrupted"

    class Killed(Exception):
        pass

    def kill(trainer):
        if trainer.step == 9:
            raise Killed()

    with pytest.raises(Killed):
        train(config_from_dict(config_dict(data_file, run)), on_step=kill)
    assert load_checkpoint(run)["position"]["step"] == 8
    resumed = torchrun(2, "train", "--resume", run, record=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, reference)
    assert_each_rank_took_its_share(tmp_path, run, first_step=8)


@pytest.mark.slow  # ~20-40 s here: one start of two processes, two stages
def test_a_staged_run_on_two_processes_is_the_one_process_run(data_file, tmp_path):
    """A config with a second stage (energy weight raised, another seed) trained by 2 ranks ends with the
    weights one process reaches (1e-10 relative): one process trains run after run in one process group
    (set up again per run, the second group's first barrier hung)."""
    raw = config_dict(data_file, tmp_path / "two", stages=[{"loss": {"energy_per_atom": 5.0}, "stop": {"max_epochs": 1},
                                                           "seed": 3}])
    done = torchrun(2, "train", write_config(tmp_path, raw), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage 2 of 2: stopped (max_epochs)") == 1
    one = load_stages(write_config(tmp_path, {**raw, "run_dir": str(tmp_path / "one")}))
    train_stages(one)
    for run in ("stage_1", ""):
        (_, weights), (_, reference) = final_weights(tmp_path / "two" / run), final_weights(tmp_path / "one" / run)
        assert float((weights - reference).norm() / reference.norm()) < 1e-10


def test_failing_rank_ends_the_job_with_its_message(data_file, tmp_path):
    config = write_config(tmp_path, config_dict(data_file, tmp_path / "run"))
    start = time.perf_counter()
    failed = torchrun(2, "train", config, fail="1:2:injected failure in rank one", timeout=120)
    seconds = time.perf_counter() - start
    assert failed.returncode != 0
    assert "mlip train (rank 1 of 2): error: injected failure in rank one" in failed.stderr
    assert "rank      : 1" in failed.stderr  # torchrun's summary names the root cause
    print(f"the job ended {seconds:.1f} s after its start (including start-up)")
    assert seconds < 90


@pytest.mark.slow  # 17-30 s here
def test_hanging_rank_ends_the_job_after_the_timeout(data_file, tmp_path):
    """A rank that neither dies nor answers: the others' next collective gives up after
    MLIP_DIST_TIMEOUT_S, and torchrun ends the hanging one."""
    config = write_config(tmp_path, config_dict(data_file, tmp_path / "run"))
    start = time.perf_counter()
    hung = torchrun(2, "train", config, fail="1:2:hang", env={"MLIP_DIST_TIMEOUT_S": "5"}, timeout=120)
    assert hung.returncode != 0 and "mlip train (rank 0 of 2): error:" in hung.stderr
    assert "Timed out" in hung.stderr
    assert time.perf_counter() - start < 100


def test_batch_smaller_than_the_processes_is_refused(data_file, tmp_path, capsys):
    config = config_from_dict(config_dict(data_file, tmp_path / "run", batch_size=1))
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the 2 processes"):
        Trainer(config, ranks=Ranks(torch.device("cpu"), rank=0, world_size=2))
    with pytest.raises(ConfigError, match="batch_atoms"):
        config_from_dict(config_dict(data_file, tmp_path / "run", batch_atoms=0))
    # `mlip train --nproc` refuses it before starting any process
    path = write_config(tmp_path, config_dict(data_file, tmp_path / "run", batch_size=1))
    assert main(["train", str(path), "--nproc", "2"]) == 2
    assert "batch_size 1 is smaller than --nproc 2" in capsys.readouterr().err


# --- the data order: global batches and shares ----------------------------------------------------

def test_shares_balance_atoms_and_cover_the_batch():
    assert shares(np.array([10, 10, 10, 10]), 2).tolist() == [0, 2, 4]
    assert shares(np.array([1000, 10, 10, 10]), 2).tolist() == [0, 1, 4]
    assert shares(np.array([10, 10, 10, 1000]), 3).tolist() == [0, 2, 3, 4]  # every rank gets one
    assert shares(np.array([5, 5]), 3).tolist() == [0, 1, 2, 2]  # the third rank's share is empty
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, parts = rng.integers(1, 12), rng.integers(1, 5)
        cuts = shares(rng.integers(1, 100, size=n), parts)
        assert cuts[0] == 0 and cuts[-1] == n and np.all(np.diff(cuts) >= 0)
        assert np.all(np.diff(cuts) >= 1) or n < parts


@pytest.fixture(scope="module")
def dataset(data_file):
    return GraphDataset.from_atoms(ase.io.read(data_file, ":"), r_max=4.0)


@pytest.mark.parametrize("batch_atoms", [None, 20])
def test_ranks_share_each_global_batch(dataset, batch_atoms):
    """The union of the ranks' batches is the one-process batch, in every epoch, with and without
    a cap on atoms; a rank without a share gets a flagged stand-in. Prefetching changes nothing."""
    def batches(rank, world_size, prefetch=False, start=0):
        loader = BatchLoader(dataset, 5, seed=3, batch_atoms=batch_atoms, shard=(rank, world_size), prefetch=prefetch)
        return [(b[keys.STRUCTURE_INDEX].tolist(), keys.STAND_IN in b) for b in loader.epoch(2, start=start)]

    whole = batches(0, 1)
    assert sorted(sum((b for b, _ in whole), [])) == list(range(len(dataset)))
    assert batches(0, 1, prefetch=True) == whole and batches(0, 1, start=2) == whole[2:]
    if batch_atoms:  # a batch ends before 5 structures if the atoms would exceed 20 (4- and 8-atom cells)
        sizes = [int(dataset.num_atoms[b].sum()) for b, _ in whole]
        assert max(sizes) <= 20 and len(whole) > math.ceil(len(dataset) / 5)
    for world_size in (2, 3):
        per_rank = [batches(rank, world_size) for rank in range(world_size)]
        for k, (indices, _) in enumerate(whole):
            shared = [per_rank[r][k] for r in range(world_size)]
            assert sum((b for b, stand_in in shared if not stand_in), []) == indices
            for b, stand_in in shared:
                assert (b == indices[:1]) if stand_in else b


def test_loss_is_the_mean_squared_error_bit_for_bit(dataset):
    """Sums divided by counts give exactly the per-term means mlip used before (single-process
    runs keep their numbers), in float32 and float64, with stress labels on some structures only."""
    graphs = dataset.get_batch(range(6))
    for g in graphs[::2]:
        g.pop(keys.STRESS, None)
    weights = LossConfig(energy_per_atom=1.0, forces=2.0, stress=10.0)
    for dtype in (torch.float32, torch.float64):
        batch = collate(graphs, dtype)
        rng = torch.Generator().manual_seed(0)
        prediction = {k: batch[k] + 0.1 * torch.randn(batch[k].shape, generator=rng, dtype=batch[k].dtype)
                      for k in (keys.ENERGY, keys.FORCES, keys.STRESS)}
        has = batch[keys.HAS_STRESS]
        energy = ((prediction[keys.ENERGY] - batch[keys.ENERGY]) / batch[keys.NUM_ATOMS]).square().mean()
        forces = (prediction[keys.FORCES] - batch[keys.FORCES]).square().mean().to(torch.float64)
        stress = (prediction[keys.STRESS][has] - batch[keys.STRESS][has]).square().mean().to(torch.float64)
        before = torch.zeros((), dtype=torch.float64) + energy + 2.0 * forces + 10.0 * stress
        now = weighted_loss(loss_sums(prediction, batch, weights), weights)
        assert now.item() == pytest.approx(before.item(), rel=1e-15 if dtype == torch.float64 else 1e-6)
        fully_labelled = {k: v for k, v in batch.items()}
        fully_labelled[keys.HAS_STRESS] = torch.ones_like(has)
        stress_all = (prediction[keys.STRESS] - batch[keys.STRESS]).square().mean().to(torch.float64)
        before_all = torch.zeros((), dtype=torch.float64) + energy + 2.0 * forces + 10.0 * stress_all
        assert weighted_loss(loss_sums(prediction, fully_labelled, weights), weights).item() == before_all.item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (benchmarks/gpu_check.sh runs this on one)")
def test_training_steps_do_not_wait_for_the_gpu(data_file, tmp_path):
    """Forward, loss, backward, clipping, Adam and EMA of a step on a GPU without a host
    synchronisation: torch's sync debug mode turns any into an error. (The loss is read every
    GPU_SYNC_EVERY steps, outside these.) Not run where this was written: no GPU."""
    from test_train import tiny_config

    config = tiny_config(data_file, tmp_path / "run", "nequip", device="cuda", optimizer={"clip_grad_norm": 10.0})
    trainer = Trainer(config)
    batches = list(trainer.train_loader.epoch(0))[:4]  # collated (copied to the GPU) before the check
    trainer._train_step(batches[0])  # first calls: cuBLAS handles, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            trainer.epoch_loss_sum += trainer._train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(trainer.epoch_loss_sum))


@pytest.mark.slow  # 2-4 min here: each process compiles its step for shares of 2 and of 1 structure
def test_compiled_steps_on_two_processes(data_file, reference, tmp_path):
    """compile: true (torch.compile under DistributedDataParallel), 2 ranks x 2 structures == the
    eager run of 1 rank x 4: the compiled backward feeds DDP's gradient all-reduce."""
    run = tmp_path / "two-compiled"
    done = torchrun(2, "train", write_config(tmp_path, config_dict(data_file, run, compile=True)), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"2 compiled ranks vs 1 eager: weights differ by {assert_same_run(run, reference):.1e} (relative)")
