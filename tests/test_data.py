"""Foundation: step format, the three environments with their experts, make_data.py's output."""
import collections
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import warnings

import pytest

import envs
import jsonio
import steps
from conftest import ROOT, SMALL, run

REAL_ALFWORLD = os.path.join(ROOT, "..", "shared", "data", "alfworld_valid_seen.tar.gz")


# ----------------------------------------------------------------------------- step format

def test_response_roundtrip_and_spans():
    thought, action = "The mug is here. I need it.", "take mug 1 from cabinet 2"
    text = steps.format_response(thought, action)
    assert text == "Thought: The mug is here. I need it.\nAction: take mug 1 from cabinet 2"
    assert steps.parse_response(text) == (thought, action)
    spans = steps.response_spans(thought, action)
    assert text[slice(*spans["thought"])] == thought
    assert text[slice(*spans["tag"])] == "Action:"
    assert text[slice(*spans["action"])] == action
    assert steps.parse_response("I ramble without a tag") == ("I ramble without a tag", None)
    assert steps.normalize_action("  Take  Mug 1 from Cabinet 2. ") == "take mug 1 from cabinet 2"
    assert steps.same_action("Take mug 1 from cabinet 2.", "take  mug 1 from cabinet 2")
    # two failures to act (no tag, or nothing after it) are not an agreement
    assert not steps.same_action("", " ") and not steps.same_action(None, None) and not steps.same_action("", None)


def test_build_messages_window():
    obs = [f"o{i}" for i in range(6)]
    acts = [f"a{i}" for i in range(5)]
    msgs = steps.build_messages("alfworld", "t", obs, acts, window=2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "[3 earlier steps omitted]" in msgs[1]["content"]
    assert msgs[2]["content"] == "Action: a3" and msgs[-1]["content"] == "o5"


def test_read_jsonl_names_file_line_and_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a"}\n{not json}\n')
    with pytest.raises(jsonio.DataError, match=r"x.jsonl:2: not valid JSON"):
        jsonio.read_jsonl(str(p))
    p.write_text('{"id": "a"}\n')
    with pytest.raises(jsonio.DataError, match=r"x.jsonl:1: missing field 'action'"):
        jsonio.read_jsonl(str(p), required=("id", "action"))


# ----------------------------------------------------------------------------- make_data.py output

def load_dir(out):
    recs = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            recs[name] = steps.read_steps(os.path.join(out, name))
    return recs


def test_same_seed_is_byte_identical(small_data):
    """The same command twice, once with --jobs 2 (conftest), writes the same bytes."""
    a, b = small_data
    names = sorted(n for n in os.listdir(a) if n.endswith(".jsonl"))
    assert names == sorted(n for n in os.listdir(b) if n.endswith(".jsonl"))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    meta = [json.loads((d / "meta.json").read_text()) for d in (a, b)]
    for m in meta:
        m["args"].pop("out")  # the one argument that differs between the two runs
    assert meta[0] == meta[1]


def test_schema_and_split_separation(small_data):
    recs = load_dir(small_data[0])
    assert set(recs) == {f"{e}_{s}.jsonl" for e in ("alfworld", "bfcl") for s in steps.SPLITS}
    seen_ids, episodes = set(), {}
    for name, rows in recs.items():
        env, split = name[:-len(".jsonl")].split("_", 1)
        assert rows, f"{name} is empty"
        for r in rows:
            assert r["env"] == env and r["split"] == split
            assert r["id"] not in seen_ids
            seen_ids.add(r["id"])
            episodes.setdefault(r["task_id"], set()).add(split)
            if env == "alfworld":
                assert r["action"] in r["candidates"]
                assert (split == "ood_test") == (r["task_type"] in envs.ALFWORLD_OOD)
            if env == "bfcl":
                assert (split == "ood_test") == (r["task_type"] in envs.BFCL_OOD)
    # An episode (game, variation, item) lives in exactly one split.
    assert all(len(s) == 1 for s in episodes.values())
    # No test game shares its problem with a training game.
    games = os.path.join(small_data[0], "alfworld_games")
    problems = {}
    for split in os.listdir(games):
        for root, _, files in os.walk(os.path.join(games, split)):
            if "game.tw-pddl" in files:
                with open(os.path.join(root, "game.tw-pddl")) as f:
                    problems.setdefault(json.load(f)["pddl_problem"].split("\n", 1)[1], set()).add(split)
    assert all(len(s) == 1 for s in problems.values())
    # Training never sees an OOD task type.
    train_types = {r["task_type"] for r in recs["alfworld_train.jsonl"] + recs["bfcl_train.jsonl"]}
    assert not train_types & (set(envs.ALFWORLD_OOD) | set(envs.BFCL_OOD))


def test_thoughts_explain_and_never_restate_the_action(small_data):
    recs = [r for rows in load_dir(small_data[0]).values() for r in rows]
    for r in recs:
        assert len(r["thought"].split()) >= 8, r["thought"]
        assert steps.normalize_action(r["action"]) not in r["thought"].lower(), r
        assert "{" not in r["thought"], r["thought"]  # every template field was filled
    alf = [r for r in recs if r["env"] == "alfworld"]
    # Varied wording: the same situation is written in more than one way.
    takes = {r["thought"].replace(r["action"].split()[1], "X") for r in alf if r["thought_kind"] == "take"}
    assert len({t.split()[0] for t in takes}) >= 2 or len(takes) >= 2


def test_generated_alfworld_games_are_won_by_the_expert(small_data):
    """Every generated game of every type, replayed from its stored walkthrough, is won."""
    tasks = envs.alfworld_tasks(os.path.join(small_data[0], "alfworld_games"))
    assert {t["task_type"] for t in tasks} == set(envs.ALL_ALFWORLD_TYPES)
    with envs.AlfWorld() as env:
        for task in tasks:
            env.reset(task)
            plan = env.expert_plan()
            assert plan
            for a in plan:
                assert a in env.valid_actions(), (task["id"], a)
                obs, reward, done, info = env.step(a)
            assert info["won"] and done, task["id"]


def test_searching_expert_looks_before_it_finds(tmp_path):
    """--alfworld-search: the expert visits other receptacles that could hold what it seeks before the one
    where it is; every action is admissible where it is taken, every episode is still won when replayed,
    and the search steps are reasoned as searches."""
    out = tmp_path / "d"
    run("make_data.py", "--env", "alfworld", "--seed", "1", "--out", str(out), "--alfworld-train-per-type", "1",
        "--alfworld-test-per-type", "1", "--alfworld-search", "2")  # 10 episodes
    meta = json.loads((out / "meta.json").read_text())["alfworld"]
    assert meta["expert_failed"] == 0 and meta["search_fallbacks"] <= 3
    recs = [r for rows in load_dir(out).values() for r in rows]
    episodes = {}
    for r in recs:
        assert r["action"] in r["candidates"], r["id"]
        episodes.setdefault(r["task_id"], []).append(r)
    kinds = collections.Counter(r["thought_kind"] for r in recs)
    assert kinds["search_next"] >= 3, kinds
    games = {t["id"]: t for t in envs.alfworld_tasks(str(out / "alfworld_games"))}
    detoured = 0
    with envs.AlfWorld() as env:
        for tid, rows in episodes.items():
            env.reset(games[tid])
            plan = [r["action"] for r in sorted(rows, key=lambda r: r["step"])]
            detoured += len(plan) > len(env.expert_plan())
            for a in plan:
                _, _, done, info = env.step(a)
            assert info["won"] and done, tid
    assert detoured >= len(episodes) // 3


def test_alfworld_planner_solves_fresh_games(tmp_path):
    """A game without a walkthrough is planned at reset (Fast Downward) and the plan wins."""
    import alfgen
    for i, tt in enumerate(("pick_heat_then_place_in_recep", "look_at_obj_in_light")):
        game = alfgen.make_game(random.Random(100 + i), tt, f"g{i}")
        path = tmp_path / tt / "trial_0" / "game.tw-pddl"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(game))
        with envs.AlfWorld() as env:
            obs, info = env.reset({"game": str(path)})
            assert info["task"] in game["grammar"]
            for a in env.expert_plan():
                *_, step_info = env.step(a)
            assert step_info["won"]


@pytest.mark.skipif(not os.path.exists(REAL_ALFWORLD), reason="the shared real ALFWorld games are not on this machine")
def test_real_alfworld_data_path(tmp_path):
    """The real dataset layout (json_2.1.1/valid_seen/...) loads, splits, and its walkthroughs win."""
    with tarfile.open(REAL_ALFWORLD) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("game.tw-pddl")]
        picked, per_type = [], {}
        for m in sorted(members, key=lambda m: m.name):
            tt = m.name.split("/")[2].split("-")[0]
            if per_type.get(tt, 0) < 1:
                per_type[tt] = per_type.get(tt, 0) + 1
                picked.append(m)
        tar.extractall(tmp_path, members=picked, filter="data")
    out = tmp_path / "out"
    run("make_data.py", "--env", "alfworld", "--alfworld-data", str(tmp_path), "--out", str(out))
    recs = load_dir(out)
    assert {r["task_type"] for r in recs["alfworld_ood_test.jsonl"]} == set(envs.ALFWORLD_OOD)
    assert len({r["task_id"] for r in recs["alfworld_id_test.jsonl"]}) == 4
    assert recs["alfworld_train.jsonl"] == []  # valid_seen is a test folder: nothing of it is trained on


# ----------------------------------------------------------------------------- ScienceWorld

def test_sciworld_expert_scores_100_and_jvm_closes():
    tasks = {t["task_name"]: t for t in envs.sciworld_tasks() if t["split"] != "train"}
    env = envs.ScienceWorld()
    proc = env._env._gateway.java_process
    try:
        for name in ("find-living-thing", "use-thermometer", "chemistry-mix", "test-conductivity"):
            obs, info = env.reset(tasks[name])
            assert info["task"].startswith("Your task is to")
            for a in env.expert_plan():
                obs, reward, done, step_info = env.step(a)
            assert step_info["score"] == 1.0 and step_info["won"], name
            assert env.valid_actions()
    finally:
        env.close()
    proc.wait(timeout=20)
    assert proc.poll() is not None


def test_sciworld_data_is_deterministic_and_split(sci_data, tmp_path):
    """ScienceWorld worlds depend on the JVM's history of loads; make_data runs them in a fixed
    order, so the same command writes the same bytes (sci_data was made by the same command)."""
    def same(out):
        return all((sci_data / f"scienceworld_{s}.jsonl").read_bytes() == (out / f"scienceworld_{s}.jsonl").read_bytes()
                   for s in steps.SPLITS)
    # Seen once in a loaded full-suite run (2026-12-02), not in 6 runs alone: ScienceWorld's own gold path chose
    # another living thing (focus on crocodile, not egg turtle), its Java engine's hash order differing between
    # JVMs. Such a run is repeated once, with a warning; a difference of this project's own would repeat.
    for attempt in range(2):
        out = tmp_path / f"b{attempt}"
        run("make_data.py", "--env", "scienceworld", "--sciworld-tasks", "find-living-thing,find-animal", "--seed", "5",
            "--out", str(out), fresh=True)  # another interpreter than sci_data's
        if same(out) or attempt:
            break
        warnings.warn("ScienceWorld data differed from the same command's (the engine's gold path); repeating once")
    assert same(out)
    rows = {s: steps.read_steps(str(sci_data / f"scienceworld_{s}.jsonl")) for s in steps.SPLITS}
    assert {r["task_type"] for r in rows["ood_test"]} == {"find-animal"}  # 4-4, last task of its topic
    assert {r["task_type"] for r in rows["train"] + rows["id_test"]} == {"find-living-thing"}
    for r in rows["train"]:
        assert r["action"] in r["candidates"] and len(r["candidates"]) <= 20
    proc = run("make_data.py", "--env", "scienceworld", "--sciworld-tasks", "fly-to-mars", "--out", str(tmp_path / "c"),
               check=False)
    assert proc.returncode != 0 and "unknown ScienceWorld task(s) in --sciworld-tasks: fly-to-mars" in proc.stderr


def test_sciworld_jvm_does_not_outlive_a_crash():
    code = ("import envs, sys\nenv = envs.ScienceWorld()\n"
            "print(env._env._gateway.java_process.pid, flush=True)\nraise RuntimeError('boom')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "boom" in proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.time() + 20
    while time.time() < deadline and os.path.exists(f"/proc/{pid}") and "java" in open(f"/proc/{pid}/cmdline").read():
        time.sleep(0.5)
    alive = os.path.exists(f"/proc/{pid}") and "java" in open(f"/proc/{pid}/cmdline").read()
    assert not alive, "the ScienceWorld JVM outlived its Python process"


# ----------------------------------------------------------------------------- BFCL

def test_bfcl_ground_truth_passes_the_checker():
    tasks = envs.bfcl_tasks()
    env = envs.Bfcl()
    passed = 0
    for task in tasks:
        env.reset(task)
        *_, info = env.step(env.expert_plan()[0])
        passed += info["won"]
    # A handful of BFCL items have ground truths their own checker rejects; make_data drops them.
    assert passed >= 0.99 * len(tasks)
    env.reset(tasks[0])
    assert env.step("[nonexistent_function(x=1)]")[1] == 0.0


def test_bfcl_output_is_parsed_never_run():
    assert envs.parse_calls("[a.b(x=1, y='s'), c(z=[1, 2])]") == [{"a.b": {"x": 1, "y": "s"}}, {"c": {"z": [1, 2]}}]
    for bad in ("__import__('os').system('echo hacked')", "[f(x=open('/etc/passwd').read())]", "[f(1)]"):
        with pytest.raises(ValueError):
            envs.parse_calls(bad)


# ----------------------------------------------------------------------------- import and bad input

def test_eto_import(tmp_path):
    conv = [{"id": "alf_7", "conversations": [
        {"from": "human", "value": "Interact with a household... Your task is to: put a mug on shelf."},
        {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "You are in the middle of a room."},
        {"from": "gpt", "value": "Thought: A mug is often in a cabinet.\nAction: go to cabinet 1"},
        {"from": "human", "value": "You arrive at cabinet 1. You see a mug 1."},
        {"from": "gpt", "value": "Thought: Here it is.\nAction: take mug 1 from cabinet 1"}]}]
    src = tmp_path / "eto.json"
    src.write_text(json.dumps(conv))
    run("make_data.py", "--import-eto", str(src), "--import-env", "alfworld", "--out", str(tmp_path))
    recs = steps.read_steps(str(tmp_path / "import_eto_train.jsonl"))
    assert [r["action"] for r in recs] == ["go to cabinet 1", "take mug 1 from cabinet 1"]
    assert recs[1]["messages"][-1]["content"] == "You arrive at cabinet 1. You see a mug 1."
    assert recs[1]["messages"][2]["content"] == "Action: go to cabinet 1"
    assert "put a mug on shelf" in recs[0]["messages"][1]["content"]


@pytest.mark.parametrize("argv, message", [
    (["--env", "minecraft"], "unknown environment 'minecraft'"),
    (["--env", "alfworld", "--alfworld-data", "/nonexistent/alfworld"], "ALFWorld games folder not found: /nonexistent/alfworld"),
    (["--env", "bfcl_mt", "--bfcl-mt-obs-cap", "0"], "--bfcl-mt-obs-cap must be at least 1"),
    (["--env", "bfcl_mt", "--bfcl-mt-test", "-1"], "--bfcl-mt-test must be at least 0"),
    (["--env", "alfworld", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_input_exits_nonzero_with_a_clear_message(tmp_path, argv, message):
    proc = run("make_data.py", *argv, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert not list(tmp_path.glob("*.jsonl"))


def test_malformed_import_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"conversations": [{"from": "human", "value": "x"}]}\n{"conversations": oops}\n')
    (tmp_path / "import_bad_train.jsonl").write_text("keep me\n")
    proc = run("make_data.py", "--import-eto", str(src), "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and "bad.jsonl:2: not valid JSON" in proc.stderr
    assert (tmp_path / "import_bad_train.jsonl").read_text() == "keep me\n"  # nothing half-written


def test_every_script_help_exits_zero():
    """Every script (a .py file with an argparse block; the shared modules have none) answers --help."""
    scripts = sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and "argparse.ArgumentParser(" in open(os.path.join(ROOT, f)).read())
    assert {"train.py", "probe.py", "evaluate.py", "make_conflicts.py", "make_data.py", "report.py"} <= set(scripts)
    for script in scripts:
        assert run(script, "--help").returncode == 0, script
