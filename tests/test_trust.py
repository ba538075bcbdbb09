"""Trustworthy numbers: an output folder belongs to one configuration and one writer, and nothing wrong is
written silently (concurrent writers, reruns with other settings, copied and same-named folders in the
report, divergence, unparseable actions, overlong contexts, a missing base model, bad flag values, Ctrl-C,
file modes). Each case: a non-zero exit, one `error:` line, no traceback, no output created or changed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import envs
from conftest import ROOT, run
from test_bad_input import check_fails_cleanly, snapshot

PROBE = ["--max-records", "2", "--max-thought-tokens", "4", "--max-action-tokens", "4", "--attribution-samples", "0",
         "--threads", "1"]


def files_under(folder):
    """{path: bytes} of every file under folder (lock files aside): to show that nothing changed."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            if not n.endswith(".lock"):
                out[os.path.join(root, n)] = open(os.path.join(root, n), "rb").read()
    return out


@pytest.fixture(scope="module")
def tiny_run(tiny_model, small_data, tmp_path_factory):
    """A 2-step LoRA run of the tiny model (checkpoints at steps 1 and 2)."""
    out = tmp_path_factory.mktemp("trust") / "run"
    run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "2",
        "--batch-size", "2", "--save-every", "1", "--threads", "1", "--out", str(out))
    return out


# ----------------------------------------------------------------------------- one writer per output folder

def hold_lock(path, is_file=False):
    """Another process holding an output's lock, as a running stage would."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import provenance, time\n"
            f"provenance.claim_output({str(path)!r}, sys.exit, is_file={is_file}); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_ones_lock_does_not_block(tiny_model, small_data, tiny_run, tmp_path):
    data = small_data[0]
    conflicts = tmp_path / "c" / "conflicts.jsonl"
    cases = {  # script argv, the output it writes
        "train": (["train.py", "--model", tiny_model, "--data", f"{data}/alfworld_train.jsonl", "--max-steps", "1",
                   "--threads", "1", "--out", str(tmp_path / "t")], tmp_path / "t"),
        "probe": (["probe.py", "--model", tiny_model, "--data", f"{data}/alfworld_id_test.jsonl", *PROBE,
                   "--out", str(tmp_path / "p")], tmp_path / "p"),
        "evaluate": (["evaluate.py", "--policy", "expert", "--data", str(data), "--env", "alfworld", "--num-envs", "1",
                      "--out", str(tmp_path / "e")], tmp_path / "e"),
        "make_data": (["make_data.py", "--env", "bfcl", "--bfcl-train", "2", "--bfcl-test", "1", "--out", str(tmp_path / "d")],
                      tmp_path / "d"),
        "make_conflicts": (["make_conflicts.py", "--data", f"{data}/alfworld_id_test.jsonl", "--pool",
                            f"{data}/alfworld_train.jsonl", "--out", str(conflicts)], conflicts),
    }
    for name, (argv, out) in cases.items():
        holder = hold_lock(out, is_file=name == "make_conflicts")
        try:
            proc = run(*argv, check=False)
            check_fails_cleanly(proc, [str(out), "is being written by pid", str(holder.pid), "one writer"], {})
            assert not out.exists() or out.is_dir() and not os.listdir(out), name  # nothing written
        finally:
            holder.kill()
            holder.wait()
        run(*argv)  # the killed holder's lock is gone with it
    # report.py: its report/ folder
    results = tmp_path / "results"
    run("evaluate.py", "--policy", "expert", "--data", str(data), "--env", "alfworld", "--num-envs", "1",
        "--out", str(results / "eval" / "expert"))
    holder = hold_lock(results / "report")
    try:
        check_fails_cleanly(run("report.py", "--results", str(results), check=False), ["is being written by pid"], {})
    finally:
        holder.kill()
        holder.wait()
    run("report.py", "--results", str(results))


# ----------------------------------------------------------------------------- one configuration per output folder

def test_evaluate_rerun_with_other_settings_is_refused(small_data, tmp_path):
    out = tmp_path / "e"
    argv = ["evaluate.py", "--policy", "expert", "--data", str(small_data[0]), "--env", "alfworld", "--num-envs", "1",
            "--out", str(out)]
    run(*argv, "--max-steps", "8")
    before = files_under(out)
    proc = run(*argv, "--max-steps", "2", "--history", "0", check=False)
    check_fails_cleanly(proc, [str(out), "--history", "one configuration"], {})
    assert files_under(out) == before  # meta.json not rewritten, no episode reused under the new settings
    run(*argv, "--max-steps", "8", "--num-envs", "2")  # a speed-only flag may change: it resumes


def test_probe_rerun_with_other_settings_or_data_or_weights_is_refused(tiny_model, small_data, tiny_run, tmp_path):
    out = tmp_path / "p"
    data = tmp_path / "x_id_test.jsonl"
    shutil.copy(os.path.join(small_data[0], "alfworld_id_test.jsonl"), data)
    argv = ["probe.py", "--model", tiny_model, "--checkpoints", str(tiny_run), "--data", str(data), *PROBE, "--out", str(out)]
    run(*argv)
    before = files_under(out)
    check_fails_cleanly(run(*argv, "--max-thought-tokens", "6", check=False), ["--max-thought-tokens", "4", "6"], {})
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-1]))  # the same file name, other content
    check_fails_cleanly(run(*argv, check=False), [f"input steps {data}", "sha256"], {})
    data.write_text("".join(lines))
    ckpt = tiny_run / "checkpoint-000002" / "adapter_model.safetensors"
    saved = ckpt.read_bytes()
    try:  # a checkpoint retrained in place: other weights under the same name
        from safetensors.torch import load_file, save_file
        weights = load_file(ckpt)
        save_file({k: v + 0.01 for k, v in weights.items()}, ckpt)
        check_fails_cleanly(run(*argv, check=False), ["checkpoint run/checkpoint-000002", "other weights"], {})
    finally:
        ckpt.write_bytes(saved)
    assert files_under(out) == before
    run(*argv, "--batch-size", "1")  # speed-only flags may change


def test_an_output_folder_without_a_record_of_its_making_is_refused(small_data, tmp_path):
    """A folder written by an older version (no made_from in meta.json) holds results of unknown settings."""
    out = tmp_path / "e"
    argv = ["evaluate.py", "--policy", "expert", "--data", str(small_data[0]), "--env", "alfworld", "--num-envs", "1",
            "--out", str(out)]
    run(*argv)
    meta = json.loads((out / "meta.json").read_text())
    del meta["made_from"]
    (out / "meta.json").write_text(json.dumps(meta))
    before = files_under(out)
    check_fails_cleanly(run(*argv, check=False), [str(out / "meta.json"), "made from", "another --out"], {})
    assert files_under(out) == before


def test_make_conflicts_and_make_data_reruns_with_other_settings_are_refused(small_data, tmp_path):
    data = small_data[0]
    conf = ["make_conflicts.py", "--data", f"{data}/alfworld_id_test.jsonl", "--pool", f"{data}/alfworld_train.jsonl",
            "--out", str(tmp_path / "c.jsonl")]
    run(*conf)
    before = snapshot(tmp_path / "c.jsonl", tmp_path / "c.jsonl.meta.json")
    check_fails_cleanly(run(*conf, "--keep-frac", "0.5", check=False), ["--keep-frac", "1.0", "0.5"], before)
    run(*conf, fresh=True)  # the same settings write the same bytes again, in another interpreter
    assert snapshot(tmp_path / "c.jsonl") == {k: v for k, v in before.items() if k.endswith("c.jsonl")}
    mk = ["make_data.py", "--env", "bfcl", "--bfcl-train", "2", "--bfcl-test", "1", "--out", str(tmp_path / "d")]
    run(*mk)
    before = files_under(tmp_path / "d")
    check_fails_cleanly(run(*mk[:-2], "--bfcl-test", "2", "--out", str(tmp_path / "d"), check=False),
                        ["--bfcl-test", "1", "2"], {})
    assert files_under(tmp_path / "d") == before


# ----------------------------------------------------------------------------- report.py pools by identity

def test_report_counts_a_copied_folder_once_and_keeps_same_named_runs_apart(tiny_model, small_data, tmp_path):
    data = f"{small_data[0]}/alfworld_id_test.jsonl"
    results = tmp_path / "results"
    for parent, seed in (("a", "0"), ("b", "1")):
        run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "1",
            "--seed", seed, "--threads", "1", "--out", str(tmp_path / parent / "run"))
        run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(tmp_path / parent / "run"), "--data", data,
            *PROBE, "--out", str(results / "probe" / parent))
    run("report.py", "--results", str(results))
    rows = open(results / "report" / "agreement.csv").read().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["run (a)", "run (b)"]  # two runs, told apart
    md = (results / "report" / "results.md").read_bytes()
    shutil.copytree(results / "probe" / "a", results / "probe" / "a_copy")
    run("report.py", "--results", str(results))
    assert (results / "report" / "results.md").read_bytes() == md  # the copy counted once: same n, same intervals
    # A copy whose records differ from the original's: one configuration, two results -> an error, not a pool.
    recs = (results / "probe" / "a_copy" / "records.jsonl").read_text().splitlines()
    first = json.loads(recs[0])
    first["prompt_correct"] = not first["prompt_correct"]
    (results / "probe" / "a_copy" / "records.jsonl").write_text("\n".join([json.dumps(first)] + recs[1:]) + "\n")
    check_fails_cleanly(run("report.py", "--results", str(results), check=False), ["a_copy", "different results"], {})
    shutil.rmtree(results / "probe" / "a_copy")
    # Two writers' records in one folder: the same id twice.
    shutil.copytree(results / "probe" / "a", results / "probe" / "twice")
    path = results / "probe" / "twice" / "records.jsonl"
    path.write_text(path.read_text() * 2)
    check_fails_cleanly(run("report.py", "--results", str(results), check=False), [str(path), "again", "two writers"], {})


# ----------------------------------------------------------------------------- divergence and non-finite weights

def test_divergence_stops_training_before_a_non_finite_checkpoint(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    proc = run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "6",
               "--batch-size", "2", "--lr", "1e30", "--save-every", "1", "--threads", "1", "--out", str(out), check=False)
    check_fails_cleanly(proc, ["diverged"], {})
    from safetensors.torch import load_file
    for ckpt in sorted(out.glob("checkpoint-*")):  # whatever was saved before the divergence is finite
        assert all(t.isfinite().all() for t in load_file(ckpt / "adapter_model.safetensors").values()), ckpt


def test_probe_and_evaluate_refuse_non_finite_weights(tiny_model, small_data, tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad" / "checkpoint-000002"
    shutil.copytree(tiny_run / "checkpoint-000002", bad)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, bad / "adapter_model.safetensors")
    proc = run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(bad), "--data",
               f"{small_data[0]}/alfworld_id_test.jsonl", *PROBE, "--out", str(tmp_path / "p"), check=False)
    check_fails_cleanly(proc, [str(bad), "non-finite weights"], {})
    assert not (tmp_path / "p" / "records.jsonl").exists()
    proc = run("evaluate.py", "--model", tiny_model, "--adapter", str(bad), "--data", str(small_data[0]), "--env", "alfworld",
               "--max-episodes", "1", "--max-steps", "2", "--num-envs", "1", "--threads", "1", "--out", str(tmp_path / "e"),
               check=False)
    check_fails_cleanly(proc, [str(bad), "non-finite weights"], {})
    assert not (tmp_path / "e" / "episodes.jsonl").exists() or not (tmp_path / "e" / "episodes.jsonl").read_text()


# ----------------------------------------------------------------------------- flags checked at parse time

@pytest.mark.parametrize("flag,value", [("--grad-clip", "-1"), ("--epochs", "inf"), ("--lora-dropout", "1.5"),
                                        ("--target-modules", "q_proj,nothing_proj"), ("--weight-decay", "-5"),
                                        ("--lora-alpha", "0"), ("--lr", "inf")])
def test_train_refuses_bad_numbers(flag, value, tiny_model, small_data, tmp_path):
    proc = run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "1",
               "--threads", "1", flag, value, "--out", str(tmp_path / "run"), check=False)
    check_fails_cleanly(proc, [flag], {})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,flag,value", [("evaluate.py", "--max-steps-factor", "nan"),
                                               ("evaluate.py", "--step-timeout", "inf"),
                                               ("probe.py", "--trunc-fracs", "0.5,0.501"),
                                               ("make_conflicts.py", "--max-per-split", "-1")])
def test_probe_evaluate_conflicts_refuse_bad_numbers(script, flag, value, tiny_model, small_data, tmp_path):
    data = str(small_data[0])
    argv = {"evaluate.py": ["--policy", "expert", "--data", data, "--env", "alfworld"],
            "probe.py": ["--model", tiny_model, "--data", f"{data}/alfworld_id_test.jsonl", *PROBE],
            "make_conflicts.py": ["--data", f"{data}/alfworld_id_test.jsonl", "--pool", f"{data}/alfworld_train.jsonl"]}[script]
    out = tmp_path / ("out.jsonl" if script == "make_conflicts.py" else "out")
    check_fails_cleanly(run(script, *argv, flag, value, "--out", str(out), check=False), [flag], {})
    assert not out.exists()


@pytest.mark.parametrize("script", ["train.py", "probe.py", "evaluate.py", "make_data.py", "make_conflicts.py"])
def test_out_naming_an_existing_file_is_one_line(script, tiny_model, small_data, tmp_path):
    data = str(small_data[0])
    argv = {"train.py": ["--model", tiny_model, "--data", f"{data}/alfworld_train.jsonl", "--max-steps", "1", "--threads", "1"],
            "probe.py": ["--model", tiny_model, "--data", f"{data}/alfworld_id_test.jsonl", *PROBE],
            "evaluate.py": ["--policy", "expert", "--data", data, "--env", "alfworld"],
            "make_data.py": ["--env", "bfcl", "--bfcl-train", "2", "--bfcl-test", "1"],
            "make_conflicts.py": ["--data", f"{data}/alfworld_id_test.jsonl", "--pool", f"{data}/alfworld_train.jsonl"]}[script]
    target = tmp_path / "taken"
    if script == "make_conflicts.py":
        target.mkdir()  # its --out is a file: a folder there is the mistake
    else:
        target.write_text("keep me\n")
    before = snapshot(target) if target.is_file() else {}
    check_fails_cleanly(run(script, *argv, "--out", str(target), check=False), [str(target)], before)
    if target.is_file():  # a place nothing can be written (tests run as root, so not a permission): under a file
        check_fails_cleanly(run(script, *argv, "--out", str(target / "sub"), check=False), ["cannot write there"], before)


# ----------------------------------------------------------------------------- inputs that are not what they claim

@pytest.mark.parametrize("kind", ["not_utf8", "task_id", "candidates"])
def test_bad_step_fields_name_file_and_line(kind, tiny_model, small_data, tmp_path):
    lines = open(os.path.join(small_data[0], "alfworld_id_test.jsonl"), "rb").read().splitlines(keepends=True)
    path = tmp_path / "x_id_test.jsonl"
    rec = json.loads(lines[1])
    if kind == "not_utf8":
        lines[1] = lines[1].replace(b'"thought": "', b'"thought": "\xff\xfe', 1)
        expected = [f"{path}:2", "UTF-8"]
    else:
        lines[1] = (json.dumps(dict(rec, **{kind: 7 if kind == "task_id" else ["go to x", 3]})) + "\n").encode()
        expected = [f"{path}:2", f"'{kind}'"]
    path.write_bytes(b"".join(lines))
    for script, argv in (("probe.py", ["--model", tiny_model, *PROBE]), ("make_conflicts.py", ["--pool", str(path)]),
                         ("train.py", ["--model", tiny_model, "--max-steps", "1", "--threads", "1"])):
        out = tmp_path / f"out_{script}"
        check_fails_cleanly(run(script, *argv, "--data", str(path), "--out", str(out), check=False), expected, {})
        assert not out.exists()


# ----------------------------------------------------------------------------- actions and contexts

def test_unparseable_bfcl_actions_are_invalid_not_exceptions():
    deep = "[f(a=" + "-" * 3000 + "1)]"
    for text in (deep, "[f(a=" + "(" * 500 + "1" + ")" * 500 + ")]", "[f(a=" + "9" * 20000 + ")]", "[" + "a." * 3000 + "f(x=1)]"):
        with pytest.raises(ValueError):
            envs.parse_calls(text)
    task = next(t for t in envs.bfcl_tasks() if t["split"] == "id_test")
    with envs.Bfcl() as env:
        env.reset(task)
        obs, reward, done, info = env.step(deep)
    assert done and reward == 0.0 and not info["won"] and "nested too deeply" in obs


def test_a_flood_of_multi_turn_calls_is_capped_per_step():
    task = next(t for t in envs.bfcl_mt_tasks() if t["split"] == "ood_test" and "GorillaFileSystem" in
                envs.bfcl_mt_entries(t["task_type"])[t["entry_id"]]["involved_classes"])
    with envs.BfclMultiTurn() as env:
        env.reset(task)
        obs, _, _, info = env.step("[" + ", ".join(["ls(a=True)"] * 16) + "]")
    cap = envs.BFCL_MT_STEP_CAP * envs.BFCL_MT_OBS_CAP
    assert not info["invalid"] and len(obs) <= cap + 60 and obs.endswith(" more characters cut]")


def test_a_checkpoint_naming_a_missing_base_model_is_an_error(tiny_model, small_data, tiny_run, tmp_path):
    ckpt = tmp_path / "other" / "checkpoint-000002"
    shutil.copytree(tiny_run / "checkpoint-000002", ckpt)
    os.remove(ckpt / "meta.json")  # another trainer's checkpoint: only its adapter config names the base
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nonexistent/base-model"
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "p"
    proc = run("probe.py", "--no-base", "--checkpoints", str(ckpt), "--data", f"{small_data[0]}/alfworld_id_test.jsonl",
               *PROBE, "--out", str(out), check=False)
    check_fails_cleanly(proc, ["/nonexistent/base-model", "--model"], {})
    assert not out.exists()
    proc = run("evaluate.py", "--adapter", str(ckpt), "--data", str(small_data[0]), "--env", "alfworld", "--max-episodes", "1",
               "--out", str(tmp_path / "e"), check=False)
    check_fails_cleanly(proc, ["/nonexistent/base-model"], {})
    assert not (tmp_path / "e").exists()


def test_an_adapter_trained_on_another_base_model_is_refused(tiny_model, small_data, tiny_run, tmp_path):
    ckpt = str(tiny_run / "checkpoint-000002")
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(tiny_model, same)  # the same weights in another folder: the same base model
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5)))  # loads the adapter without a word
    data = f"{small_data[0]}/alfworld_id_test.jsonl"
    proc = run("probe.py", "--model", str(other), "--no-base", "--checkpoints", ckpt, "--data", data, *PROBE,
               "--out", str(tmp_path / "p"), check=False)
    check_fails_cleanly(proc, [ckpt, "was trained on", str(other)], {})
    proc = run("evaluate.py", "--model", str(other), "--adapter", ckpt, "--data", str(small_data[0]), "--env", "alfworld",
               "--max-episodes", "1", "--out", str(tmp_path / "e"), check=False)
    check_fails_cleanly(proc, [ckpt, "was trained on", str(other)], {})
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()
    run("probe.py", "--model", str(same), "--no-base", "--checkpoints", ckpt, "--data", data, *PROBE,
        "--out", str(tmp_path / "p2"))


# ----------------------------------------------------------------------------- signals and file modes

def test_ctrl_c_is_one_line_and_resumable(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    argv = ["train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "100000",
            "--batch-size", "1", "--save-every", "1", "--log-every", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err[-2000:]
    assert "stopped by SIGINT; rerun the same command to resume" in err
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert "resumed from" in run(*argv, "--resume", "--stop-at-step", str(last + 1)).stdout


def test_adapter_weights_take_the_umask_mode(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["sh", "-c", f"umask 022 && exec {sys.executable} train.py --model {tiny_model} --data "
                                f"{small_data[0]}/alfworld_train.jsonl --max-steps 1 --threads 1 --out {out}"],
                   cwd=ROOT, check=True, capture_output=True)
    for path in (out / "checkpoint-000001").iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name


def test_two_first_runs_convert_the_embedded_model_once(tmp_path):
    """A run that finds another converting the embedded model waits for its lock, then uses its folder
    (here a stand-in the holder writes) instead of converting over it."""
    import fcntl
    folder = tmp_path / "SmolLM2-135M-Instruct"
    with open(str(folder) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a first run, converting
        waiter = subprocess.Popen([sys.executable, "-c", "import lm; print(lm.resolve_model(lm.EMBEDDED))"], cwd=ROOT,
                                  env={**os.environ, "AGENTCOT_CACHE": str(tmp_path)}, stdout=subprocess.PIPE, text=True)
        time.sleep(8)  # past its imports: it is now waiting on the lock
        assert waiter.poll() is None
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and out.strip() == str(folder)
    assert sorted(os.listdir(tmp_path)) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]


# ----------------------------------------------------------------------------- a run's identity, everywhere

def test_two_runs_of_one_name_in_one_call_are_refused_and_a_repeat_taken_once(tiny_model, small_data, tiny_run, tmp_path):
    other = tmp_path / "b" / "run"
    shutil.copytree(tiny_run, other)  # another folder, the same name
    data = f"{small_data[0]}/alfworld_id_test.jsonl"
    proc = run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(tiny_run), str(other), "--data", data,
               *PROBE, "--out", str(tmp_path / "p"), check=False)
    check_fails_cleanly(proc, [str(tiny_run), str(other), "run/checkpoint-000001"], {})
    proc = run("evaluate.py", "--model", tiny_model, "--adapter", str(tiny_run), str(other), "--data", str(small_data[0]),
               "--env", "alfworld", "--max-episodes", "1", "--max-steps", "1", "--num-envs", "1", "--threads", "1",
               "--out", str(tmp_path / "e"), check=False)
    check_fails_cleanly(proc, [str(tiny_run), str(other)], {})
    # The same run twice (another spelling of its path): probed once, with a note.
    proc = run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(tiny_run), f"{tiny_run}/../run/", "--data",
               data, *PROBE, "--out", str(tmp_path / "p"))
    assert "taken once" in proc.stderr
    recs = [json.loads(line) for line in open(tmp_path / "p" / "records.jsonl")]
    assert len(recs) == len({r["id"] for r in recs}) == 2 * 2  # 2 checkpoints x 2 records, none twice


def test_report_refuses_two_runs_one_k_and_seed_and_two_base_models(tiny_model, small_data, tmp_path):
    data = f"{small_data[0]}/alfworld_id_test.jsonl"
    results = tmp_path / "results"
    for name, lr in (("lr_a", "1e-3"), ("lr_b", "1e-2")):  # k=0, seed 0 both, other learning rates
        run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "1",
            "--lr", lr, "--threads", "1", "--out", str(tmp_path / name / "k0.0_seed0"))
        run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(tmp_path / name / "k0.0_seed0"),
            "--data", data, *PROBE, "--out", str(results / "probe" / name))
    check_fails_cleanly(run("report.py", "--results", str(results), check=False),
                        ["k=0.0, seed 0", "lr_a", "lr_b", "separate --results"], {})
    # Two base models (other weights) would be averaged as one 'base' row.
    import torch
    from safetensors.torch import load_file, save_file
    shutil.rmtree(results / "probe" / "lr_b")
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    del torch
    for name, model in (("base_a", tiny_model), ("base_b", str(other))):
        run("probe.py", "--model", model, "--data", data, *PROBE, "--out", str(results / "probe" / name))
    check_fails_cleanly(run("report.py", "--results", str(results), check=False), ["two base models", "base_a", "base_b"], {})


def test_report_refuses_an_output_still_being_written(tiny_model, small_data, tmp_path):
    results = tmp_path / "results"
    run("probe.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_id_test.jsonl", *PROBE,
        "--out", str(results / "probe" / "base"))
    holder = hold_lock(results / "probe" / "base")
    try:
        check_fails_cleanly(run("report.py", "--results", str(results), check=False),
                            [str(results / "probe" / "base"), "still being written", f"pid {holder.pid}"], {})
    finally:
        holder.kill()
        holder.wait()
    run("report.py", "--results", str(results))


def test_the_lock_belongs_to_the_real_folder(tiny_model, small_data, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "run").mkdir()
    os.symlink(tmp_path / "w" / "run", tmp_path / "w" / "alias")
    holder = hold_lock(tmp_path / "w" / "run")
    try:
        proc = run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "1",
                   "--mask-action-frac", "0.3", "--threads", "1", "--out", str(tmp_path / "w" / "alias"), check=False)
        check_fails_cleanly(proc, ["being written", f"pid {holder.pid}"], {})
    finally:
        holder.kill()
        holder.wait()
    assert not os.listdir(tmp_path / "w" / "run")


def test_an_adapter_digest_does_not_depend_on_set_order(tiny_run, tmp_path):
    import provenance
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoint-000002", ckpt)
    before = provenance.folder_digest(str(ckpt))
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["target_modules"] = list(reversed(sorted(config["target_modules"])))
    (ckpt / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    assert provenance.folder_digest(str(ckpt)) == before
    config["lora_alpha"] += 1  # a setting that changes what the weights compute: another identity
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    assert provenance.folder_digest(str(ckpt)) != before


@pytest.mark.parametrize("fault", ["missing", "renamed", "misshapen"])
def test_only_whole_adapters_load(fault, tiny_model, small_data, tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad" / "checkpoint-000002"
    shutil.copytree(tiny_run / "checkpoint-000002", bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = sorted(weights)[0]
    if fault == "missing":
        del weights[key]
    elif fault == "renamed":
        weights[key.replace("layers.0.", "layers.7.")] = weights.pop(key)
    else:
        weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, bad / "adapter_model.safetensors")
    proc = run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(bad), "--data",
               f"{small_data[0]}/alfworld_id_test.jsonl", *PROBE, "--out", str(tmp_path / "p"), check=False)
    check_fails_cleanly(proc, [str(bad / "adapter_model.safetensors")], {})
    assert not (tmp_path / "p" / "records.jsonl").exists() or not (tmp_path / "p" / "records.jsonl").read_text()


def test_a_finite_divergence_is_caught(tiny_model, small_data, tiny_run, tmp_path):
    """--lr 1e30 for one step leaves weights near 1e30, finite: training refuses to save them, and probe and
    evaluate refuse such a checkpoint by its non-finite log-probabilities."""
    out = tmp_path / "run"
    proc = run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "1",
               "--lr", "1e30", "--threads", "1", "--out", str(out), check=False)
    check_fails_cleanly(proc, ["diverged", "1000x"], {})
    assert not list(out.glob("checkpoint-*"))
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad" / "checkpoint-000002"
    shutil.copytree(tiny_run / "checkpoint-000002", bad)
    save_file({k: v * 1e20 for k, v in load_file(bad / "adapter_model.safetensors").items()}, bad / "adapter_model.safetensors")
    proc = run("probe.py", "--model", tiny_model, "--no-base", "--checkpoints", str(bad), "--data",
               f"{small_data[0]}/alfworld_id_test.jsonl", *PROBE, "--out", str(tmp_path / "p"), check=False)
    check_fails_cleanly(proc, [str(bad), "non-finite log-probabilities"], {})
    proc = run("evaluate.py", "--model", tiny_model, "--adapter", str(bad), "--data", str(small_data[0]), "--env", "alfworld",
               "--max-episodes", "1", "--max-steps", "1", "--num-envs", "1", "--threads", "1", "--out", str(tmp_path / "e"),
               check=False)
    check_fails_cleanly(proc, [str(bad), "non-finite log-probabilities"], {})


def test_the_random_baseline_does_not_depend_on_num_envs_or_a_resume(small_data, tmp_path):
    def episodes(out, *extra):
        run("evaluate.py", "--policy", "random", "--data", str(small_data[0]), "--env", "alfworld,bfcl", "--max-steps", "4",
            "--seed", "2", "--out", str(out), *extra)
        return {r["id"]: [s["action"] for s in r["transcript"]] for r in map(json.loads, open(out / "episodes.jsonl"))}
    one = episodes(tmp_path / "one", "--num-envs", "1")
    assert len(one) >= 4 and any(len(set(a)) > 1 for a in one.values())
    assert episodes(tmp_path / "three", "--num-envs", "3") == one
    lines = (tmp_path / "one" / "episodes.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "one" / "episodes.jsonl").write_text("".join(lines[:1]))  # a run killed after its first episode
    assert episodes(tmp_path / "one", "--num-envs", "2") == one


def test_train_refuses_test_splits_and_a_resumed_log_equals_an_unbroken_one(tiny_model, small_data, tmp_path):
    proc = run("train.py", "--model", tiny_model, "--data", f"{small_data[0]}/*.jsonl", "--max-steps", "1", "--threads", "1",
               "--out", str(tmp_path / "all"), check=False)
    check_fails_cleanly(proc, ["id_test", "--any-split"], {})
    common = ["train.py", "--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "6",
              "--batch-size", "2", "--log-every", "4", "--threads", "1"]
    run(*common, "--out", str(tmp_path / "a"))
    run(*common, "--stop-at-step", "3", "--out", str(tmp_path / "b"))
    run(*common, "--resume", "--out", str(tmp_path / "b"))

    def log(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in log(tmp_path / "a")] == [4, 6] and log(tmp_path / "b") == log(tmp_path / "a")
