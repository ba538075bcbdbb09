"""train.py: exact action masking, realised fraction, resume equivalence, loadable adapters, bad input."""
import json
import os
import re
import shutil

import pytest

import jsonio
import lm
import sft
import steps
from conftest import run, torchrun, torchrun_failure


def train(tiny_model, data_dir, out, *extra, check=True):
    return run("train.py", "--model", tiny_model, "--data", f"{data_dir}/*_train.jsonl", "--out", str(out),
               "--batch-size", "4", "--threads", "1", "--log-every", "1", *extra, check=check)


def test_action_mask_is_exact_on_the_real_tokenizer(small_data):
    tok = lm.load_tokenizer(lm.resolve_model(lm.EMBEDDED))
    recs = [r for n in sorted(os.listdir(small_data[0])) if n.endswith(".jsonl")
            for r in steps.read_steps(os.path.join(small_data[0], n))]
    assert len(recs) > 20
    for rec in recs:
        ids, labels, kinds = lm.encode_step(tok, rec, mask_action=True)
        full_ids, full_labels, full_kinds = lm.encode_step(tok, rec, mask_action=False)
        assert ids == full_ids and kinds == full_kinds
        action_pos = [i for i, k in enumerate(kinds) if k == lm.ACTION]
        # The action tokens spell the action (plus at most the separating space), nothing more.
        assert tok.decode([ids[i] for i in action_pos]).strip() == rec["action"]
        assert action_pos == list(range(action_pos[0], action_pos[-1] + 1))
        for i, k in enumerate(kinds):
            if k == lm.PROMPT or k == lm.ACTION:
                assert labels[i] == -100
            if k in (lm.THOUGHT, lm.TAG):
                assert labels[i] == ids[i] and full_labels[i] == ids[i]
            if k == lm.ACTION:
                assert full_labels[i] == ids[i]
        # The tag and end of turn stay supervised; the thought tokens spell the thought part.
        assert tok.decode([ids[i] for i, k in enumerate(kinds) if k == lm.TAG]).strip() == "Action:"
        assert "<|im_end|>" in tok.decode([ids[i] for i, l in enumerate(labels) if l != -100 and kinds[i] == lm.END])
        assert rec["thought"] in tok.decode([ids[i] for i, k in enumerate(kinds) if k == lm.THOUGHT])


def test_no_cot_encoding_has_no_thought(small_data):
    tok = lm.load_tokenizer(lm.resolve_model(lm.EMBEDDED))
    rec = steps.read_steps(os.path.join(small_data[0], "alfworld_train.jsonl"))[0]
    ids, labels, kinds = lm.encode_step(tok, rec, no_cot=True)
    assert lm.THOUGHT not in kinds
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100]) == f"Action: {rec['action']}<|im_end|>"


@pytest.mark.parametrize("k", [0.0, 0.3, 1.0])
def test_realised_mask_fraction(tiny_model, small_data, tmp_path, k):
    proc = train(tiny_model, small_data[0], tmp_path / "run", "--max-steps", "1", "--mask-action-frac", str(k))
    n, masked = map(int, re.search(r"(\d+) examples .*?, (\d+) with masked action", proc.stdout).groups())
    assert masked == round(k * n)


def test_resume_after_stop_matches_an_uninterrupted_run(tiny_model, small_data, tmp_path):
    from safetensors.torch import load_file
    common = ("--max-steps", "6", "--save-every", "2", "--mask-action-frac", "0.3", "--seed", "1")
    train(tiny_model, small_data[0], tmp_path / "a", *common)
    train(tiny_model, small_data[0], tmp_path / "b", *common, "--stop-at-step", "3")
    os.makedirs(tmp_path / "b" / ".tmp-checkpoint-000004")  # debris of a kill mid-save is ignored
    assert not (tmp_path / "b" / "checkpoint-000006").exists()
    proc = train(tiny_model, small_data[0], tmp_path / "b", *common, "--resume")
    assert "resumed from" in proc.stdout and "checkpoint-000003" in proc.stdout
    a = load_file(tmp_path / "a" / "checkpoint-000006" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-000006" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006", "metrics.jsonl"]
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "action_loss", "thought_loss", "tokens_per_s", "computed_frac", "lr"} <= set(rows[0])


def test_resumed_log_has_every_step_once(tiny_model, small_data, tmp_path):
    """Killed after logging step 3 with the last checkpoint at step 2: the rerun logs 3 again, once."""
    import shutil
    common = ("--max-steps", "4", "--save-every", "2")
    train(tiny_model, small_data[0], tmp_path / "run", *common, "--stop-at-step", "3")
    shutil.rmtree(tmp_path / "run" / "checkpoint-000003")
    proc = train(tiny_model, small_data[0], tmp_path / "run", *common, "--resume")
    assert "checkpoint-000002" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_resume_refuses_another_setup(tiny_model, small_data, tmp_path):
    """--resume continues a run only with the settings and data that define it; others may change."""
    common = ("--max-steps", "4", "--save-every", "2", "--mask-action-frac", "0.3", "--seed", "1")
    train(tiny_model, small_data[0], tmp_path / "run", *common, "--stop-at-step", "2")
    before = sorted(os.listdir(tmp_path / "run" / "checkpoint-000002"))
    other = tmp_path / "other"
    other.mkdir()
    lines = open(os.path.join(small_data[0], "alfworld_train.jsonl")).readlines()
    (other / "alfworld_train.jsonl").write_text("".join(lines[:-1]))
    for extra, message in ((("--mask-action-frac", "0.5"), "--mask-action-frac 0.3"),
                           (("--lr", "1e-3"), "--lr 0.0002"), (("--seed", "2"), "--seed 1"),
                           (("--share-prefix",), "--share-prefix False"),
                           (("--data", str(other / "*_train.jsonl")), "training data differ")):
        proc = train(tiny_model, small_data[0], tmp_path / "run", *common, *extra, "--resume", check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-800:])
        assert not (tmp_path / "run" / "checkpoint-000004").exists()
    # Threads and logging do not change the result: the run goes on.
    proc = train(tiny_model, small_data[0], tmp_path / "run", *common, "--threads", "2", "--log-every", "3", "--resume")
    assert "resumed from" in proc.stdout and (tmp_path / "run" / "checkpoint-000004").exists()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint-000002")) == before


def test_resume_from_a_corrupt_checkpoint_fails_cleanly(tiny_model, small_data, tmp_path):
    common = ("--max-steps", "4", "--save-every", "2")
    train(tiny_model, small_data[0], tmp_path / "run", *common, "--stop-at-step", "2")
    ckpt = tmp_path / "run" / "checkpoint-000002"
    for name in ("training_state.pt", "adapter_model.safetensors"):
        good = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(good[:len(good) // 2])
        proc = train(tiny_model, small_data[0], tmp_path / "run", *common, "--resume", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"{ckpt}: cannot load the checkpoint" in proc.stderr, proc.stderr[-500:]
        (ckpt / name).write_bytes(good)


def test_outputs_are_readable_by_others(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the files they leave get the usual umask mode."""
    umask = os.umask(0o022)
    try:
        jsonio.write_jsonl_atomic(tmp_path / "a.jsonl", [{"id": 1}])
        jsonio.write_json_atomic(tmp_path / "a.json", {"x": 1})
        jsonio.write_csv_atomic(tmp_path / "a.csv", [{"x": 1}])
    finally:
        os.umask(umask)
    for name in ("a.jsonl", "a.json", "a.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_checkpoint_is_a_standard_peft_adapter(tiny_model, small_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    train(tiny_model, small_data[0], tmp_path / "run", "--max-steps", "2", "--lr", "1e-2")
    ckpt = tmp_path / "run" / "checkpoint-000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 2 and meta["seed"] == 0 and all(len(h) == 64 for h in meta["data"].values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    x = torch.tensor([[1, 2, 3, 4]])
    before = base(x).logits
    model = PeftModel.from_pretrained(base, str(ckpt))
    assert not torch.allclose(model(x).logits, before)


def test_bad_input_fails_cleanly(tiny_model, small_data, tmp_path):
    empty = tmp_path / "empty_train.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad" / "x_train.jsonl"
    bad.parent.mkdir()
    rec = steps.read_steps(os.path.join(small_data[0], "alfworld_train.jsonl"))[0]
    del rec["thought"]
    bad.write_text(json.dumps(rec) + "\n")
    cases = [
        (["--data", str(empty)], "no training records"),
        (["--data", str(bad)], "x_train.jsonl:1"),
        (["--data", str(tmp_path / "nothing.jsonl")], "data file not found"),
        (["--max-len", "50"], "more than --max-len 50"),
        (["--model", str(tmp_path / "no_such_model")], "cannot load model"),
        (["--mask-action-frac", "1.5"], "--mask-action-frac must be <= 1"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        argv = ["train.py", "--model", tiny_model, "--data", f"{small_data[0]}/*_train.jsonl", "--out", str(out),
                "--max-steps", "1", "--threads", "1"]
        argv += extra  # later flags win in argparse
        proc = run(*argv, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr[-500:])
        assert not out.exists() or not any(p.name.startswith("checkpoint") for p in out.iterdir())


def test_two_gloo_processes_match_one(tiny_model, small_data, tmp_path):
    """torchrun with 2 CPU processes trains the same adapter as one process (dropout off)."""
    from safetensors.torch import load_file
    common = ["--model", tiny_model, "--data", f"{small_data[0]}/alfworld_train.jsonl", "--max-steps", "2",
              "--batch-size", "5", "--lora-dropout", "0", "--threads", "1"]
    run("train.py", *common, "--out", str(tmp_path / "one"))
    proc = torchrun("train.py", *common, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, torchrun_failure(proc)
    assert "x 2 process(es)" in proc.stdout
    a = load_file(tmp_path / "one" / "checkpoint-000002" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint-000002" / "adapter_model.safetensors")
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-6, key


@pytest.mark.parametrize("lora", ["q_proj,k_proj,v_proj,o_proj,up_proj", "q_proj,v_proj", ""])
def test_shared_prefix_gives_the_per_step_gradient(tiny_model, small_data, lora):
    """--share-prefix runs an episode's common prompt prefix once per batch; the gradient (and loss)
    must be those of running every step whole, including across several suffix micro-batches. With
    LoRA on q_proj and v_proj alone the first layer's keys take no gradient (this once crashed);
    "" is full fine-tuning."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    tok = lm.load_tokenizer(tiny_model)
    recs = steps.read_steps(os.path.join(small_data[0], "alfworld_train.jsonl"))
    examples = []
    for i, rec in enumerate(recs):
        ids, labels, kinds = lm.encode_step(tok, rec, mask_action=i % 3 == 0)
        examples.append({"ids": ids, "labels": labels, "kinds": kinds, "episode": rec["task_id"]})
    batch = list(range(len(examples)))
    groups = sft.shared_prefixes(examples, batch)
    shared = [(p, m) for p, m in groups if p]
    assert len(shared) >= 3 and all(len(m) > 1 and p >= lm.MIN_SHARED for p, m in shared)
    for p, members in shared:  # the prefix is common to all members and ends before any response token
        assert all(examples[i]["ids"][:p] == examples[members[0]]["ids"][:p] for i in members)
        assert all(set(examples[i]["kinds"][:p + 1]) == {lm.PROMPT} for i in members)
    n_sup = sum(sum(l != -100 for l in e["labels"][1:]) for e in examples)
    results = []
    for share in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        if lora:  # random B as well as A, so every LoRA weight gets a gradient
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                     target_modules=lora.split(",")))
        model.train()
        sums = sft.batch_backward(model, examples, batch, n_sup, tok.pad_token_id, max_tokens=300, share_prefix=share)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((sums, grads))
    (plain, g_plain), (fast, g_fast) = results
    assert fast["computed"] < 0.8 * plain["computed"]
    assert abs(fast["loss"] - plain["loss"]) < 1e-4 * plain["loss"] and fast["n"] == plain["n"] == n_sup
    assert g_plain.keys() == g_fast.keys() and len(g_plain) > 0
    for name in g_plain:
        scale = g_plain[name].abs().max().item()
        assert scale > 0, name
        assert (g_plain[name] - g_fast[name]).abs().max().item() < 1e-4 * scale, name


def test_init_adapter_starts_from_its_weights(tiny_model, small_data, tmp_path):
    from safetensors.torch import load_file
    train(tiny_model, small_data[0], tmp_path / "a", "--max-steps", "2", "--lr", "1e-2")
    init = tmp_path / "a" / "checkpoint-000002"
    train(tiny_model, small_data[0], tmp_path / "b", "--max-steps", "1", "--lr", "1e-12", "--init-adapter", str(init))
    a, b = load_file(init / "adapter_model.safetensors"), load_file(tmp_path / "b" / "checkpoint-000001" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # trained, not a fresh init (B = 0)
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-6, key
    proc = train(tiny_model, small_data[0], tmp_path / "c", "--max-steps", "1", "--lora-r", "8", "--init-adapter", str(init),
                 check=False)
    assert proc.returncode != 0 and "--init-adapter" in proc.stderr and "Traceback" not in proc.stderr
