"""The whole study end to end, every stage a subprocess reading the previous stage's files.

test_tiny_pipeline runs in CI (tiny random model, all three environments, all four scripts + report).
test_real_model_pipeline is marked slow (the embedded SmolLM2-135M, a few minutes): make test-slow.
"""
import json
import os

import pytest

from conftest import run


def pipeline(model, data, out, train_extra=(), sample=("--max-records", "1"), threads="1"):
    runs = []
    for k in ("0.0", "0.5"):
        run_dir = out / "runs" / f"k{k}_seed0"
        run("train.py", "--model", model, "--data", f"{data}/*_train.jsonl", "--mask-action-frac", k, "--max-steps", "4",
            "--save-every", "2", "--batch-size", "2", "--threads", threads, "--out", str(run_dir), *train_extra)
        runs.append(run_dir)
    run("make_conflicts.py", "--data", f"{data}/*_id_test.jsonl", f"{data}/*_ood_test.jsonl", "--pool", f"{data}/*_train.jsonl",
        "--max-per-split", "1", "--out", str(out / "conflicts.jsonl"))
    gen = ["--max-thought-tokens", "16", "--max-action-tokens", "12", "--threads", threads]
    test_data = [f"{data}/*_id_test.jsonl", f"{data}/*_ood_test.jsonl"]
    conflicts = ["--conflicts", str(out / "conflicts.jsonl")]  # probed in the steps' pass, as study.sh does
    run("probe.py", "--model", model, "--data", *test_data, *sample, *gen, *conflicts,
        "--conflicts-out", str(out / "conflicts" / "base"), "--out", str(out / "probe" / "base"))
    for r in runs:
        run("probe.py", "--model", model, "--no-base", "--checkpoints", str(r), "--data", *test_data, *sample, *gen,
            *conflicts, "--conflicts-out", str(out / "conflicts" / r.name), "--out", str(out / "probe" / r.name))
        run("evaluate.py", "--model", model, "--adapter", str(r), "--data", str(data), "--max-episodes", "1", "--max-steps", "2",
            "--num-envs", "4", *gen, "--out", str(out / "eval" / r.name))
    return run("report.py", "--results", str(out))


def check_report(out):
    report = out / "report"
    for name in ("agreement", "loglik", "revisions", "truncation", "conflicts", "attribution", "online", "ood_vs_k"):
        assert (report / f"{name}.png").stat().st_size > 10_000, name
        assert (report / f"{name}.csv").read_text().count("\n") >= 2, name
    md = (report / "results.md").read_text()
    assert "## Probe" in md and "## Conflict probe" in md and "## Online rollouts" in md
    online = (report / "online.csv").read_text()
    assert "k=0.0" in online and "k=0.5" in online


def test_tiny_pipeline(tiny_model, all_data, tmp_path):
    proc = pipeline(tiny_model, all_data, tmp_path)
    assert "report done" in proc.stdout
    check_report(tmp_path)
    probe = [json.loads(x) for x in open(tmp_path / "probe" / "k0.5_seed0" / "records.jsonl")]
    assert {r["env"] for r in probe} == {"alfworld", "scienceworld", "bfcl"}
    assert {r["step"] for r in probe} == {2, 4}
    episodes = [json.loads(x) for x in open(tmp_path / "eval" / "k0.5_seed0" / "episodes.jsonl")]
    assert {(r["env"], r["split"], r["mode"]) for r in episodes} == {
        (e, s, m) for e in ("alfworld", "scienceworld", "bfcl") for s in ("id_test", "ood_test") for m in ("prompt", "cot")}
    # The report is a pure function of its inputs: run it again, same bytes.
    first = {n: (tmp_path / "report" / n).read_bytes() for n in sorted(os.listdir(tmp_path / "report"))}
    run("report.py", "--results", str(tmp_path), fresh=True)
    assert first == {n: (tmp_path / "report" / n).read_bytes() for n in sorted(os.listdir(tmp_path / "report"))}


@pytest.mark.slow
def test_real_model_pipeline(all_data, tmp_path):
    """The embedded SmolLM2-135M through every stage; the loss falls and every output is well formed."""
    proc = pipeline("smollm2-135m", all_data, tmp_path, train_extra=("--lr", "5e-4"), threads="2")
    assert "report done" in proc.stdout
    check_report(tmp_path)
    metrics = [json.loads(x) for x in open(tmp_path / "runs" / "k0.0_seed0" / "metrics.jsonl")]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
