"""Bad input, script by script: a non-zero exit, one error line naming the file, the line and the field,
no traceback, and no output created or changed."""
import json
import os

import pytest

from conftest import run

KINDS = ["malformed_line", "empty_file", "missing_field", "wrong_type", "duplicate_id", "missing_path", "empty_glob",
         "unknown_env", "out_of_range"]


def check_fails_cleanly(proc, expected, outputs):
    """Exit != 0, exactly one 'error:' line holding every expected piece, no traceback, outputs untouched."""
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for piece in expected:
        assert piece in errors[0], (piece, errors[0])
    for path, before in outputs.items():
        now = open(path, "rb").read() if os.path.exists(path) else None
        assert now == before, f"{path} was created or changed"


def snapshot(*paths):
    return {str(p): (open(p, "rb").read() if os.path.exists(p) else None) for p in paths}


def bad_steps(kind, good, folder, name="x_id_test.jsonl"):
    """(path or glob to pass, pieces the error line must name) for a step file with one kind of fault."""
    path = folder / name
    lines = [json.dumps(r) for r in good]
    if kind == "malformed_line":
        lines.insert(1, '{"id": "broken", ')
        expected = [f"{path}:2", "not valid JSON"]
    elif kind == "empty_file":
        lines = []
        expected = [str(path), "no "]
    elif kind == "missing_field":
        lines[1] = json.dumps({k: v for k, v in good[1].items() if k != "thought"})
        expected = [f"{path}:2", "'thought'"]
    elif kind == "wrong_type":
        lines[1] = json.dumps(dict(good[1], action=3))
        expected = [f"{path}:2", "'action'"]
    elif kind == "duplicate_id":
        lines.append(lines[0])
        expected = [f"{path}:{len(lines)}", "'id'", "duplicate"]
    elif kind == "missing_path":
        return str(folder / "nothing.jsonl"), [str(folder / "nothing.jsonl"), "not found"]
    elif kind == "empty_glob":
        return str(folder / "*_nothing.jsonl"), [str(folder / "*_nothing.jsonl"), "not found"]
    elif kind == "unknown_env":
        lines[1] = json.dumps(dict(good[1], env="minecraft"))
        expected = [f"{path}:2", "'env'", "minecraft"]
    path.write_text("".join(line + "\n" for line in lines))
    return str(path), expected


def good_steps(small_data, n=3):
    with open(os.path.join(small_data[0], "alfworld_id_test.jsonl")) as f:
        return [json.loads(line) for line in f][:n]


@pytest.mark.parametrize("kind", KINDS)
def test_train_bad_input(kind, tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    if kind == "out_of_range":
        data, expected, extra = os.path.join(small_data[0], "alfworld_train.jsonl"), ["--batch-size", "0"], ["--batch-size", "0"]
    else:
        data, expected = bad_steps(kind, good_steps(small_data), tmp_path)
        extra = []
    proc = run("train.py", "--model", tiny_model, "--data", data, "--out", str(out), "--max-steps", "1",
               "--threads", "1", *extra, check=False)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_probe_bad_input(kind, tiny_model, small_data, tmp_path):
    out = tmp_path / "probe"
    if kind == "out_of_range":
        data, expected, extra = os.path.join(small_data[0], "alfworld_id_test.jsonl"), ["--max-records", "-1"], ["--max-records", "-1"]
    else:
        data, expected = bad_steps(kind, good_steps(small_data), tmp_path)
        extra = []
    proc = run("probe.py", "--model", tiny_model, "--data", data, "--out", str(out), "--threads", "1", *extra, check=False)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_make_conflicts_bad_input(kind, small_data, tmp_path):
    out = tmp_path / "conflicts.jsonl"
    pool = os.path.join(small_data[0], "alfworld_train.jsonl")
    if kind == "out_of_range":
        data, expected, extra = os.path.join(small_data[0], "alfworld_id_test.jsonl"), ["--keep-frac"], ["--keep-frac", "2"]
    else:
        data, expected = bad_steps(kind, good_steps(small_data), tmp_path)
        extra = []
    proc = run("make_conflicts.py", "--data", data, "--pool", pool, "--out", str(out), *extra, check=False)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()


@pytest.mark.parametrize("kind", ["malformed_line", "empty_file", "missing_field", "wrong_type", "duplicate_id",
                                  "out_of_range"])
def test_conflict_probe_bad_input(kind, tiny_model, small_data, tmp_path):
    """probe.py --conflicts: the conflicts file itself is checked (trace, messages, ids)."""
    good = run("make_conflicts.py", "--data", os.path.join(small_data[0], "alfworld_id_test.jsonl"), "--pool",
               os.path.join(small_data[0], "alfworld_train.jsonl"), "--out", str(tmp_path / "good.jsonl"))
    assert good.returncode == 0
    recs = [json.loads(line) for line in open(tmp_path / "good.jsonl")][:3]
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in recs]
    extra = []
    if kind == "malformed_line":
        lines.insert(1, "{")
        expected = [f"{path}:2", "not valid JSON"]
    elif kind == "empty_file":
        lines = []
        expected = [str(path), "no records"]
    elif kind == "missing_field":
        lines[1] = json.dumps(dict(recs[1], trace=None))
        expected = [f"{path}:2", "'trace'"]
    elif kind == "wrong_type":
        lines[1] = json.dumps(dict(recs[1], messages="hello"))
        expected = [f"{path}:2", "'messages'"]
    elif kind == "duplicate_id":
        lines.append(lines[0])
        expected = [f"{path}:{len(lines)}", "'id'", "duplicate"]
    else:
        extra, expected = ["--batch-size", "0"], ["--batch-size"]
    path.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "probe"
    proc = run("probe.py", "--model", tiny_model, "--conflicts", str(path), "--out", str(out), "--threads", "1", *extra,
               check=False)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()
    # Messages that end with the assistant's turn are no prompt to answer.
    path.write_text(json.dumps(dict(recs[0], messages=recs[0]["messages"] + [{"role": "assistant", "content": "x"}])) + "\n")
    proc = run("probe.py", "--model", tiny_model, "--conflicts", str(path), "--out", str(out), check=False)
    check_fails_cleanly(proc, [f"{path}:1", "'messages'", "user turn"], {})


@pytest.mark.parametrize("kind", ["malformed_line", "empty_file", "missing_field", "missing_path", "unknown_env",
                                  "out_of_range"])
def test_evaluate_bad_input(kind, small_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(small_data[0], data)
    test_file = data / "alfworld_id_test.jsonl"
    lines = test_file.read_text().splitlines()
    extra = ["--env", "alfworld", "--split", "id_test"]
    if kind == "malformed_line":
        lines.insert(1, "{")
        expected = [f"{test_file}:2", "not valid JSON"]
    elif kind == "empty_file":
        lines = []
        expected = ["no test episodes"]
    elif kind == "missing_field":
        lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "task_id"})
        expected = [f"{test_file}:2", "'task_id'"]
    elif kind == "missing_path":
        test_file.unlink()
        expected = [str(test_file), "not found"]
    elif kind == "unknown_env":
        extra = ["--env", "minecraft"]
        expected = ["--env", "minecraft"]
    else:
        extra += ["--num-envs", "0"]
        expected = ["--num-envs"]
    if test_file.exists():
        test_file.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "eval"
    proc = run("evaluate.py", "--policy", "expert", "--data", str(data), "--out", str(out), *extra, check=False, timeout=120)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()
    (data / "meta.json").write_text("{not json")
    proc = run("evaluate.py", "--policy", "expert", "--data", str(data), "--out", str(out), "--env", "alfworld", check=False)
    if kind not in ("missing_path", "unknown_env"):
        check_fails_cleanly(proc, [str(data / "meta.json")], {})


@pytest.mark.parametrize("kind", ["malformed_line", "empty_file", "missing_field", "wrong_type", "duplicate_id",
                                  "missing_path", "empty_glob", "unknown_env", "out_of_range"])
def test_import_eto_bad_input(kind, tmp_path):
    good = [{"id": f"ep{i}", "conversations": [
        {"from": "human", "value": "Interact with a household."}, {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "You are in a room. Your task is to: put a mug on a shelf."},
        {"from": "gpt", "value": "Thought: I need a mug.\nAction: go to shelf 1"},
        {"from": "human", "value": "On the shelf 1, you see a mug 1."}]} for i in range(3)]
    path = tmp_path / "eto.jsonl"
    lines = [json.dumps(g) for g in good]
    extra = []
    if kind == "malformed_line":
        lines.insert(1, "{")
        expected = [f"{path}:2", "not valid JSON"]
    elif kind == "empty_file":
        lines = []
        expected = [str(path), "nothing to import"]
    elif kind == "missing_field":
        lines[1] = json.dumps({"id": "x"})
        expected = [f"{path}:2", "'conversations'"]
    elif kind == "wrong_type":
        lines[1] = json.dumps({"id": "x", "conversations": [{"from": "human", "value": 3}]})
        expected = [f"{path}:2", "conversations[0]", "'value'"]
    elif kind == "duplicate_id":
        lines.append(lines[0])
        expected = [f"{path}:4", "'id'", "duplicate"]
    elif kind == "missing_path":
        path = tmp_path / "nothing.json"
        expected = [str(path), "no such file"]
    elif kind == "empty_glob":  # no globs here: a folder in place of a file
        path = tmp_path
        expected = [str(path), "a folder"]
    elif kind == "unknown_env":
        extra, expected = ["--import-env", "minecraft"], ["--import-env", "minecraft"]
    else:
        extra, expected = ["--history", "-1"], ["--history"]
    if path.suffix == ".jsonl":
        path.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    proc = run("make_data.py", "--import-eto", str(path), "--out", str(out), *extra, check=False)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()


def test_import_eto_turns_must_alternate(tmp_path):
    path = tmp_path / "eto.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "Task: put a mug on a shelf."}, {"from": "human", "value": "You see a shelf 1."},
        {"from": "gpt", "value": "Thought: I need a mug.\nAction: go to shelf 1"}]}]))
    proc = run("make_data.py", "--import-eto", str(path), "--out", str(tmp_path / "out"), check=False)
    check_fails_cleanly(proc, [f"{path}: item 1", "conversations[1]", "alternate"], {})


def test_report_bad_meta(tmp_path):
    (tmp_path / "probe" / "x").mkdir(parents=True)
    (tmp_path / "probe" / "x" / "meta.json").write_text("{broken")
    (tmp_path / "probe" / "x" / "records.jsonl").write_text("")
    proc = run("report.py", "--results", str(tmp_path), check=False)
    check_fails_cleanly(proc, [str(tmp_path / "probe" / "x" / "meta.json")], {})
    assert not (tmp_path / "report").exists()


def test_make_conflicts_needs_task_ids(small_data, tmp_path):
    lines = open(os.path.join(small_data[0], "alfworld_id_test.jsonl")).read().splitlines()
    rec = json.loads(lines[1])
    del rec["task_id"]
    path = tmp_path / "x_id_test.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(rec)] + lines[2:]) + "\n")
    proc = run("make_conflicts.py", "--data", str(path), "--pool", os.path.join(small_data[0], "alfworld_train.jsonl"),
               "--out", str(tmp_path / "c.jsonl"), check=False)
    check_fails_cleanly(proc, [f"{path}:2", "'task_id'"], {})
    assert not (tmp_path / "c.jsonl").exists()


def test_resume_stops_at_a_damaged_line_mid_file(tiny_model, small_data, tmp_path):
    """A torn last line is redone; a broken line elsewhere is never guessed at or overwritten."""
    out = tmp_path / "probe"
    argv = ["probe.py", "--model", tiny_model, "--data", os.path.join(small_data[0], "alfworld_id_test.jsonl"),
            "--max-records", "2", "--max-thought-tokens", "4", "--attribution-samples", "0", "--threads", "1", "--out", str(out)]
    run(*argv)
    records = out / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    damaged = lines[0] + lines[1][:20] + "\n" + "".join(lines[2:])
    records.write_text(damaged)
    before = snapshot(records, out / "summary.csv")
    proc = run(*argv, check=False)
    check_fails_cleanly(proc, [f"{records}:2", "not valid JSON"], before)


# ----------------------------------------------------------------------------- what used to be a traceback

@pytest.mark.parametrize("kind", ["huge_int", "deep_array", "empty_action"])
@pytest.mark.parametrize("script", ["train.py", "probe.py", "make_conflicts.py"])
def test_json_past_the_parsers_limits_is_one_line(script, kind, tiny_model, small_data, tmp_path):
    good = good_steps(small_data)
    path = tmp_path / "x_train.jsonl"
    lines = [json.dumps(dict(r, split="train")) for r in good]
    if kind == "huge_int":
        lines[1] = lines[1][:-1] + ', "n": ' + "9" * 5001 + "}"
        expected = [f"{path}:2", "JSON"]
    elif kind == "deep_array":
        lines[1] = "[" * 100_000 + "]" * 100_000
        expected = [f"{path}:2", "JSON"]
    else:
        lines[1] = json.dumps(dict(good[1], split="train", action=" "))
        expected = [f"{path}:2", "'action'", "empty"]
    path.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    argv = {"train.py": ["--model", tiny_model, "--max-steps", "1", "--threads", "1"],
            "probe.py": ["--model", tiny_model, "--threads", "1"],
            "make_conflicts.py": ["--pool", os.path.join(small_data[0], "alfworld_train.jsonl")]}[script]
    proc = run(script, "--data", str(path), *argv, "--out", str(out / "o.jsonl" if script == "make_conflicts.py" else out),
               check=False)
    check_fails_cleanly(proc, expected, {})
    assert not out.exists()


@pytest.mark.parametrize("kind", ["system_only", "empty_action", "huge_int", "deep_array"])
def test_import_eto_items_past_the_parser_or_without_turns(kind, tmp_path):
    good = {"id": "ep0", "conversations": [
        {"from": "human", "value": "Interact with a household."}, {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "You are in a room. Your task is to: put a mug on a shelf."},
        {"from": "gpt", "value": "Thought: I need a mug.\nAction: go to shelf 1"},
        {"from": "human", "value": "On the shelf 1, you see a mug 1."}]}
    path = tmp_path / "eto.jsonl"
    bad = {"system_only": json.dumps({"id": "ep1", "messages": [{"role": "system", "content": "You are an agent."}]}),
           "empty_action": json.dumps(dict(good, id="ep1", conversations=good["conversations"][:3] + [
               {"from": "gpt", "value": "Thought: I need a mug.\nAction: "}])),
           "huge_int": json.dumps(dict(good, id="ep1"))[:-1] + ', "n": ' + "9" * 5001 + "}",
           "deep_array": "[" * 100_000 + "]" * 100_000}[kind]
    path.write_text(json.dumps(good) + "\n" + bad + "\n")
    out = tmp_path / "out"
    proc = run("make_data.py", "--import-eto", str(path), "--out", str(out), check=False)
    check_fails_cleanly(proc, [f"{path}:2", {"system_only": "no human turn", "empty_action": "empty action"}.get(kind, "JSON")], {})
    assert not out.exists()


def test_train_out_with_braces_of_its_own_is_one_line(tiny_model, small_data, tmp_path):
    for out in ("run_{name}", "run_{", "run_{0}"):
        proc = run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "1",
                   "--threads", "1", "--out", str(tmp_path / out), check=False)
        check_fails_cleanly(proc, ["--out", "{k} and {seed}"], {})
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("script", ["train.py", "probe.py", "evaluate.py"])
def test_world_size_without_torchrun_is_one_line(script, tiny_model, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    data = small_data[0]
    argv = {"train.py": ["--data", f"{data}/alfworld_train.jsonl", "--max-steps", "1"],
            "probe.py": ["--data", f"{data}/alfworld_id_test.jsonl", "--max-records", "1"],
            "evaluate.py": ["--data", str(data), "--env", "alfworld", "--max-episodes", "1"]}[script]
    proc = run(script, "--model", tiny_model, *argv, "--threads", "1", "--out", str(tmp_path / "o"), check=False, fresh=True)
    check_fails_cleanly(proc, ["WORLD_SIZE=2", "MASTER_ADDR", "torchrun"], {})


def test_a_repeated_env_or_split_runs_once(small_data, tmp_path):
    proc = run("evaluate.py", "--policy", "expert", "--data", str(small_data[0]), "--env", "bfcl,bfcl", "--split",
               "id_test,id_test", "--max-episodes", "2", "--out", str(tmp_path / "eval" / "expert"))
    assert "--env lists bfcl more than once" in proc.stderr and "--split lists id_test more than once" in proc.stderr
    recs = [json.loads(line) for line in open(tmp_path / "eval" / "expert" / "episodes.jsonl")]
    assert len(recs) == len({r["id"] for r in recs}) == 2
    run("report.py", "--results", str(tmp_path))  # not the 'two writers' refusal of a folder holding ids twice


def test_a_write_refused_mid_run_keeps_what_was_done_and_resumes(tiny_model, small_data, tmp_path):
    """A file-size limit stands in for a full disk (root ignores a read-only folder): the probe stops with one
    line naming the file, the records written before stay, and the same command finishes the run."""
    import resource
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "p"
    argv = [sys.executable, "probe.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_id_test.jsonl",
            "--max-records", "6", "--max-thought-tokens", "4", "--max-action-tokens", "4", "--attribution-samples", "0",
            "--batch-size", "1", "--threads", "1", "--out", str(out)]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=600)
    check_fails_cleanly(proc, [str(out / "records.jsonl"), "rerun the same command to resume"], {})
    kept = (out / "records.jsonl").read_text().splitlines()
    assert kept
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(recs) == len({r["id"] for r in recs}) == 6
