"""benchmarks/gpu_check.sh reports what it could not run as NOT RUN, never as passed or failed."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bare_python():
    """The interpreter this venv was made from (without the venv's packages), or None."""
    for name in ("python3", "python"):
        path = os.path.join(sys.base_prefix, "bin", name)
        if os.path.exists(path):
            return path
    return None


def test_a_machine_without_the_packages_gets_every_step_reported_not_run(tmp_path):
    python = bare_python()
    if python is None or shutil.which("bash") is None:
        pytest.skip("no base interpreter or bash to run the check with")
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    if has_torch:
        pytest.skip(f"{python} has torch: it is not a machine without the packages")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=python, PYTHONPATH="")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in (tmp_path / "gpu_table.md").read_text().splitlines()[2:] if line.strip()]
    assert len(rows) >= 8  # plugin, three test groups, four timing groups
    for row in rows:
        result = row.strip("|").split("|")[-1].strip()
        assert result.startswith("NOT RUN: missing torch"), row
