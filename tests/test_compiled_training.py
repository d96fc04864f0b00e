"""`compile: true`: the compiled training step takes the same optimisation steps as the eager one
(forces and stress in the loss, so the compiled graph differentiates a derivative), for both
families and both heads, also for a batch of one structure after batches of several."""

import ase.io
import pytest
import torch

from mlip.train import config_from_dict
from mlip.train.compiled import reattach_saved_outputs
from mlip.train.trainer import Trainer
from test_train import TINY, emt_copper



@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # 9 structures: 8 for training (two batches of 4) and 1 for validation (a batch of one)
    path = tmp_path_factory.mktemp("data") / "cu_emt.extxyz"
    ase.io.write(path, emt_copper(9), format="extxyz")
    return str(path)


def trainer(data_file, run_dir, family, head, compile, device="cpu"):
    return Trainer(config_from_dict({
        "run_dir": str(run_dir),
        "data": {"train": [data_file], "val_fraction": 0.12},
        "model": {"family": family, "head": head, "r_max": 4.0, "overrides": TINY[family]},
        "optimizer": {"lr": 0.01, "ema_decay": 0.9, "clip_grad_norm": 10.0},
        "loss": {"energy_per_atom": 1.0, "forces": 1.0, "stress": 10.0 if head == "gradient" else 0.0},
        "batch_size": 4,
        "dtype": "float64",
        "threads": 1,
        "compile": compile,
        "device": device,
        "progress": False,
    }))


def weights(model):
    return torch.cat([w.detach().reshape(-1) for _, w in sorted(model.state_dict().items())])


# About a minute of compilation each here: one case in the default run, the others slow.
@pytest.mark.parametrize("family,head", [("allegro", "gradient"), pytest.param("nequip", "gradient", marks=pytest.mark.slow),
                                         pytest.param("allegro", "direct", marks=pytest.mark.slow)])
def test_compiled_steps_equal_eager_steps(data_file, tmp_path, family, head):
    eager = trainer(data_file, tmp_path / "eager", family, head, compile=False)
    compiled = trainer(data_file, tmp_path / "compiled", family, head, compile=True)
    batches = list(eager.train_loader.epoch(0))
    assert [len(b["num_atoms"]) for b in batches] == [4, 4]
    single = next(iter(eager.val_loader.epoch(0)))  # one structure: sizes 1 are traced apart
    assert len(single["num_atoms"]) == 1
    for batch in [batches[0], batches[1], single, batches[0]]:
        loss_eager = eager._train_step(batch)
        loss_compiled = compiled._train_step(batch)
        assert float(loss_compiled) == pytest.approx(float(loss_eager), rel=1e-10)
    before = weights(trainer(data_file, tmp_path / "start", family, head, compile=False).model)
    after = weights(eager.model)
    assert (after - before).norm() > 1e-3 * before.norm()  # the steps moved the weights
    assert torch.allclose(weights(compiled.model), after, rtol=1e-10, atol=1e-12)
    assert len(compiled.step_model._graphs) == 2  # batches of 4, then the single structure

    # Evaluation mode (validation) runs the model itself: nothing more is compiled.
    compiled.model.eval()
    assert torch.allclose(compiled.step_model(batches[1])["energy"], eager.model.eval()(batches[1])["energy"], rtol=1e-10)
    assert len(compiled.step_model._graphs) == 2


@pytest.mark.slow  # about a minute of compilation each
@pytest.mark.parametrize("pooling,threads", [("intensive", 1), ("meanmax", 2)])
def test_compiled_property_steps_equal_eager_steps(tmp_path, pooling, threads):
    """task: property (a per-structure target, no forces): the same steps compiled as eager; the max
    over atoms (scatter_reduce amax) in Inductor's kernels on two threads too."""
    from test_property import alloys, property_config

    path = tmp_path / "alloys.extxyz"
    ase.io.write(path, alloys(12, seed=0))
    runs = [Trainer(property_config(path, tmp_path / f"run{compile}", dtype="float64", compile=compile, threads=threads,
                                    property={"unit": "eV", "hidden": [16], "pooling": pooling}))
            for compile in (False, True)]
    batches = list(runs[0].train_loader.epoch(0))
    for batch in batches:
        losses = [float(run._train_step(batch)) for run in runs]
        assert losses[1] == pytest.approx(losses[0], rel=1e-10)
    assert torch.allclose(weights(runs[1].model), weights(runs[0].model), rtol=1e-10, atol=1e-12)


def test_traced_force_loss_has_the_eager_weight_gradient():
    """A force loss traced by make_fx (as compile: true does) differentiated w.r.t. a weight: with
    the saved-output detaches removed, the eager gradient; without, a wrong one (tanh, sigmoid and
    exp save their results for their backward)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    generator = torch.Generator().manual_seed(0)
    vectors, direction = (torch.randn(40, 3, dtype=torch.float64, generator=generator) for _ in range(2))
    weight = torch.randn(3, 4, dtype=torch.float64, generator=generator)

    def force_loss(weight, vectors):
        vectors = vectors.detach().requires_grad_(True)
        h = vectors @ weight
        energy = (torch.sigmoid(torch.tanh(h)) * torch.exp(0.1 * h)).square().sum()
        forces, = torch.autograd.grad(energy, vectors, create_graph=True)
        return (forces * direction).sum()

    def weight_gradient(fn):
        w = weight.clone().requires_grad_(True)
        return torch.autograd.grad(fn(w, vectors), w)[0]

    expected = weight_gradient(force_loss)
    traced = make_fx(force_loss, tracing_mode="symbolic", _allow_non_fake_inputs=True)(weight, vectors)
    assert (weight_gradient(traced) - expected).norm() > 1e-3 * expected.norm()  # the trace as make_fx gives it
    reattach_saved_outputs(traced)
    assert torch.allclose(weight_gradient(traced), expected, rtol=1e-12, atol=1e-14)
