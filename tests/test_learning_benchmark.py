"""benchmarks/learning.py's report: the numbers it derives from the two runs' logs."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning", os.path.join(ROOT, "benchmarks", "learning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def curve(*points):
    """Validation rows (epoch, minutes, forces_rmse meV/Å); epoch 0 is the untrained model."""
    return [{"epoch": e, "minutes": m, "forces_rmse": f, "energy_rmse": 10.0 * f} for e, m, f in points]


def test_reach_minutes_is_the_first_trained_epoch_below_the_target(learning):
    fast = curve((0, 0.1, 50.0), (1, 1.0, 300.0), (2, 2.0, 120.0), (3, 3.0, 90.0), (4, 4.0, 95.0), (5, 5.0, 80.0))
    assert learning.reach_minutes(fast, 100.0) == 3.0
    assert learning.reach_minutes(fast, 80.0) is None  # strictly below: equal is not reached
    # The untrained model's row never counts, however low (a validation before any training).
    assert learning.reach_minutes(fast, 60.0) is None


def test_comparison_tables_per_seed_and_mean(learning):
    mlip = curve((0, 0.0, 900.0), (1, 1.0, 200.0), (2, 2.0, 100.0))
    nequip = curve((0, 0.0, 900.0), (1, 2.0, 150.0))
    runs = {
        "seed 0": ({"mlip": mlip, "nequip": nequip}, {"mlip": 460_616, "nequip": 476_304},
                   {"mlip": {"energy_rmse": 0.004, "forces_rmse": 0.020},
                    "nequip": {"energy_rmse": 0.008, "forces_rmse": 0.040}}),
        "seed 1": ({"mlip": mlip, "nequip": nequip}, {"mlip": 460_616, "nequip": 476_304},
                   {"mlip": {"energy_rmse": 0.006, "forces_rmse": 0.030},
                    "nequip": {"energy_rmse": 0.008, "forces_rmse": 0.040}}),
        # nequip finished no epoch: no weights were picked, nothing to score
        "seed 2": ({"mlip": mlip, "nequip": curve((0, 0.0, 900.0))}, {"mlip": 460_616, "nequip": 476_304},
                   {"mlip": {"energy_rmse": 0.005, "forces_rmse": 0.025}, "nequip": None}),
    }
    text = learning.comparison_tables(runs)
    errors = text[:text.index("Time to reach")]  # the first table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in errors.splitlines()
            if line.startswith("| seed ") or line.startswith("| mean")}
    assert rows["seed 0"][:3] == ["20.0", "40.0", "0.50"]
    assert rows["seed 2"][:3] == ["25.0", "-", "-"]
    assert rows["seed 0"][-2:] == ["460,616", "476,304"]
    # mean ± sample std over the seeds that have a value: forces 25 ± 5, nequip 40 ± 0, ratios 0.5 and 0.75
    assert rows["mean ± std"][:3] == ["25.0 ± 5.0", "40.0 ± 0.0", "0.62 ± 0.18"]
    # time to reach: mlip (final 100) reaches nequip's final 150 at epoch 2 (2.0 min); nequip never reaches 100
    reach = [line for line in text.splitlines() if line.startswith("| seed 0 | 100.0")]
    assert reach == ["| seed 0 | 100.0 | 150.0 | 2.0 | not reached |"]
    assert "| seed 2 | - | - | - | - |" in text
