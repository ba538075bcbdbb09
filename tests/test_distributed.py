"""probe.py and evaluate.py under torchrun: 2 CPU (gloo) processes write what one process writes, resume
across a change of the number of processes, and report.py refuses an unfinished run's part files."""
import json
import os
import shutil

from conftest import run, torchrun, torchrun_failure
from test_bad_input import check_fails_cleanly


def without_seconds(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]


def test_probe_under_torchrun_matches_one_process_and_resumes_across_process_counts(tiny_model, small_data, tmp_path):
    run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "2",
        "--batch-size", "2", "--save-every", "1", "--threads", "1", "--out", str(tmp_path / "run"))
    data = str(small_data[0])
    common = ["--model", tiny_model, "--checkpoints", str(tmp_path / "run"), "--data", f"{data}/alfworld_id_test.jsonl",
              f"{data}/alfworld_ood_test.jsonl", "--max-records", "3", "--batch-size", "2", "--max-thought-tokens", "6",
              "--max-action-tokens", "6", "--attribution-samples", "1", "--threads", "1"]
    conflicts = tmp_path / "c.jsonl"
    run("make_conflicts.py", "--data", f"{data}/alfworld_id_test.jsonl", f"{data}/alfworld_ood_test.jsonl", "--pool",
        f"{data}/alfworld_train.jsonl", "--max-per-split", "3", "--out", str(conflicts))
    both = ["--conflicts", str(conflicts)]
    run("probe.py", *common, *both, "--conflicts-out", str(tmp_path / "c1"), "--out", str(tmp_path / "one"))
    proc = torchrun("probe.py", *common, *both, "--conflicts-out", str(tmp_path / "c2"), "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, torchrun_failure(proc)
    assert "x 2 process(es)" in proc.stdout
    for a, b in (("one", "two"), ("c1", "c2")):
        for name in ("records.jsonl", "summary.jsonl", "summary.csv"):
            assert (tmp_path / a / name).read_bytes() == (tmp_path / b / name).read_bytes(), (a, name)
        assert not list((tmp_path / b).glob("*.part-*"))
    # A 2-process run killed half way leaves part files; a 1-process rerun finishes the rest and merges.
    lines = (tmp_path / "one" / "records.jsonl").read_text().splitlines(keepends=True)
    part = tmp_path / "three"
    part.mkdir()
    shutil.copy(tmp_path / "one" / "meta.json", part)
    (part / "records.part-0.jsonl").write_text("".join(lines[0::4]))
    (part / "records.part-1.jsonl").write_text("".join(lines[1::4]))
    os.makedirs(tmp_path / "results" / "probe")
    shutil.copytree(part, tmp_path / "results" / "probe" / "three")
    check_fails_cleanly(run("report.py", "--results", str(tmp_path / "results"), check=False),
                        ["part files of an unfinished multi-process run"], {})
    proc = run("probe.py", *common, "--out", str(part))
    assert f"{len(lines[0::4]) + len(lines[1::4])} already in" in proc.stdout
    assert (part / "records.jsonl").read_bytes() == (tmp_path / "one" / "records.jsonl").read_bytes()
    assert not list(part.glob("*.part-*"))


def test_evaluate_under_torchrun_matches_one_process(tiny_model, small_data, tmp_path):
    common = ["--model", tiny_model, "--data", str(small_data[0]), "--env", "alfworld,bfcl", "--mode", "both",
              "--max-steps", "3", "--max-thought-tokens", "6", "--max-action-tokens", "6", "--num-envs", "2", "--threads", "1",
              "--max-episodes", "2"]  # per env and split: 2 processes still share 12 episodes
    run("evaluate.py", *common, "--out", str(tmp_path / "one"))
    proc = torchrun("evaluate.py", *common, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, torchrun_failure(proc)
    assert "x 2 process(es)" in proc.stdout
    assert without_seconds(tmp_path / "one" / "episodes.jsonl") == without_seconds(tmp_path / "two" / "episodes.jsonl")
    for name in ("summary.jsonl", "summary.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # The expert policy needs no model: its processes only share the episodes.
    expert = ["--policy", "expert", "--data", str(small_data[0]), "--env", "alfworld", "--max-episodes", "2"]
    run("evaluate.py", *expert, "--out", str(tmp_path / "e1"))
    proc = torchrun("evaluate.py", *expert, "--out", str(tmp_path / "e2"))
    assert proc.returncode == 0, torchrun_failure(proc)
    assert without_seconds(tmp_path / "e1" / "episodes.jsonl") == without_seconds(tmp_path / "e2" / "episodes.jsonl")
