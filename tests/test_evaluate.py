"""evaluate.py: expert ceiling, both modes on the tiny model in all three environments, resume, env crashes and hangs."""
import collections
import json
import math
import os
import shutil
import sys

import pytest

import stats
from conftest import ROOT, run

TINY = ["--threads", "1", "--max-thought-tokens", "6", "--max-action-tokens", "6", "--max-steps", "3"]
FIELDS = {"id", "checkpoint", "step", "env", "task_type", "split", "task_id", "mode", "won", "score", "steps",
          "max_steps", "expert_steps", "invalid_actions", "invalid_rate", "agreement", "context_exceeded", "error", "errored",
          "tries", "seconds", "transcript"}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_expert_wins_every_episode(all_data, tmp_path):
    run("evaluate.py", "--policy", "expert", "--data", str(all_data), "--out", str(tmp_path), "--num-envs", "3")
    recs = read(tmp_path / "episodes.jsonl")
    assert {r["env"] for r in recs} == {"alfworld", "scienceworld", "bfcl"}
    assert {r["split"] for r in recs} == {"id_test", "ood_test"}
    want = {json.loads(line)["task_id"] for n in os.listdir(all_data) if n.endswith("_test.jsonl")
            for line in open(all_data / n)}
    assert sorted(r["task_id"] for r in recs) == sorted(want)  # every test episode once
    for r in recs:
        assert set(r) == FIELDS
        assert r["won"] and r["score"] == 1.0 and r["error"] is None and r["invalid_actions"] == 0
        assert r["steps"] == len(r["transcript"])
    summary = read(tmp_path / "summary.jsonl")
    assert all(row["won"] == 1.0 and row["mode"] == "expert" for row in summary)


def test_random_policy_is_a_floor(all_data, tmp_path):
    run("evaluate.py", "--policy", "random", "--data", str(all_data), "--env", "alfworld,bfcl", "--out", str(tmp_path),
        "--max-steps", "5")
    recs = read(tmp_path / "episodes.jsonl")
    assert recs and all(r["steps"] <= 5 for r in recs)
    assert all(not r["won"] for r in recs if r["env"] == "bfcl")  # a call with no arguments never passes
    # --max-steps-factor: each episode's cap is F x its expert path in the step data (rounded up).
    run("evaluate.py", "--policy", "random", "--data", str(all_data), "--env", "alfworld", "--out", str(tmp_path / "f"),
        "--max-steps-factor", "1.5")
    expert = collections.Counter(json.loads(line)["task_id"] for n in ("alfworld_id_test.jsonl", "alfworld_ood_test.jsonl")
                                 for line in open(all_data / n))
    for r in read(tmp_path / "f" / "episodes.jsonl"):
        assert r["expert_steps"] == expert[r["task_id"]] and r["max_steps"] == math.ceil(1.5 * r["expert_steps"])
        assert r["steps"] <= r["max_steps"]


def test_tiny_model_both_modes_all_envs_and_resume(tiny_model, all_data, tmp_path):
    argv = ["evaluate.py", "--model", tiny_model, "--data", str(all_data), "--max-episodes", "1", "--num-envs", "4",
            "--mode", "both", *TINY]
    run(*argv, "--out", str(tmp_path / "a"))
    recs = read(tmp_path / "a" / "episodes.jsonl")
    assert len(recs) == 3 * 2 * 2  # envs x splits x modes, one episode each
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert set(r) == FIELDS and r["checkpoint"] == "base" and r["error"] is None
        assert 1 <= r["steps"] <= 3
        for s in r["transcript"]:
            assert {"obs", "output", "action", "other_action", "invalid"} <= set(s)
            assert s["other_action"] is not None  # --log-both: the other mode at the same state
        assert 0 <= r["invalid_actions"] <= r["steps"]
    summary = read(tmp_path / "a" / "summary.jsonl")
    assert {row["mode"] for row in summary} == {"prompt", "cot", "cot-prompt"}
    # Killed after 5 episodes, mid-write of the 6th: the rerun finishes the rest, nothing twice.
    lines = (tmp_path / "a" / "episodes.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "meta.json", tmp_path / "b")  # written before the first episode
    (tmp_path / "b" / "episodes.jsonl").write_bytes(b"".join(lines[:5]) + lines[5][:30])
    proc = run(*argv, "--out", str(tmp_path / "b"))
    assert "5 episodes already in" in proc.stdout
    resumed = read(tmp_path / "b" / "episodes.jsonl")
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in recs)


def test_crashed_or_hung_env_is_restarted_and_retried(all_data, tmp_path):
    for mode in ("crash-once", "hang-once"):
        out = tmp_path / mode
        worker = f"{sys.executable} {os.path.join(ROOT, 'tests', 'fake_worker.py')} {mode} {tmp_path / (mode + '.marker')}"
        run("evaluate.py", "--policy", "expert", "--data", str(all_data), "--env", "alfworld", "--split", "ood_test",
            "--num-envs", "2", "--step-timeout", "10", "--worker-cmd", worker, "--out", str(out))
        recs = read(out / "episodes.jsonl")
        assert len(recs) == 2 and all(r["won"] and r["error"] is None for r in recs)
        assert sorted(r["tries"] for r in recs) == [1, 2]  # the restart is on the record
    worker = f"{sys.executable} {os.path.join(ROOT, 'tests', 'fake_worker.py')} crash-always {tmp_path / 'always.marker'}"
    argv = ["evaluate.py", "--policy", "expert", "--data", str(all_data), "--env", "alfworld", "--split", "ood_test",
            "--out", str(tmp_path / "always")]
    proc = run(*argv, "--worker-cmd", worker)
    log = proc.stdout + proc.stderr
    assert log.count("worker 0 restarted") + log.count("worker 1 restarted") >= 2
    recs = read(tmp_path / "always" / "episodes.jsonl")
    assert len(recs) == 2 and all(r["errored"] and "worker exited with code 3" in r["error"] for r in recs)
    # An infrastructure fault is not a loss: no success rate over errored episodes, they are counted apart.
    summary = read(tmp_path / "always" / "summary.jsonl")
    assert all(row["n"] == 0 and row["errors"] == 2 and row.get("won") is None for row in summary)
    # A rerun with working environments retries them; the summary then counts them as completed.
    run(*argv)
    recs = read(tmp_path / "always" / "episodes.jsonl")
    assert len(recs) == 4 and [r["errored"] for r in recs] == [True, False, True, False]  # each retry after its error
    summary = read(tmp_path / "always" / "summary.jsonl")
    assert all(row["n"] == 2 and row["errors"] == 0 and row["won"] == 1.0 for row in summary)
    assert "2 episodes already in" in run(*argv).stdout  # nothing left to do, nothing run twice
    assert len(read(tmp_path / "always" / "episodes.jsonl")) == 4


def test_checkpoints_are_checked_before_any_is_used(tiny_model, small_data, tmp_path):
    """A truncated adapter anywhere in a series stops probe.py and evaluate.py before the first model state."""
    run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "2",
        "--save-every", "1", "--batch-size", "2", "--threads", "1", "--out", str(tmp_path / "run"))
    weights = tmp_path / "run" / "checkpoint-000002" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for argv in (["probe.py", "--checkpoints", str(tmp_path / "run"), "--data", f"{small_data[0]}/alfworld_id_test.jsonl"],
                 ["evaluate.py", "--adapter", str(tmp_path / "run"), "--all-checkpoints", "--data", str(small_data[0]),
                  "--env", "alfworld"]):
        proc = run(*argv, "--model", tiny_model, "--out", str(tmp_path / "out"), check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"{weights}: truncated or corrupt safetensors file" in proc.stderr
        assert not (tmp_path / "out").exists()


def test_bad_inputs_fail_clearly(tiny_model, tmp_path):
    proc = run("evaluate.py", "--policy", "expert", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "none: no <env>_<split>.jsonl test files for --env all" in proc.stderr
    proc = run("evaluate.py", "--policy", "expert", "--env", "alfworld", "--data", str(tmp_path / "none"),
               "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "none/alfworld_id_test.jsonl not found" in proc.stderr
    proc = run("evaluate.py", "--policy", "expert", "--env", "minecraft", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "unknown environment 'minecraft'" in proc.stderr
    proc = run("evaluate.py", "--model", tiny_model, "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "adapter folder not found" in proc.stderr


@pytest.mark.parametrize("modes", [("--mode", "cot"), ("--mode", "both", "--no-log-both")])
def test_batched_backend_matches_reference_generate_loop(modes, tiny_model, all_data, tmp_path):
    # 4 lockstep envs through decode.run_branches (batched, each prompt reusing the last one's KV cache)
    # against one HF generate call per state and mode: the same greedy text at every step. With both modes, a
    # task's two episodes share their first prompt's pass (one row, two branches; every step of a BFCL item).
    argv = ["evaluate.py", "--model", tiny_model, "--data", str(all_data), "--max-episodes", "1", *modes,
            "--env", "alfworld,bfcl", *TINY]
    run(*argv, "--num-envs", "4", "--out", str(tmp_path / "hf"))
    run(*argv, "--num-envs", "1", "--backend", "generate", "--out", str(tmp_path / "ref"))
    hf, ref = ({r["id"]: r for r in read(tmp_path / d / "episodes.jsonl")} for d in ("hf", "ref"))
    assert set(hf) == set(ref) and len(hf) == (8 if "both" in modes else 4)
    for i in hf:
        got = [(s["output"], s["action"], s["other_action"]) for s in hf[i]["transcript"]]
        assert got == [(s["output"], s["action"], s["other_action"]) for s in ref[i]["transcript"]], i
        assert len(got) == (1 if hf[i]["env"] == "bfcl" else 3)  # a BFCL episode is one call


def test_fisher_and_wilson_against_hand_computed_values():
    """report.py's 'p vs random' and Wilson columns: exact values worked out by hand."""
    # 2 of the 2 successes in the first of two groups of 3: C(3,2) C(3,0) / C(6,2) = 3/15.
    assert stats.fisher_greater(2, 3, 0, 3) == pytest.approx(0.2)
    # 7 of 64 against 0 of 64: only the split with all 7 in the first group counts.
    assert stats.fisher_greater(7, 64, 0, 64) == pytest.approx(math.prod(range(58, 65)) / math.prod(range(122, 129)))
    assert stats.fisher_greater(0, 64, 0, 64) == 1.0 and stats.fisher_greater(3, 32, 3, 32) > 0.5
    lo, hi = stats.wilson(0, 64)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / (64 + 1.96 ** 2), abs=1e-4)
