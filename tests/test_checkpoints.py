"""Checkpoint series from other trainers: the HF Trainer / TRL layout (checkpoint-N, N not zero-padded,
trainer_state.json), PEFT adapters and full model folders, ordered by training step, scored like
train.py's own checkpoints, and reported."""
import json
import os
import shutil

from conftest import run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hf_trainer_series(tiny_model, folder):
    """checkpoint-5, -10, -100 as the HF Trainer writes them for a PEFT model (made with peft alone)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    for i, step in enumerate((100, 5, 10)):  # written out of order on purpose
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
        ckpt = folder / f"checkpoint-{step}"
        model.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 100}))
    return folder


def records(path):
    return [json.loads(line) for line in open(path)]


def test_trainer_series_is_ordered_scored_and_reported(tiny_model, small_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    series = hf_trainer_series(tiny_model, tmp_path / "trl_run")
    # A full fine-tuning checkpoint (config.json + model.safetensors), HF Trainer layout too.
    torch.manual_seed(7)
    full = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full.save_pretrained(tmp_path / "full_run" / "checkpoint-7")
    (tmp_path / "full_run" / "checkpoint-7" / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    # The same adapter weights as checkpoint-10, laid out as train.py writes them.
    ours = tmp_path / "k0.3_seed1" / "checkpoint-000010"
    shutil.copytree(series / "checkpoint-10", ours)
    os.remove(ours / "trainer_state.json")
    (ours / "meta.json").write_text(json.dumps({"step": 10, "model_path": tiny_model,
                                                "args": {"mask_action_frac": 0.3, "seed": 1, "no_cot": False}}))

    data = os.path.join(small_data[0], "alfworld_id_test.jsonl")
    common = ["--model", tiny_model, "--data", data, "--max-records", "2", "--max-thought-tokens", "8",
              "--max-action-tokens", "6", "--attribution-samples", "1", "--threads", "1"]
    results = tmp_path / "results"
    run("probe.py", *common, "--checkpoints", str(series), str(tmp_path / "full_run"), "--out", str(results / "probe" / "trl"))
    run("probe.py", *common, "--no-base", "--checkpoints", str(tmp_path / "k0.3_seed1"), "--out", str(results / "probe" / "ours"))
    meta = json.loads((results / "probe" / "trl" / "meta.json").read_text())
    assert [(name, step) for name, step, _ in meta["checkpoints"]] == [
        ("base", 0), ("trl_run/checkpoint-5", 5), ("trl_run/checkpoint-10", 10), ("trl_run/checkpoint-100", 100),
        ("full_run/checkpoint-7", 7)]
    recs = records(results / "probe" / "trl" / "records.jsonl")
    assert {r["checkpoint"] for r in recs} == {name for name, _, _ in meta["checkpoints"]}
    # The HF Trainer checkpoint and train.py's checkpoint of the same weights score the same.
    skip = {"id", "checkpoint"}
    theirs = {r["record_id"]: {k: v for k, v in r.items() if k not in skip} for r in recs if r["checkpoint"] == "trl_run/checkpoint-10"}
    mine = {r["record_id"]: {k: v for k, v in r.items() if k not in skip} for r in records(results / "probe" / "ours" / "records.jsonl")}
    assert theirs == mine and len(mine) == 2
    # Different weights give different scores (the series is not one model four times).
    by_ckpt = {}
    for r in recs:
        by_ckpt.setdefault(r["checkpoint"], []).append(r["ll_prompt_sum"])
    assert len({tuple(v) for v in by_ckpt.values()}) == 5

    # Without --model, the adapters' own base_model_name_or_path (a local folder here) is the base.
    proc = run("probe.py", *[a for a in common if a not in ("--model", tiny_model)], "--no-base", "--checkpoints",
               str(series / "checkpoint-10"), "--out", str(tmp_path / "probe_nomodel"))
    assert f"model {tiny_model}" in proc.stdout
    again = {r["record_id"]: {k: v for k, v in r.items() if k not in skip}
             for r in records(tmp_path / "probe_nomodel" / "records.jsonl")}
    assert again == theirs

    # evaluate.py takes the same run folder, every checkpoint in step order.
    run("evaluate.py", "--model", tiny_model, "--adapter", str(series), "--all-checkpoints", "--data", str(small_data[0]),
        "--env", "bfcl", "--split", "id_test", "--max-episodes", "1", "--mode", "prompt", "--num-envs", "1",
        "--threads", "1", "--max-action-tokens", "6", "--out", str(results / "eval" / "trl"))
    meta = json.loads((results / "eval" / "trl" / "meta.json").read_text())
    assert [step for _, step, _ in meta["checkpoints"]] == [5, 10, 100]

    # report.py groups the other trainer's runs by folder name (k and seed unknown) and plots them.
    run("report.py", "--results", str(results))
    agreement = (results / "report" / "agreement.csv").read_text()
    for run_name, step in (("trl_run", 5), ("trl_run", 100), ("full_run", 7), ("k0.3_seed1", 10)):
        assert f"{run_name},{step}," in agreement, (run_name, step)
    assert "trl_run" in (results / "report" / "online.csv").read_text()
    # A run.json gives k and seed to such a run.
    (series / "run.json").write_text(json.dumps({"k": 0.3, "seed": 2}))
    run("report.py", "--results", str(results))
    assert "k=0.3" in (results / "report" / "online.csv").read_text()


def test_a_folder_that_is_no_checkpoint_fails_before_probing(tiny_model, small_data, tmp_path):
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-3" / "notes.txt").write_text("hello")
    proc = run("probe.py", "--model", tiny_model, "--checkpoints", str(tmp_path / "run"), "--data",
               os.path.join(small_data[0], "alfworld_id_test.jsonl"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "checkpoint-3: neither adapter_config.json (a PEFT adapter) nor config.json (a model)" in proc.stderr
    assert not (tmp_path / "out").exists()
