"""make_data.py --import-eto on the real ALFWorld games: both conversation shapes, replay in the game
(candidates = the game's admissible commands, splits by task type), ALFWorld 0.3 <-> 0.4 wording, and
trajectories that do not replay dropped and counted. Skipped where ../shared/data/ has no real games."""
import json
import os
import tarfile

import pytest

import envs
import jsonio
import steps
from conftest import ROOT, run

SHARED = os.path.join(ROOT, "..", "shared", "data")
TARBALLS = [os.path.join(SHARED, f"alfworld_{n}.tar.gz") for n in ("valid_seen", "train")]
real_games = pytest.mark.skipif(not all(map(os.path.exists, TARBALLS)), reason="the shared real ALFWorld games are not here")


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    """One real game per task type from train/ (two held-out types are ood_test there) and two from valid_seen/."""
    root = tmp_path_factory.mktemp("alfworld")
    for tarball, per_type, types in ((TARBALLS[0], 1, ("pick_and_place_simple", "pick_clean_then_place_in_recep")),
                                     (TARBALLS[1], 1, envs.ALL_ALFWORLD_TYPES)):
        with tarfile.open(tarball) as tar:
            picked, seen = [], {}
            for m in tar:
                parts = m.name.split("/")
                if m.name.endswith("game.tw-pddl") and parts[2].split("-")[0] in types:
                    tt = parts[2].split("-")[0]
                    if seen.get(tt, 0) < per_type:
                        seen[tt] = seen.get(tt, 0) + 1
                        picked.append(m)
                if len(picked) == per_type * len(types):
                    break
            tar.extractall(root, members=picked, filter="data")
    return root


def eto_item(task, shape):
    """An ETO-shaped trajectory of a game's walkthrough, in ALFWorld 0.3 wording, with written thoughts."""
    with envs.AlfWorld() as env:
        obs, info = env.reset(task)
        turns = [("human", "Interact with a household to solve a task. ..."), ("gpt", "OK"), ("human", obs)]
        for i, action in enumerate(env.expert_plan()):
            turns.append(("gpt", f"Thought: step {i + 1} toward the goal: {info['task']}\nAction: {envs.alfworld_v3(action)}"))
            obs, _, done, _ = env.step(action)
            turns.append(("human", "Observation: " + obs.replace(" to the ", " in/on the ").replace("You move", "You put")))
    rel = task["game"].split("json_2.1.1/")[1]
    item = {"id": task["id"].split("/")[-2], "game_file": f"data/json_2.1.1/{rel}"}
    if shape == "eto":
        item["conversations"] = [{"from": who, "value": text} for who, text in turns]
    else:  # the OpenAI-messages shape, with a system turn
        item["messages"] = [{"role": "system", "content": "You are a household agent."}] + [
            {"role": "user" if who == "human" else "assistant", "content": text} for who, text in turns]
    return item


@real_games
def test_wording_maps_both_ways(games):
    for v3, v4 in (("put mug 1 in/on shelf 2", "move mug 1 to shelf 2"), ("put apple 2 in fridge 1", "move apple 2 to fridge 1"),
                   ("put soapbar 1 on toilet 1", "move soapbar 1 to toilet 1")):
        assert envs.alfworld_v4(v3) == v4 and envs.alfworld_v4(envs.alfworld_v3(v4)) == v4
    for same in ("go to shelf 1", "take mug 1 from shelf 1", "use desklamp 1", "heat egg 1 with microwave 1", "look"):
        assert envs.alfworld_v4(same) == same == envs.alfworld_v3(same)
    # The installed game takes either wording: a walkthrough written in 0.3 wording still wins.
    task = next(t for t in envs.alfworld_tasks(str(games / "json_2.1.1")) if t["task_type"] == "pick_and_place_simple")
    with envs.AlfWorld() as env:
        env.reset(task)
        plan = env.expert_plan()
        assert any(a.startswith("move ") for a in plan)
        for a in plan:
            *_, info = env.step(envs.alfworld_v3(a))
        assert info["won"]


@real_games
def test_import_replays_in_the_real_games(games, tiny_model, tmp_path):
    tasks = envs.alfworld_tasks(str(games / "json_2.1.1"))
    items = [eto_item(t, "eto" if i % 2 else "openai") for i, t in enumerate(tasks)]
    bad = json.loads(json.dumps(items[0]))  # a trajectory that does not replay: an action the game does not admit
    bad["id"] = "diverges"
    turns = bad.get("conversations") or bad["messages"]
    key = "value" if "conversations" in bad else "content"
    first = next(t for t in turns if "Action:" in t[key])
    first[key] = "Thought: maybe there.\nAction: go to spaceship 1"
    gone = dict(items[1], id="elsewhere", game_file="data/json_2.1.1/train/pick_and_place_simple-X-None-Y-1/trial_0/game.tw-pddl")
    src = tmp_path / "alfworld_sft.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in [bad] + items + [gone]))  # bad's game replays after it
    out = tmp_path / "eto"
    proc = run("make_data.py", "--import-eto", str(src), "--alfworld-data", str(games), "--out", str(out))
    assert f"imported {len(items)} of {len(items) + 2} trajectories" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["imported"]["diverged"] == 1 and meta["imported"]["game not found"] == 1
    recs = {s: steps.read_steps(str(out / f"alfworld_{s}.jsonl")) for s in steps.SPLITS}
    by_type = {s: {r["task_type"] for r in rs} for s, rs in recs.items()}
    assert by_type["ood_test"] == set(envs.ALFWORLD_OOD)  # held-out types are out-of-domain wherever they are
    assert by_type["id_test"] == {"pick_and_place_simple", "pick_clean_then_place_in_recep"}  # valid_seen
    assert by_type["train"] == set(envs.ALL_ALFWORLD_TYPES) - set(envs.ALFWORLD_OOD)
    assert "diverges" not in json.dumps(recs)
    # Each step: the installed wording, and the game's admissible commands at that state as candidates.
    moves = 0
    with envs.AlfWorld() as env:
        for task in tasks:
            steps_of = [r for rs in recs.values() for r in rs if r["task_id"] == task["id"]]
            env.reset(task)
            for r in sorted(steps_of, key=lambda r: r["step"]):
                assert r["candidates"] == sorted(env.valid_actions()) and r["action"] in r["candidates"]
                assert not r["action"].startswith("put ")
                moves += r["action"].startswith("move ")
                env.step(r["action"])
    assert moves >= len(tasks)
    # The imported folder trains and rolls out as it is.
    run("train.py", "--model", tiny_model, "--data", str(out / "alfworld_train.jsonl"), "--max-steps", "1",
        "--threads", "1", "--out", str(tmp_path / "run"))
    run("evaluate.py", "--policy", "expert", "--data", str(out), "--env", "alfworld", "--num-envs", "2",
        "--out", str(tmp_path / "expert"))
    episodes = [json.loads(x) for x in open(tmp_path / "expert" / "episodes.jsonl")]
    assert len(episodes) == len({r["task_id"] for s in ("id_test", "ood_test") for r in recs[s]})
    assert all(e["won"] for e in episodes)


@real_games
def test_import_without_games_says_what_is_missing(games, tmp_path):
    task = envs.alfworld_tasks(str(games / "json_2.1.1"))[0]
    src = tmp_path / "a.json"
    src.write_text(json.dumps([eto_item(task, "openai")]))
    proc = run("make_data.py", "--import-eto", str(src), "--out", str(tmp_path / "o"))
    meta = json.loads((tmp_path / "o" / "import_a_train.jsonl.meta.json").read_text())
    assert "--alfworld-data" in meta["imported"]["missing"] and "--alfworld-data" in proc.stdout
    recs = steps.read_steps(str(tmp_path / "o" / "import_a_train.jsonl"))
    assert recs and all(r["candidates"] is None for r in recs)


def test_sciworld_import_replays_in_the_environment(tmp_path):
    """ETO's ScienceWorld ids ('<n>_<variation>') name task and variation: replayed like ALFWorld's games."""
    tasks = {t["id"]: t for t in envs.sciworld_tasks(every_ood_variation=True)}
    picks = [("12", "find-living-thing", "train"), ("11", "find-animal", "ood_test")]
    items = []
    with envs.ScienceWorld() as env:
        for n, name, split in picks:
            task = next(t for t in tasks.values() if t["task_name"] == name and t["split"] == split)
            obs, info = env.reset(task)
            turns = [("human", "You are a helpful assistant to do some scientific experiment..."), ("gpt", "OK"),
                     ("human", info["task"] + "\n" + obs)]
            for i, action in enumerate(env.expert_plan()):
                turns.append(("gpt", f"Thought: step {i + 1} of the plan.\nAction: {action}"))
                obs, *_ = env.step(action)
                turns.append(("human", "Observation: " + obs))
            items.append({"id": f"{n}_{task['variation']}", "conversations": [{"from": w, "value": v} for w, v in turns]})
    items.append(dict(items[0], id="99_0"))  # no such task number
    src = tmp_path / "sciworld_sft.json"
    src.write_text(json.dumps(items))
    out = tmp_path / "sw"
    proc = run("make_data.py", "--import-eto", str(src), "--import-env", "scienceworld", "--out", str(out))
    assert "imported 2 of 3 trajectories" in proc.stdout and "task or variation not found: 1" in proc.stdout
    train = steps.read_steps(str(out / "scienceworld_train.jsonl"))
    ood = steps.read_steps(str(out / "scienceworld_ood_test.jsonl"))
    assert {r["task_type"] for r in train} == {"find-living-thing"} and {r["task_type"] for r in ood} == {"find-animal"}
    for r in train + ood:
        assert r["action"] in r["candidates"] and len(r["candidates"]) <= 20 and r["thought"].startswith("step ")


def test_multi_line_thoughts_go_through_import_train_probe_and_conflicts(tiny_model, tmp_path):
    """ETO's thoughts span lines: a thought with a newline, a tab and a double space is kept as it is by the
    importer, trained on, probed (the truncation curve cuts it without re-joining its words) and borrowed by
    the conflict probe."""
    tasks = {t["id"]: t for t in envs.sciworld_tasks(every_ood_variation=True)}
    items = []
    with envs.ScienceWorld() as env:
        for n, name, split in (("12", "find-living-thing", "train"), ("11", "find-animal", "ood_test")):
            task = next(t for t in tasks.values() if t["task_name"] == name and t["split"] == split)
            obs, info = env.reset(task)
            turns = [("human", "You are a helpful assistant to do some scientific experiment..."), ("gpt", "OK"),
                     ("human", info["task"] + "\n" + obs)]
            for i, action in enumerate(env.expert_plan()):
                thought = f"Step {i + 1} of the plan.\nFirst\tlook  around, then act:\n- {action.split()[0]}"
                turns.append(("gpt", f"Thought: {thought}\nAction: {action}"))
                obs, *_ = env.step(action)
                turns.append(("human", "Observation: " + obs))
            items.append({"id": f"{n}_{task['variation']}", "conversations": [{"from": w, "value": v} for w, v in turns]})
    src = tmp_path / "sciworld_sft.json"
    src.write_text(json.dumps(items))
    data = tmp_path / "sw"
    run("make_data.py", "--import-eto", str(src), "--import-env", "scienceworld", "--out", str(data))
    ood = steps.read_steps(str(data / "scienceworld_ood_test.jsonl"))
    assert all("\n" in r["thought"] and "\t" in r["thought"] and "  " in r["thought"] for r in ood)
    run("train.py", "--model", tiny_model, "--data", str(data / "scienceworld_train.jsonl"), "--max-steps", "1",
        "--threads", "1", "--out", str(tmp_path / "run"))
    conflicts = tmp_path / "conflicts.jsonl"
    run("make_conflicts.py", "--data", str(data / "scienceworld_ood_test.jsonl"), "--pool",
        str(data / "scienceworld_train.jsonl"), "--max-per-split", "3", "--out", str(conflicts))
    assert jsonio.read_jsonl(str(conflicts))
    run("probe.py", "--model", tiny_model, "--checkpoints", str(tmp_path / "run"), "--data",
        str(data / "scienceworld_ood_test.jsonl"), "--max-records", "3", "--trunc-fracs", "0,0.5,1", "--max-thought-tokens",
        "4", "--max-action-tokens", "4", "--attribution-samples", "1", "--threads", "1", "--conflicts", str(conflicts),
        "--conflicts-out", str(tmp_path / "c"), "--out", str(tmp_path / "p"))
    recs = jsonio.read_jsonl(str(tmp_path / "p" / "records.jsonl"))
    assert len(recs) == 6 and all(r["trunc_ll_100"] == r["ll_thought_sum"] for r in recs)
    assert jsonio.read_jsonl(str(tmp_path / "c" / "records.jsonl"))
