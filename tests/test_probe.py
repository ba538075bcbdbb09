"""probe.py, make_conflicts.py and the branching engine they share (decode.run_branches)."""
import json
import os
import shutil

import pytest

import decode
import jsonio
import lm
import steps
from conftest import run

FAST = ["--threads", "1", "--max-thought-tokens", "12", "--max-action-tokens", "12"]


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def memorized(tiny_model, small_data, tmp_path_factory):
    """The tiny model trained to memorize one step's action (action-only SFT): its prompt action is known."""
    tmp = tmp_path_factory.mktemp("memorized")
    rec = steps.read_steps(os.path.join(small_data[0], "alfworld_id_test.jsonl"))[0]
    data = tmp / "one.jsonl"
    jsonio.write_jsonl_atomic(str(data), [rec])
    run("train.py", "--model", tiny_model, "--data", str(data), "--any-split", "--no-cot", "--full-finetune", "--lr", "1e-2",
        "--max-steps", "40", "--batch-size", "1", "--warmup-frac", "0", "--out", str(tmp / "run"), "--threads", "1")
    return data, tmp / "run", rec


def test_branches_match_a_full_forward_and_generate(tiny_model, small_data):
    import torch
    torch.set_num_threads(1)
    tok = lm.load_tokenizer(tiny_model)
    model = lm.load_model(tiny_model, None, "cpu", torch.float32)
    recs = steps.read_steps(os.path.join(small_data[0], "alfworld_id_test.jsonl"))[:3]
    prompts = [steps.render_prompt(tok, r["messages"]) for r in recs]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    parts = [decode.encode_parts(tok, [p, "Action:", " " + r["action"]]) for p, r in zip(prompts, recs)]
    state = decode.encode_prompts(model, [p[0] for p in parts], tok.pad_token_id)
    branches = [{"row": i, "prefix": p[1], "target": p[2]} for i, p in enumerate(parts)]
    branches += [{"row": i, "prefix": p[1], "max_new": 6, "stop": "line"} for i, p in enumerate(parts)]
    got = decode.run_branches(model, tok, state, branches, max_rows=4)  # 6 branches in 2 chunks
    for i, p in enumerate(parts):
        ids = torch.tensor([p[0] + p[1] + p[2]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        n0 = len(p[0]) + len(p[1])
        full = [logp[n0 - 1 + j, t].item() for j, t in enumerate(p[2])]
        assert got[i]["logprobs"] == pytest.approx(full, abs=1e-4)
        gen = model.generate(torch.tensor([p[0] + p[1]]), max_new_tokens=6, do_sample=False)[0, n0:].tolist()
        text = got[3 + i]["text"]
        # The branch stops at its first completed line; up to there it is exactly HF's greedy output.
        assert got[3 + i]["ids"] == gen[:len(got[3 + i]["ids"])] and len(got[3 + i]["ids"]) <= 6
        assert tok.decode(got[3 + i]["ids"], skip_special_tokens=True) == text


def assert_same_branches(model, tok, parts, state_a, state_b):
    """Scoring and greedy branches of (prompt, prefix, target) parts give the same answers from both states."""
    branches = [{"row": i, "prefix": p[1], "target": p[2]} for i, p in enumerate(parts)]
    branches += [{"row": i, "prefix": p[1], "max_new": 5, "stop": "line"} for i, p in enumerate(parts)]
    for x, y in zip(decode.run_branches(model, tok, state_a, branches), decode.run_branches(model, tok, state_b, branches)):
        if "logprobs" in x:
            assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-4)
        else:
            assert x["ids"] == y["ids"]


def test_reused_prompt_prefix_gives_the_same_branches(tiny_model, small_data):
    """evaluate.py reuses each agent's previous prompt cache; the answers must not change."""
    import torch
    torch.set_num_threads(1)
    tok = lm.load_tokenizer(tiny_model)
    model = lm.load_model(tiny_model, None, "cpu", torch.float32)
    recs = steps.read_steps(os.path.join(small_data[0], "alfworld_id_test.jsonl"))
    by_task = {}
    for r in recs:
        by_task.setdefault(r["task_id"], []).append(r)
    # Steps t and t+1 of two episodes: t+1's prompt extends t's (plus one with no cache at all).
    pairs = [(eps[0], eps[1]) for eps in by_task.values() if len(eps) > 1][:2]
    first = [decode.encode_parts(tok, [steps.render_prompt(tok, a["messages"])])[0] for a, _ in pairs]
    old = decode.encode_prompts(model, first, tok.pad_token_id)
    nxt = [decode.encode_parts(tok, [steps.render_prompt(tok, b["messages"]), "Action:", " " + b["action"]]) for _, b in pairs]
    nxt.append(decode.encode_parts(tok, [steps.render_prompt(tok, recs[-1]["messages"]), "Action:", " " + recs[-1]["action"]]))
    reuse = [decode.prompt_cache(old, 0), decode.prompt_cache(old, 1), None]
    fresh = decode.encode_prompts(model, [p[0] for p in nxt], tok.pad_token_id, share=False)
    cached = decode.encode_prompts(model, [p[0] for p in nxt], tok.pad_token_id, reuse=reuse)
    assert min(cached["reused"][:2]) > 100 and cached["reused"][2] == 0 and fresh["reused"] == [0, 0, 0]
    assert_same_branches(model, tok, nxt, fresh, cached)


def test_shared_system_prompt_and_length_groups_give_the_same_branches(tiny_model, small_data, monkeypatch):
    """encode_prompts runs the prompts' common prefix once and the rest in groups of similar length;
    every branch must be what one padded pass over whole prompts gives."""
    import torch
    torch.set_num_threads(1)
    tok = lm.load_tokenizer(tiny_model)
    model = lm.load_model(tiny_model, None, "cpu", torch.float32)
    recs = steps.read_steps(os.path.join(small_data[0], "alfworld_id_test.jsonl"))
    recs = sorted(recs, key=lambda r: len(steps.render_prompt(tok, r["messages"])))
    recs = recs[:2] + recs[-2:]  # the shortest and the longest prompts: more than one length group
    parts = [decode.encode_parts(tok, [steps.render_prompt(tok, r["messages"]), "Action:", " " + r["action"]]) for r in recs]
    prompts = [p[0] for p in parts]
    assert len(decode._length_groups([len(p) - lm.common_len(prompts) for p in prompts])) > 1
    fast = decode.encode_prompts(model, prompts, tok.pad_token_id)
    assert fast["reused"] == [lm.common_len(prompts)] * 4 and fast["reused"][0] >= lm.MIN_SHARED
    monkeypatch.setattr(decode, "_length_groups", lambda lengths, **kw: [list(range(len(lengths)))])
    plain = decode.encode_prompts(model, prompts, tok.pad_token_id, share=False)
    assert_same_branches(model, tok, parts, plain, fast)


def test_probe_known_answers(tiny_model, memorized, tmp_path):
    data, run_dir, rec = memorized
    out = tmp_path / "probe"
    proc = run("probe.py", "--model", tiny_model, "--checkpoints", str(run_dir), "--data", str(data), "--out", str(out), *FAST)
    assert "probe done" in proc.stdout
    rows = {r["checkpoint"]: r for r in read(out / "records.jsonl")}
    assert set(rows) == {"base", "run/checkpoint-000040"}
    trained, base = rows["run/checkpoint-000040"], rows["base"]
    # Memorized: the prompt action is the reference, and it beats every other valid action.
    assert trained["prompt_action"] == rec["action"] and trained["prompt_correct"]
    assert trained["rank1_prompt"] is True and trained["n_candidates"] == len(rec["candidates"])
    assert trained["ll_prompt_mean"] > base["ll_prompt_mean"] + 1
    assert not base["prompt_correct"]  # a random model does not write the action
    for r in rows.values():
        want = ("none" if r["consistent"] else "helpful" if r["cot_correct"] and not r["prompt_correct"]
                else "harmful" if r["prompt_correct"] and not r["cot_correct"] else "neutral")
        assert r["revision"] == want
        assert r["cot_tag_missing"] == (r["cot_action"] is None)
        # Attribution shares (the record is in the sample: 1 record, 4 samples) each sum to 1.
        for kind in ("attn", "grad"):
            shares = [r[f"{kind}_{g}"] for g in ("prompt", "thought", "other")]
            assert all(0 <= s <= 1 for s in shares) and sum(shares) == pytest.approx(1, abs=2e-3)
        assert r["trunc_ll_100"] == r["ll_thought_sum"]
    summary = read(out / "summary.jsonl")
    assert [(s["checkpoint"], s["n"]) for s in summary] == [("base", 1), ("run/checkpoint-000040", 1)]
    assert summary[1]["prompt_correct"] == 1.0
    assert (out / "summary.csv").read_text().startswith("checkpoint,step,env,split,n,prompt_correct,")


def test_probe_resume_and_seed_determinism(tiny_model, small_data, tmp_path):
    args = ["--model", tiny_model, "--data", f"{small_data[0]}/alfworld_*_test.jsonl", "--max-records", "2",
            "--attribution-samples", "1", *FAST]
    run("probe.py", *args, "--out", str(tmp_path / "a"))
    run("probe.py", *args, "--out", str(tmp_path / "b"), fresh=True)
    a = (tmp_path / "a" / "records.jsonl").read_bytes()
    assert len(a.splitlines()) == 4
    assert a == (tmp_path / "b" / "records.jsonl").read_bytes()
    assert (tmp_path / "a" / "summary.csv").read_bytes() == (tmp_path / "b" / "summary.csv").read_bytes()
    # A kill mid-write leaves 2 whole records and a torn third; the rerun completes without duplicates.
    lines = a.splitlines(keepends=True)
    (tmp_path / "b" / "records.jsonl").write_bytes(lines[0] + lines[1] + lines[2][:40])
    proc = run("probe.py", *args, "--out", str(tmp_path / "b"))
    assert "2 already in" in proc.stdout
    resumed = read(tmp_path / "b" / "records.jsonl")
    assert sorted(r["id"] for r in resumed) == sorted(json.loads(x)["id"] for x in lines)
    assert sorted(json.dumps(r, sort_keys=True) for r in resumed) == sorted(json.dumps(json.loads(x), sort_keys=True) for x in lines)


def test_conflicts_are_valid_and_seeded(small_data, tmp_path):
    d = small_data[0]
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        proc = run("make_conflicts.py", "--data", f"{d}/*_test.jsonl", "--pool", f"{d}/*_train.jsonl", "--out", str(out), "--seed", "5",
                   fresh=name == "b")
        assert "skipped no candidates: 8" in proc.stdout  # the BFCL steps
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    steps_by_id = {r["id"]: r for n in ("alfworld_id_test", "alfworld_ood_test") for r in steps.read_steps(f"{d}/{n}.jsonl")}
    recs = read(tmp_path / "a.jsonl")
    assert {r["method"] for r in recs} == {"borrow", "template"}
    assert len(recs) == 2 * len(steps_by_id)
    for r in recs:
        step = steps_by_id[r["step_id"]]
        assert r["a1"] == step["action"] and r["a2"] in step["candidates"]
        assert steps.normalize_action(r["a2"]) != steps.normalize_action(r["a1"])
        assert r["trace"] and r["messages"] == step["messages"]
        if r["method"] == "borrow":
            assert not r["source"].startswith(step["task_id"] + "/")
    # Both methods argue for the same a2 at the same step.
    by_step = {}
    for r in recs:
        by_step.setdefault(r["step_id"], set()).add(r["a2"])
    assert all(len(v) == 1 for v in by_step.values())
    run("make_conflicts.py", "--data", f"{d}/*_test.jsonl", "--pool", f"{d}/*_train.jsonl", "--out", str(tmp_path / "half.jsonl"),
        "--seed", "5", "--keep-frac", "0.5")
    half = read(tmp_path / "half.jsonl")
    assert [r["a2"] for r in half] == [r["a2"] for r in recs]
    assert all(len(h["trace"].split()) == max(1, round(len(r["trace"].split()) / 2)) for h, r in zip(half, recs))


def test_conflict_probe(tiny_model, small_data, tmp_path):
    d = small_data[0]
    conflicts = tmp_path / "c.jsonl"
    run("make_conflicts.py", "--data", f"{d}/alfworld_id_test.jsonl", "--pool", f"{d}/*_train.jsonl",
        "--max-per-split", "2", "--out", str(conflicts))
    run("probe.py", "--model", tiny_model, "--conflicts", str(conflicts), "--out", str(tmp_path / "p"), *FAST)
    recs = read(tmp_path / "p" / "records.jsonl")
    assert len(recs) == 4
    for r in recs:
        assert r["follows"] + r["anchors"] + r["neither"] == 1
        assert r["prefers_a2"] == (r["ll_a2_mean"] > r["ll_a1_mean"])
    summary = read(tmp_path / "p" / "summary.jsonl")
    assert {s["method"] for s in summary} == {"borrow", "template"}
    assert all(s["follows"] + s["anchors"] + s["neither"] == pytest.approx(1) for s in summary)


def test_steps_and_conflicts_in_one_pass_match_separate_runs(tiny_model, small_data, tmp_path):
    """--conflicts-out: a conflict whose step is probed branches from that step's prompt pass, the
    others run after; every record must equal what the two separate runs write."""
    d = small_data[0]
    conflicts = tmp_path / "c.jsonl"
    run("make_conflicts.py", "--data", f"{d}/alfworld_id_test.jsonl", "--pool", f"{d}/*_train.jsonl",
        "--max-per-split", "3", "--out", str(conflicts))
    steps_args = ["--data", f"{d}/alfworld_id_test.jsonl", "--max-records", "2", "--attribution-samples", "0"]
    run("probe.py", "--model", tiny_model, *steps_args, "--out", str(tmp_path / "s"), *FAST)
    run("probe.py", "--model", tiny_model, "--conflicts", str(conflicts), "--out", str(tmp_path / "c"), *FAST)
    proc = run("probe.py", "--model", tiny_model, *steps_args, "--conflicts", str(conflicts), "--conflicts-out",
               str(tmp_path / "bc"), "--out", str(tmp_path / "bs"), *FAST)
    assert "probe done (steps)" in proc.stdout and "probe done (conflicts)" in proc.stdout
    for alone, both in (("s", "bs"), ("c", "bc")):
        a = {r["id"]: r for r in read(tmp_path / alone / "records.jsonl")}
        b = {r["id"]: r for r in read(tmp_path / both / "records.jsonl")}
        assert set(a) == set(b) and len(a) == (2 if alone == "s" else 6)
        for key, row in a.items():
            for field, value in row.items():
                assert b[key][field] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), field
    probed = {r["record_id"] for r in read(tmp_path / "bs" / "records.jsonl")}
    assert 0 < sum(r["step_id"] in probed for r in read(tmp_path / "bc" / "records.jsonl")) < 6  # both paths ran
    again = run("probe.py", "--model", tiny_model, *steps_args, "--conflicts", str(conflicts), "--conflicts-out",
                str(tmp_path / "bc"), "--out", str(tmp_path / "bs"), *FAST)
    assert "2 already in" in again.stdout and "6 already in" in again.stdout
    assert len(read(tmp_path / "bc" / "records.jsonl")) == 6
    bad = run("probe.py", "--model", tiny_model, *steps_args, "--conflicts-out", str(tmp_path / "x"), check=False)
    assert bad.returncode != 0 and bad.stderr.strip().endswith("--conflicts-out needs --conflicts")


def test_bad_inputs_fail_clearly(tiny_model, small_data, tmp_path):
    proc = run("probe.py", "--model", tiny_model, "--checkpoints", str(tmp_path / "nope"), "--out", str(tmp_path / "p"), check=False)
    assert proc.returncode != 0 and "checkpoint folder not found" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "step_id": "y", "env": "alfworld", "split": "id_test", "messages": [], "a1": "a", "a2": "b"}) + "\n")
    proc = run("probe.py", "--model", tiny_model, "--conflicts", str(bad), "--out", str(tmp_path / "p"), check=False)
    assert proc.returncode != 0 and "bad.jsonl:1: missing field 'trace'" in proc.stderr
    proc = run("make_conflicts.py", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c.jsonl"), check=False)
    assert proc.returncode != 0 and "missing.jsonl" in proc.stderr and not (tmp_path / "c.jsonl").exists()
