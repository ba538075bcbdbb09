"""Multi-turn BFCL on BFCL's own backends: splits, expert, checker, hostile actions, instance hygiene, rollouts."""
import json

import pytest

import envs
from conftest import run

HOSTILE = [
    "[__import__('os').system('touch {marker}')]",
    "[os.system(command='touch {marker}')]",
    "[cd(folder=open('{marker}', 'w').name)]",
    "[cd(folder='a'.join(['x', 'y']))]",
    "[cd(folder=folder)]",
    "[cd(**{{'folder': 'document'}})]",
    "[ls().__class__()]",
    "[(lambda: cd(folder='x'))()]",
    "[cd(folder='document'), eval(source='1')]",
    "[exec('import os')]",
    "cd(folder='document'); __import__('os')",
]


def base_task(entry="multi_turn_base_0"):
    return next(t for t in envs.bfcl_mt_tasks() if t["entry_id"] == entry)


def instances():
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
    return [k for k in vars(multi_turn_utils) if k.endswith("_instance")]


def play(env, task, actions):
    obs, info = env.reset(task)
    trace = [obs]
    for a in actions:
        obs, reward, done, info = env.step(a)
        trace.append(obs)
        if done:
            break
    return trace, info, done


def test_split_keeps_long_context_twins_of_train_out_of_ood():
    tasks = envs.bfcl_mt_tasks()
    base, long = envs.bfcl_mt_entries(envs.BFCL_MT_ID), envs.bfcl_mt_entries(envs.BFCL_MT_OOD)
    train = [base[t["entry_id"]] for t in tasks if t["split"] == "train"]
    seen = {json.dumps(e["question"], sort_keys=True) for e in train} | \
        {json.dumps(e["initial_config"], sort_keys=True) for e in train}
    ood = [t for t in tasks if t["split"] == "ood_test"]
    assert ood and all(t["task_type"] == envs.BFCL_MT_OOD for t in ood)
    for t in ood:
        e = long[t["entry_id"]]
        assert json.dumps(e["question"], sort_keys=True) not in seen
        assert json.dumps(e["initial_config"], sort_keys=True) not in seen
    ids = [t["id"] for t in tasks]
    assert len(ids) == len(set(ids)) and {t["split"] for t in tasks} == {"train", "id_test", "ood_test"}


def test_expert_wins_every_entry_of_both_test_splits_and_frees_its_instances():
    before = instances()
    with envs.BfclMultiTurn() as env:
        for task in [t for t in envs.bfcl_mt_tasks() if t["split"] != "train"]:
            _, info = env.reset(task)
            plan = env.expert_plan()
            assert plan.count(envs.END_TURN) == len(env.questions)
            assert all("(" in a for a in plan if a != envs.END_TURN)
            trace, info, done = play(env, task, plan)
            assert done and info["won"] and info["score"] == 1.0 and not info["invalid"], task["id"]
    assert instances() == before  # nothing left in BFCL's executor globals


def test_positional_ground_truth_is_rendered_with_keywords():
    sigs = envs.bfcl_mt._mt_class_api("GorillaFileSystem")[1]
    assert envs.parse_mt_action("[sort('report.pdf')]", sigs) == ["sort(file_name='report.pdf')"]
    assert envs.parse_mt_action("[ls(), tail(file_name='a', lines=3)]", sigs) == ["ls()", "tail(file_name='a', lines=3)"]
    for bad, why in (("[cd(directory='x')]", "missing a required argument"), ("[cd(folder='x', depth=2)]", "unexpected keyword"),
                     ("[cd('x', 'y')]", "too many positional")):
        with pytest.raises(ValueError, match=why):
            envs.parse_mt_action(bad, sigs)


def test_a_wrong_or_missing_call_fails_the_checker():
    task = base_task()
    with envs.BfclMultiTurn() as env:
        env.reset(task)
        plan = env.expert_plan()
        # Drop the first call: the state after the first turn differs from the ground truth's.
        _, info, done = play(env, task, plan[1:])
        assert done and not info["won"] and info["turns_passed"] == 0 and info["score"] == 0.0
        # A wrong argument in the last turn: the earlier turns still get their credit.
        last = max(i for i, a in enumerate(plan) if a != envs.END_TURN)
        wrong = plan[:last] + [plan[last].replace("'previous_report.pdf'", "'final_report.pdf'")] + plan[last + 1:]
        assert wrong != plan
        _, info, done = play(env, task, wrong)
        n = len(env.questions)
        assert done and not info["won"] and info["turns_passed"] == n - 1 and info["score"] == (n - 1) / n
        # Ending every turn at once does nothing and passes nothing.
        _, info, done = play(env, task, [envs.END_TURN] * n)
        assert done and not info["won"] and info["turns_passed"] == 0


def test_hostile_actions_are_rejected_and_nothing_is_executed(tmp_path, monkeypatch):
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
    executed = []
    real = multi_turn_utils.execute_multi_turn_func_call
    monkeypatch.setattr(multi_turn_utils, "execute_multi_turn_func_call",
                        lambda calls, *a, **k: executed.append(list(calls)) or real(calls, *a, **k))
    marker = tmp_path / "pwned"
    with envs.BfclMultiTurn() as env:
        env.reset(base_task())
        for template in HOSTILE:
            action = template.format(marker=marker)
            obs, reward, done, info = env.step(action)
            assert info["invalid"] and obs.startswith("Error:") and not done, action
        assert executed == [] and not marker.exists()
        obs, _, _, info = env.step("[cd(folder='document')]")  # a plain call still runs
        assert not info["invalid"] and executed == [["cd(folder='document')"]] and "current_working_directory" in obs


def test_same_entry_twice_gives_identical_transcripts_and_frees_instances():
    task = base_task("multi_turn_base_5")
    before = instances()
    traces = []
    for _ in range(2):
        with envs.BfclMultiTurn() as env:
            env.reset(task)
            trace, info, _ = play(env, task, env.expert_plan())
            traces.append(trace)
            assert info["won"]
        assert instances() == before
    assert traces[0] == traces[1]
    # Within one env: a reset frees the previous episode's instances, so state never carries over.
    with envs.BfclMultiTurn() as env:
        env.reset(task)
        env.step(env.expert_plan()[0])
        again, _, _ = play(env, task, env.expert_plan())
        assert again == traces[0]


def test_long_results_are_cut_and_say_so():
    task = next(t for t in envs.bfcl_mt_tasks() if t["split"] == "ood_test")
    with envs.BfclMultiTurn() as env:
        env.reset(dict(task, obs_cap=40))
        cut = 0
        for action in env.expert_plan():
            obs, _, done, _ = env.step(action)
            if action != envs.END_TURN:
                # the whole step's text is cut at BFCL_MT_STEP_CAP call caps; within it, each call's result at 40
                assert len(obs) <= envs.BFCL_MT_STEP_CAP * 40 + 40
                lines = obs.split("\n")
                for line in lines[:-1] if len(obs) > envs.BFCL_MT_STEP_CAP * 40 else lines:
                    result = line.split(" -> ", 1)[1]
                    assert len(result) <= 40 or result[40:].startswith(" ... [") and result.endswith(" more characters cut]")
                    cut += len(result) > 40
        assert cut and done


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt_data")
    run("make_data.py", "--env", "bfcl_mt", "--bfcl-mt-train", "3", "--bfcl-mt-test", "2", "--seed", "1", "--out", str(out))
    return out


def test_step_data_is_grounded_and_uses_compact_signatures(mt_data):
    recs = [json.loads(line) for line in open(mt_data / "bfcl_mt_train.jsonl")]
    assert len({r["task_id"] for r in recs}) == 3
    meta = json.load(open(mt_data / "meta.json"))
    assert meta["bfcl_mt_split"]["long_context_kept_as_ood"] == sum(t["split"] == "ood_test" for t in envs.bfcl_mt_tasks())
    for r in recs:
        first = r["messages"][1]["content"]
        assert first.startswith("Functions:\n") and "\n\nUser: " in first and '"parameters"' not in first
        assert r["candidates"] is None
        if r["action"] == envs.END_TURN:
            assert r["thought_kind"] in ("end_turn", "nothing_to_call")
        else:
            name = r["action"][1:].split("(")[0]
            assert name in r["thought"] and r["action"][1:-1] not in r["thought"]


def test_evaluate_expert_random_and_tiny_model_both_modes(mt_data, tiny_model, tmp_path):
    for policy in ("expert", "random"):
        run("evaluate.py", "--policy", policy, "--data", str(mt_data), "--env", "bfcl_mt", "--num-envs", "2",
            "--out", str(tmp_path / policy))
    expert = [json.loads(line) for line in open(tmp_path / "expert" / "episodes.jsonl")]
    assert len(expert) == 4 and all(r["won"] and r["invalid_actions"] == 0 for r in expert)
    for r in expert:  # per-turn credit: every user turn passed, one [] closing each
        assert r["turns_passed"] == sum(s["action"] == envs.END_TURN for s in r["transcript"]) >= 1
    rand = [json.loads(line) for line in open(tmp_path / "random" / "episodes.jsonl")]
    assert len(rand) == 4 and not any(r["won"] for r in rand)
    run("evaluate.py", "--model", tiny_model, "--data", str(mt_data), "--env", "all", "--mode", "both", "--max-episodes", "1",
        "--max-steps", "3", "--max-thought-tokens", "6", "--max-action-tokens", "6", "--threads", "1",
        "--out", str(tmp_path / "model"))
    model = [json.loads(line) for line in open(tmp_path / "model" / "episodes.jsonl")]
    assert {(r["split"], r["mode"]) for r in model} == {(s, m) for s in ("id_test", "ood_test") for m in ("prompt", "cot")}
    assert all(r["env"] == "bfcl_mt" and r["steps"] == 3 and r["turns_passed"] == 0 for r in model)
    # A prompt over --max-len ends that episode as its own outcome (recorded, counted as a loss), never the run.
    proc = run("evaluate.py", "--model", tiny_model, "--data", str(mt_data), "--env", "bfcl_mt", "--mode", "prompt",
               "--max-episodes", "1", "--max-len", "300", "--threads", "1", "--out", str(tmp_path / "long"))
    long = [json.loads(line) for line in open(tmp_path / "long" / "episodes.jsonl")]
    assert len(long) == 2 and all(r["context_exceeded"] and not r["won"] and not r["errored"] for r in long)
    rows = [json.loads(line) for line in open(tmp_path / "long" / "summary.jsonl")]
    assert {(r["n"], r["context_exceeded"]) for r in rows} == {(1, 1.0)}


def test_probe_runs_on_multi_turn_steps_and_stops_on_a_prompt_over_max_len(mt_data, tiny_model, tmp_path):
    data = str(mt_data / "bfcl_mt_id_test.jsonl")
    run("probe.py", "--model", tiny_model, "--data", data, "--max-records", "2", "--attribution-samples", "1",
        "--max-thought-tokens", "6", "--max-action-tokens", "6", "--threads", "1", "--out", str(tmp_path / "p"))
    rows = [json.loads(line) for line in open(tmp_path / "p" / "records.jsonl")]
    assert len(rows) == 2 and all(r["env"] == "bfcl_mt" and r["prompt_correct"] is not None for r in rows)
    proc = run("probe.py", "--model", tiny_model, "--data", data, "--max-records", "2", "--max-len", "200", "--threads", "1",
               "--out", str(tmp_path / "q"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "error: record bfcl_mt/" in proc.stderr
