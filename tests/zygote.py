"""A fork server for the tests: imports torch, transformers and peft once, then runs each project script in a
forked child, so a script run costs its own work and not ~5 s of imports (about 150 runs per suite).

Protocol (one JSON object per line): the client writes {"argv": [script, *args], "out": path, "err": path,
"timeout": seconds}; the server forks, the child runs the script as `python script args` would (its own
process, cwd the repo root, stdout and stderr to the two files, stdin empty), and the server answers
{"rc": code}: the exit status, or minus the signal number, as subprocess reports it; "timed_out": true when the
child was killed at its timeout.

What a child shares with the others, unlike fresh processes: the interpreter's hash seed and the state of
the pre-imported libraries (no torch op runs in this server, so no thread pool exists before a fork). Tests
that compare outputs of separate runs for determinism use real subprocesses instead (conftest.run(fresh=True)).
"""
import json
import os
import random
import runpy
import signal
import sys
import time
import traceback

import numpy  # noqa: F401  (imported for their import time only)
import peft  # noqa: F401
import torch  # noqa: F401
import tqdm  # noqa: F401
import transformers  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(request):
    """In the forked child: run the script as __main__ and exit with its status (never returns)."""
    for fd, path in ((1, request["out"]), (2, request["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(ROOT)
    sys.argv = list(request["argv"])
    sys.path[0] = ROOT  # a script's own folder, as `python script.py` sets it
    random.seed()  # a fresh process seeds random from the OS; a forked one would repeat the server's state
    code = 0
    try:
        runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # what the interpreter does with an uncaught exception: traceback, status 1
        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own exit: atexit handlers, thread joins and flushes, as in a fresh process


def serve():
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sys.stdin = open(os.devnull)
            child(request)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.02)
        reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
