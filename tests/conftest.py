import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 pytest workers on the 2 cores: one torch thread per script each, not 2 threads x 2 jobs
    # (measured 10x slower under such contention).
    os.environ["OMP_NUM_THREADS"] = "1"


_zygote = None


def _server():
    """The session's fork server (tests/zygote.py), started on first use; it exits when the tests do."""
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        _zygote = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")], cwd=ROOT,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return _zygote


def run(*argv, check=True, timeout=900, fresh=False):
    """Run a project script as its own process from the repo root; return the CompletedProcess. The process is
    forked from a server that has imported torch, transformers and peft (tests/zygote.py), which saves their
    import time on each of the suite's ~150 runs; fresh=True starts a new interpreter instead, for tests that
    compare separate runs (a fork shares the server's hash seed)."""
    if fresh:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            server = _server()
            server.stdin.write(json.dumps({"argv": [str(a) for a in argv], "out": out, "err": err,
                                           "timeout": timeout}) + "\n")
            server.stdin.flush()
            answer = json.loads(server.stdout.readline())
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                proc = subprocess.CompletedProcess(argv, answer["rc"], f_out.read(), f_err.read())
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def torchrun(*argv, nproc=2):
    """Run a project script under torchrun with nproc CPU (gloo) processes; the CompletedProcess. One CI run in
    many saw a rank abort inside gloo (exitcode -6, SIGABRT), not reproduced in 15 local runs: such an abort is
    retried once, with a warning; anything else is returned as it is."""
    import warnings
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                               *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode == 0 or "exitcode: -6" not in proc.stderr or attempt:
            return proc
        warnings.warn("a torchrun rank aborted (SIGABRT) in gloo; retrying once:\n" + proc.stderr[:1500])


def torchrun_failure(proc):
    """The failing rank's reason (torchrun's own report ends stderr; the reason is further up)."""
    reasons = [line for line in proc.stderr.splitlines() if "what()" in line or "Error" in line or "error" in line]
    return "\n".join(reasons[:20]) + "\n...\n" + proc.stderr[-1000:]


SMALL = ["--alfworld-train-per-type", "1", "--alfworld-test-per-type", "1", "--bfcl-train", "8", "--bfcl-test", "4"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """ALFWorld (generated, 1 game per type and split) + BFCL step data, made twice with the same seed:
    the second time with ALFWorld's games and experts in 2 processes (--jobs 2), which must not change it."""
    outs = []
    for name, jobs in (("a", "1"), ("b", "2")):
        out = tmp_path_factory.mktemp(f"data_{name}")
        run("make_data.py", "--env", "alfworld,bfcl", "--seed", "3", "--out", str(out), "--jobs", jobs, *SMALL,
            fresh=name == "b")  # two interpreters (two hash seeds), as two users' runs
        outs.append(out)
    return outs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lm
    tok = lm.load_tokenizer(lm.resolve_model(lm.EMBEDDED))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def sci_data(tmp_path_factory):
    """ScienceWorld step data of one in-domain task (find-living-thing) and one OOD task (find-animal)."""
    out = tmp_path_factory.mktemp("sci_data")
    run("make_data.py", "--env", "scienceworld", "--sciworld-tasks", "find-living-thing,find-animal", "--seed", "5", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def all_data(small_data, sci_data, tmp_path_factory):
    """One data folder with all three environments (ALFWorld and BFCL from small_data, ScienceWorld from sci_data)."""
    import shutil
    out = tmp_path_factory.mktemp("all_data") / "d"
    shutil.copytree(small_data[0], out)
    for name in os.listdir(sci_data):
        if name.startswith("scienceworld_"):
            shutil.copy(os.path.join(sci_data, name), out)
    return out
