"""Training on imperfect data and configs: partial labels, a run directory used twice, bad values.

Mixed datasets (single points without forces next to MD frames with them, molecules without a
stress) are normal: every label present must reach the loss and the metrics, whatever the other
structures of its batch carry; an absent label must never count as a zero.
"""

import os
import re
import signal
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlip.data import GraphDataset, LabelKeys, TypeMapper, atoms_to_graph, collate, convert_to_hdf5, keys
from mlip.train import ConfigError, config_from_dict, load_checkpoint, resume, train
from mlip.train.config import LossConfig
from mlip.train.loss import loss_terms
from mlip.train.metrics import ErrorMetrics

from physics import R_MAX, TYPE_NAMES, cluster, tiny_model, triclinic_alloy

LABELS = ("energy", "forces", "stress")


def labelled(atoms, drop=()):
    """``atoms`` with EMT energy, forces and (periodic cells) stress, minus the labels in ``drop``."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in results.items() if k not in drop})
    return atoms


def mixed_structures():
    """Four structures whose labels differ: every label is missing from some and present in others."""
    return [
        labelled(triclinic_alloy(seed=0), drop=("forces",)),
        labelled(cluster(seed=1), drop=("energy",)),  # no stress either (not periodic)
        labelled(triclinic_alloy(seed=2, repeat=(1, 2, 1))),
        labelled(triclinic_alloy(seed=3, repeat=(2, 1, 1)), drop=("energy", "stress")),
    ]


def graphs_of(structures):
    return [atoms_to_graph(a, R_MAX, TypeMapper(TYPE_NAMES), LabelKeys(), require=()) for a in structures]


ALL_WEIGHTS = LossConfig(energy_per_atom=1.0, forces=1.0, stress=10.0)


# --- 1. label masks -------------------------------------------------------------------------------


def test_collate_keeps_every_label_with_a_mask():
    graphs = graphs_of(mixed_structures())
    batch = collate(graphs)
    assert batch[keys.HAS_ENERGY].tolist() == [True, False, True, False]
    atoms_per = [len(g[keys.ATOM_TYPES]) for g in graphs]
    expected_atoms = np.repeat([False, True, True, True], atoms_per)
    assert batch[keys.HAS_FORCES].tolist() == expected_atoms.tolist()
    assert batch[keys.HAS_STRESS].tolist() == [True, False, True, False]
    assert batch[keys.FORCES].shape == (sum(atoms_per), 3)
    start = atoms_per[0]
    np.testing.assert_array_equal(batch[keys.FORCES][start:start + atoms_per[1]].numpy(), graphs[1][keys.FORCES])


@pytest.mark.parametrize("family", ["allegro", "nequip"])
def test_partial_labels_give_the_loss_and_gradients_of_the_labelled_structures(family):
    """Half the batch labelled == the labelled half alone (float64): loss and every gradient."""
    model = tiny_model(family).train()
    full = [labelled(triclinic_alloy(seed=0)), labelled(triclinic_alloy(seed=2, repeat=(1, 2, 1)))]
    bare = [labelled(cluster(seed=1), drop=LABELS), labelled(triclinic_alloy(seed=3), drop=LABELS)]

    def loss_and_grads(structures):
        batch = collate(graphs_of(structures))
        loss, parts = loss_terms(model(batch), batch, ALL_WEIGHTS)
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
        return loss, parts, grads

    alone = loss_and_grads(full)
    mixed = loss_and_grads([full[0], bare[0], full[1], bare[1]])
    assert set(alone[1]) == {"energy_per_atom", "forces", "stress"}
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-12, atol=0)
    assert mixed[1] == pytest.approx(alone[1], rel=1e-12)
    for g_mixed, g_alone in zip(mixed[2], alone[2]):
        if g_alone is None:
            assert g_mixed is None or not g_mixed.any()
        else:
            torch.testing.assert_close(g_mixed, g_alone, rtol=1e-10, atol=1e-14)


def test_loss_sums_count_labelled_values_only():
    """(sum of squared errors, count) per term: each label where it exists, in any batch."""
    from mlip.train.loss import loss_sums

    model = tiny_model("allegro").train()
    structures = mixed_structures()
    batch = collate(graphs_of(structures))
    sums = loss_sums(model(batch), batch, ALL_WEIGHTS)
    num_atoms = [len(a) for a in structures]
    assert int(sums["energy_per_atom"][1]) == 2
    assert int(sums["forces"][1]) == 3 * sum(num_atoms[1:])
    assert int(sums["stress"][1]) == 9 * 2
    # Each sum is the sum of the structures' own sums (what a distributed run adds over ranks).
    for term in sums:
        total = 0.0
        for atoms in structures:
            one = collate(graphs_of([atoms]))
            part = loss_sums(model(one), one, ALL_WEIGHTS).get(term)
            total += float(part[0].detach()) if part is not None else 0.0
        assert float(sums[term][0].detach()) == pytest.approx(total, rel=1e-10), term


def test_fully_labelled_loss_is_unchanged_bit_for_bit():
    """The shipped potentials' training must not change: a fully labelled float32 batch gives the
    loss of plain means, exactly."""
    model = tiny_model("nequip", dtype=torch.float32).train()
    structures = [labelled(triclinic_alloy(seed=s)) for s in range(3)]
    batch = collate(graphs_of(structures), torch.float32)
    prediction = model(batch)
    loss, _ = loss_terms(prediction, batch, ALL_WEIGHTS)
    energy = ((prediction[keys.ENERGY] - batch[keys.ENERGY]) / batch[keys.NUM_ATOMS].double()).square().mean()
    forces = (prediction[keys.FORCES] - batch[keys.FORCES]).square().mean().double()
    stress = (prediction[keys.STRESS] - batch[keys.STRESS]).square().mean().double()
    expected = torch.zeros((), dtype=torch.float64) + energy + forces + 10.0 * stress
    assert float(loss) == float(expected)


def test_metrics_count_exactly_the_labelled_values():
    model = tiny_model("allegro")
    structures = mixed_structures()
    batch = collate(graphs_of(structures))
    prediction = {k: v.detach() for k, v in model(batch).items()}
    metrics = ErrorMetrics()
    metrics.update(prediction, batch, groups=["a", "b", "a", "b"])
    summary = metrics.summary()
    num_atoms = [len(a) for a in structures]
    assert summary["energy_count"] == 2
    assert summary["forces_count"] == 3 * sum(num_atoms[1:])
    assert summary["stress_count"] == 18
    assert metrics.summary("b")["forces_count"] == 3 * (num_atoms[1] + num_atoms[3])
    errors = prediction[keys.ENERGY][[0, 2]] - batch[keys.ENERGY][[0, 2]]
    assert summary["energy_mae"] == pytest.approx(float(errors.abs().mean()), rel=1e-12)


def test_hdf5_keeps_absent_labels_absent(tmp_path):
    """A frame without forces must not come back with zero forces (that would train F = 0)."""
    structures = mixed_structures()
    path = tmp_path / "mixed.h5"
    convert_to_hdf5(structures, path, R_MAX, type_names=TYPE_NAMES, require=(), progress=False)
    stored = GraphDataset.from_hdf5(path)
    assert stored.has_label(keys.FORCES).tolist() == [False, True, True, True]
    assert stored.has_label(keys.ENERGY).tolist() == [True, False, True, False]
    graphs = stored.get_batch([0, 1, 2, 3])
    assert keys.FORCES not in graphs[0] and keys.ENERGY not in graphs[1] and keys.STRESS not in graphs[3]
    from_file, in_memory = collate(graphs), collate(graphs_of(structures))
    for key in (keys.HAS_ENERGY, keys.HAS_FORCES, keys.HAS_STRESS):
        assert from_file[key].tolist() == in_memory[key].tolist(), key


def copper(n, seed=0, drop_forces_every=2):
    """Rattled Cu cells with EMT labels; every ``drop_forces_every``-th has no forces."""
    rng = np.random.default_rng(seed)
    structures = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 * rng.uniform(0.97, 1.03), cubic=True)
        atoms.positions += rng.normal(scale=0.12, size=atoms.positions.shape)
        structures.append(labelled(atoms, drop=("forces",) if drop_forces_every and k % drop_forces_every == 0
                                   else ()))
    return structures


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mixed.extxyz"
    ase.io.write(path, copper(12), format="extxyz")
    return str(path)


def config(data_file, run_dir, **changes):
    raw = {
        "run_dir": str(run_dir),
        "data": {"train": [data_file], "val_fraction": 0.25},
        "model": {"family": "allegro", "r_max": 4.0,
                  "overrides": {"num_scalar": 8, "num_tensor": 8, "mlp_hidden": 16, "readout_hidden": 8}},
        "optimizer": {"lr": 0.01, "ema_decay": None},
        "loss": {"energy_per_atom": 1.0, "forces": 1.0, "stress": 0.0},
        "stop": {"max_epochs": 2},
        "batch_size": 16,  # one batch per epoch: half its structures carry forces
        "threads": 1,
        "progress": False,
    }
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return config_from_dict(raw)


def test_force_weight_acts_on_a_mixed_dataset(mixed_file, tmp_path):
    results = {}
    for weight in (1.0, 5.0):
        run = train(config(mixed_file, tmp_path / f"w{weight}", loss={"forces": weight}))
        results[weight] = load_checkpoint(os.path.join(run.run_dir, "last.pt"))["model"]
        history = run.history
        assert history[-1]["val_forces_mae"] is not None
    differences = [float((results[1.0][k] - results[5.0][k]).abs().max()) for k in results[1.0]]
    assert max(differences) > 1e-6, "the force weight changed nothing: force labels were dropped"


def test_evaluate_counts_the_forces_of_labelled_frames_only(tmp_path):
    from mlip.deploy import deploy_model
    from mlip.train.evaluate import evaluate

    model = tiny_model("allegro")
    deploy_model(model, tmp_path / "model.pt")
    structures = [labelled(s, drop=("forces",) if k % 2 else ()) for k, s in
                  enumerate([triclinic_alloy(seed=0), triclinic_alloy(seed=1), cluster(seed=2), cluster(seed=3)])]
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, structures, format="extxyz")
    report = evaluate(str(tmp_path / "model.pt"), [str(path)])
    result = report["files"][str(path)]["all"]
    assert result["energy_count"] == 4
    assert result["forces_count"] == 3 * (len(structures[0]) + len(structures[2]))


# --- 2. one writer per run directory ----------------------------------------------------------------


def start_training_process(*argv):
    """`mlip ARGV` in a process of its own (this checkout's mlip first on the path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = "import sys; from mlip.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_lock(run_dir, pid, timeout=120.0):
    from mlip.train.lock import LOCK_FILE

    path = os.path.join(run_dir, LOCK_FILE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().strip() == str(pid):
            return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} did not take the lock of {run_dir}")


def test_a_run_directory_has_one_writer_and_a_killed_run_resumes(mixed_file, tmp_path, capsys):
    from mlip.cli import main
    from mlip.train.lock import RunDirectoryInUse

    run_dir = str(tmp_path / "run")
    first = train(config(mixed_file, run_dir, stop={"max_epochs": 1}))
    assert first.epochs == 1
    holder = start_training_process("train", "--resume", run_dir, "--max-epochs", "100000", "--no-progress")
    try:
        wait_for_lock(run_dir, holder.pid)
        with pytest.raises(RunDirectoryInUse, match=rf"{run_dir}.*in use.*process {holder.pid}"):
            resume(run_dir, max_epochs=2)
        with pytest.raises(RunDirectoryInUse, match=rf"{run_dir}.*process {holder.pid}"):
            train(config(mixed_file, run_dir))
        assert main(["train", "--resume", run_dir]) == 2
        message = capsys.readouterr().err.strip()
        assert message.count("\n") == 0 and run_dir in message and str(holder.pid) in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the kernel must free the lock
        holder.wait()
    resumed = resume(run_dir, max_epochs=load_checkpoint(os.path.join(run_dir, "last.pt"))["position"]["epoch"] + 1)
    assert resumed.stop_reason == "max_epochs"


# --- 3. config values -------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [  # (changes to a valid config, the dotted key the message must name)
    ({"loss": {"forces": -1.0}}, "loss.forces"),
    ({"loss": {"energy_per_atom": -0.5}}, "loss.energy_per_atom"),
    ({"loss": {"stress": -10.0}}, "loss.stress"),
    ({"loss": {"forces": NAN}}, "loss.forces"),
    ({"loss": {"forces": INF}}, "loss.forces"),
    ({"loss": {"energy_per_atom": 0.0, "forces": 0.0, "stress": 0.0}}, "loss"),
    ({"optimizer": {"lr": NAN}}, "optimizer.lr"),
    ({"optimizer": {"lr": INF}}, "optimizer.lr"),
    ({"optimizer": {"lr": -0.01}}, "optimizer.lr"),
    ({"optimizer": {"lr": 0.0}}, "optimizer.lr"),
    ({"optimizer": {"weight_decay": -1e-3}}, "optimizer.weight_decay"),
    ({"optimizer": {"ema_decay": 0.0}}, "optimizer.ema_decay"),
    ({"optimizer": {"ema_decay": 1.0}}, "optimizer.ema_decay"),
    ({"optimizer": {"ema_decay": 1.5}}, "optimizer.ema_decay"),
    ({"optimizer": {"clip_grad_norm": 0.0}}, "optimizer.clip_grad_norm"),
    ({"optimizer": {"clip_grad_norm": -1.0}}, "optimizer.clip_grad_norm"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
    ({"data": {"val_fraction": NAN}}, "data.val_fraction"),
    ({"data": {"split_seed": -1}}, "data.split_seed"),
    ({"data": {"isolated_atom_energies": {"Cu": NAN}}}, "data.isolated_atom_energies.Cu"),
    ({"data": {"mean_binding_energy": True}}, "data.mean_binding_energy"),
    ({"schedule": {"min_lr": -1e-6}}, "schedule.min_lr"),
    ({"schedule": {"min_lr": 0.1}}, "schedule.min_lr"),  # above optimizer.lr
    ({"schedule": {"factor": 0.0}}, "schedule.factor"),
    ({"schedule": {"factor": 1.0}}, "schedule.factor"),
    ({"schedule": {"factor": 2.0}}, "schedule.factor"),
    ({"schedule": {"patience": -1}}, "schedule.patience"),
    ({"schedule": {"warmup_epochs": -1.0}}, "schedule.warmup_epochs"),
    ({"schedule": {"cosine_epochs": 0}}, "schedule.cosine_epochs"),
    ({"stop": {"max_minutes": 0.0}}, "stop.max_minutes"),
    ({"stop": {"max_minutes": -5.0}}, "stop.max_minutes"),
    ({"stop": {"max_minutes": NAN}}, "stop.max_minutes"),
    ({"stop": {"max_epochs": -1}}, "stop.max_epochs"),
    ({"stop": {"patience": 0}}, "stop.patience"),
    ({"batch_size": 0}, "batch_size"),
    ({"threads": 0}, "threads"),
    ({"threads": -2}, "threads"),
    ({"seed": -1}, "seed"),
    ({"checkpoint_every_steps": -1}, "checkpoint_every_steps"),
    ({"device": "gpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"model": {"r_max": -1.0}}, "model.r_max"),
    ({"model": {"r_max": NAN}}, "model.r_max"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"model": {"overrides": {"num_layers": "2"}}}, "model.overrides.num_layers"),
    ({"model": {"overrides": {"num_layers": 2.5}}}, "model.overrides.num_layers"),
    ({"model": {"overrides": {"num_layers": True}}}, "model.overrides.num_layers"),
    ({"model": {"overrides": {"num_layers": 0}}}, "model.overrides.num_layers"),
    ({"model": {"overrides": {"l_max": -1}}}, "model.overrides.l_max"),
    ({"model": {"overrides": {"num_scalar": None}}}, "model.overrides.num_scalar"),
    ({"model": {"overrides": {"r_max": "5"}}}, "model.overrides.r_max"),
    ({"model": {"overrides": {"nope": 1}}}, "model.overrides"),
    ({"model": {"family": "nequip", "overrides": {"parity": 1}}}, "model.overrides.parity"),
    ({"model": {"head": "direct"}, "stop": {"monitor": "stress_mae"}}, "stop.monitor"),  # no stress predicted
    ({"data": {"type_names": ["Cu", "Xx"]}}, "data.type_names"),
    ({"data": {"type_names": ["Cu", "Cu"]}}, "data.type_names"),
]


@pytest.mark.parametrize("changes, key", BAD_VALUES, ids=[k + f"-{i}" for i, (_, k) in enumerate(BAD_VALUES)])
def test_bad_config_values_name_their_key(changes, key, mixed_file, tmp_path):
    if "model" in changes:  # replace the model section (the overrides of the valid config would mix in)
        changes = {**changes, "model": {"family": "allegro", "r_max": 4.0, **changes["model"]}}
    with pytest.raises(ConfigError, match=r"(^|: )" + re.escape(key) + "(:| )") as error:
        config(mixed_file, tmp_path / "run", **changes)
    assert "\n" not in str(error.value)


def test_valid_edge_values_are_accepted(mixed_file, tmp_path):
    config(mixed_file, tmp_path / "run", loss={"energy_per_atom": 0.0, "stress": 0.0},
           optimizer={"ema_decay": None, "clip_grad_norm": None, "weight_decay": 0.0},
           data={"val_fraction": 0.0}, schedule={"patience": 0, "min_lr": 0.0}, threads=None, device="cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_a_device_this_machine_lacks_is_named(device, mixed_file, tmp_path):
    if torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ConfigError, match=rf"^device: '{device}' is not available.*available: \['cpu'"):
        train(config(mixed_file, tmp_path / "run", device=device))
    assert not os.path.exists(tmp_path / "run" / "data"), "refused before any work"


def with_bad_label(field):
    atoms = labelled(bulk("Cu", "fcc", a=3.6, cubic=True))
    results = dict(atoms.calc.results)
    if field == "energy":
        results["energy"] = np.inf
    elif field == "forces":
        results["forces"] = results["forces"].copy()
        results["forces"][1, 2] = np.nan
    else:
        results["stress"] = np.full(6, np.nan)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


@pytest.mark.parametrize("field", LABELS)
def test_nan_labels_are_refused_naming_file_and_frame(field, tmp_path):
    good = [labelled(bulk("Cu", "fcc", a=3.6 + 0.01 * k, cubic=True)) for k in range(3)]
    ase.io.write(tmp_path / "a.extxyz", good[:2], format="extxyz")
    ase.io.write(tmp_path / "b.extxyz", [good[2], good[2], with_bad_label(field)], format="extxyz")
    files = [str(tmp_path / "a.extxyz"), str(tmp_path / "b.extxyz")]
    with pytest.raises(ValueError, match=rf"b\.extxyz, frame 2: .*{field} label .*NaN or infinite"):
        convert_to_hdf5(files, tmp_path / "out.h5", R_MAX, progress=False)
    with pytest.raises(ValueError, match=rf"b\.extxyz, frame 2: .*{field} label"):  # frames count in the file
        convert_to_hdf5([str(tmp_path / "b.extxyz@1:")], tmp_path / "out.h5", R_MAX, progress=False)
    assert not os.path.exists(tmp_path / "out.h5")


# --- 4. data that would train on nothing, silently --------------------------------------------------


def write(path, structures):
    ase.io.write(path, structures, format="extxyz")
    return str(path)


def bad_data_cases(tmp_path):
    """(config changes, exception type, regex the message must match): each would once have trained
    on less than asked (or crashed with a traceback)."""
    no_forces = write(tmp_path / "no_forces.extxyz", copper(6, drop_forces_every=1))
    mixed = write(tmp_path / "mixed.extxyz", copper(8))
    molecules = [labelled(cluster(seed=s)) for s in range(4)]
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    return {
        "empty file": ({"data": {"train": [str(empty)]}}, ValueError, r"empty\.extxyz"),
        "selection past the end": ({"data": {"train": [mixed + "@100:"]}}, ValueError,
                                   r"mixed\.extxyz@100:.*no structures"),
        "data.keys label in no frame": ({"data": {"train": [mixed], "keys": {"forces": "REF_forces"}}}, ConfigError,
                                        r"^loss\.forces: .*no training structure .*'REF_forces' "
                                        r"\(data\.keys\.forces\)"),
        "force weight, no forces": ({"data": {"train": [no_forces]}}, ConfigError,
                                    r"^loss\.forces: .*no training structure carries forces.*loss\.forces: 0"),
        "stress weight, no stress": ({"data": {"train": [write(tmp_path / "mol.extxyz", molecules)]},
                                      "loss": {"stress": 1.0}}, ConfigError,
                                     r"^loss\.stress: .*no training structure carries stress"),
        "monitor without labels": ({"data": {"train": [mixed], "validation": [no_forces]},
                                    "stop": {"monitor": "forces_mae"}}, ConfigError,
                                   r"^stop\.monitor: 'forces_mae' needs forces .*validation"),
        "validation loss of nothing": ({"data": {"train": [mixed], "validation": [no_forces]},
                                        "loss": {"energy_per_atom": 0.0}}, ConfigError,
                                       r"^stop\.monitor: 'loss' .*validation .*forces"),
        "element without a type": ({"data": {"train": [write(tmp_path / "mol2.extxyz", molecules)],
                                             "type_names": ["Cu"]}}, ValueError,
                                   r"mol2\.extxyz, frame 0: structure 0 .*\['Ni'\] not known"),
    }


BAD_DATA = ["empty file", "selection past the end", "data.keys label in no frame", "force weight, no forces",
            "stress weight, no stress", "monitor without labels", "validation loss of nothing",
            "element without a type"]


@pytest.mark.parametrize("case", BAD_DATA)
def test_data_that_would_train_on_nothing_is_refused(case, tmp_path):
    changes, error, message = bad_data_cases(tmp_path)[case]
    with pytest.raises(error, match=message):
        train(config(changes["data"]["train"][0], tmp_path / "run", **changes))


def test_a_batch_without_any_weighted_label_is_skipped(tmp_path):
    """Energy weight 0, one structure per batch, half without forces: the force-less batches have
    nothing to fit (they once crashed the run in backward()) and leave the training loss alone."""
    data = write(tmp_path / "m.extxyz", copper(8))
    result = train(config(data, tmp_path / "run", loss={"energy_per_atom": 0.0}, batch_size=1, stop={"max_epochs": 1}))
    assert result.epochs == 1 and result.history[-1]["train_loss"] > 0
