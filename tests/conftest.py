import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(*argv, check=True, timeout=900):
    """Run a project script as a subprocess from the repo root; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


SMALL = ["--alfworld-train-per-type", "1", "--alfworld-test-per-type", "1", "--bfcl-train", "8", "--bfcl-test", "4"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """ALFWorld (generated, 1 game per type and split) + BFCL step data, made twice with the same seed."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"data_{name}")
        run("make_data.py", "--env", "alfworld,bfcl", "--seed", "3", "--out", str(out), *SMALL)
        outs.append(out)
    return outs
