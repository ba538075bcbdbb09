"""An environment worker that fails on purpose, for evaluate.py --worker-cmd in tests.

    python tests/fake_worker.py MODE MARKER
MODE: crash-once / hang-once (the first worker to see a step fails, later ones work: the marker
file remembers) or crash-always. Otherwise it is python -m envs --serve.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs.worker  # noqa: E402

mode, marker = sys.argv[1], sys.argv[2]


def first(marker):
    """True for exactly one worker: creating the marker is atomic, so two workers cannot both be first."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


class Failing:
    """stdin lines, with a failure injected at the first step command."""

    def __init__(self, lines):
        self.lines = lines

    def __iter__(self):
        for line in self.lines:
            if '"cmd": "step"' in line and (mode == "crash-always" or first(marker)):
                if mode.startswith("hang"):
                    time.sleep(3600)
                os._exit(3)
            yield line


sys.stdin = Failing(sys.stdin)
envs.worker.serve()
