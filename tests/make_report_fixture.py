"""Writes tests/data/report_small/: a small synthetic results tree (input/) and what report.py made of it
(expected/: results.md and every CSV), which test_report.py compares a fresh report.py run against.

Rerun only when report.py is meant to change its output, and commit the new expected/ with that change:
    .venv/bin/python tests/make_report_fixture.py
"""
import json
import os
import random
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "data", "report_small")
METRICS = ("prompt_correct", "cot_correct", "consistent", "ll_prompt_mean", "ll_thought_mean", "ll_own_mean",
           "attn_prompt", "grad_prompt")


def write(folder, name, meta, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    with open(os.path.join(folder, name), "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def step_record(rng, name, step, i, split, skill):
    """One probe record: CoT accuracy grows with skill, prompt accuracy less so."""
    p, c = rng.random() < 0.1 + 0.2 * skill, rng.random() < 0.1 + 0.5 * skill
    return {"id": f"{name}/alfworld/{split}/g{i}/step000", "checkpoint": name, "step": step, "env": "alfworld",
            "split": split, "prompt_correct": p, "cot_correct": c, "consistent": p == c,
            "revision": "none" if p == c else "helpful" if c else "harmful",
            "ll_prompt_mean": round(-2 + skill + rng.gauss(0, 0.3), 4), "ll_thought_mean": round(-1 + skill + rng.gauss(0, 0.2), 4),
            "ll_own_mean": round(-2.2 + skill + rng.gauss(0, 0.3), 4), "attn_prompt": round(0.6 + rng.gauss(0, 0.05), 4),
            "grad_prompt": round(0.75 + rng.gauss(0, 0.05), 4)}


def conflict_record(rng, name, step, i, split, skill):
    follows = rng.random() < 0.2 + 0.6 * skill
    return {"id": f"{name}/alfworld/{split}/g{i}/step000/conflict/template", "checkpoint": name, "step": step,
            "env": "alfworld", "split": split, "follows": follows, "anchors": not follows and rng.random() < 0.3,
            "neither": False, "prefers_a2": follows}


def episode(rng, name, step, i, split, mode, skill):
    won = rng.random() < (0.05 + (0.3 if mode == "cot" else 0.1) * skill) * (0.5 if split == "ood_test" else 1)
    return {"id": f"{name}/{mode}/alfworld/{split}/g{i}", "checkpoint": name, "step": step, "env": "alfworld",
            "split": split, "task_id": f"alfworld/{split}/g{i}", "mode": mode, "won": won, "score": float(won),
            "errored": False}


def normalized(text, results):
    """A report's text with its --results folder written as <results>, so reports of copies compare."""
    return text.replace(results, "<results>")


def build(results):
    rng = random.Random(0)
    made = {"settings": {"seed": 0}, "inputs": {"data": "d0", "model": "m0"}, "checkpoints": {}}
    base = {"args": {}, "checkpoints": [["base", 0, None]], "made_from": made}
    splits = [(s, i) for s in ("id_test", "ood_test") for i in range(12)]
    write(os.path.join(results, "probe", "base"), "records.jsonl", base,
          [step_record(rng, "base", 0, i, s, 0.0) for s, i in splits])
    write(os.path.join(results, "conflicts", "base"), "records.jsonl", base,
          [conflict_record(rng, "base", 0, i, s, 0.0) for s, i in splits])
    for k in (0.0, 0.3):
        for seed in (0, 1):
            run = f"k{k}_seed{seed}"
            ckpts = [[f"{run}/checkpoint-{step:06d}", step, f"runs/{run}/checkpoint-{step:06d}"] for step in (5, 10)]
            made_run = dict(made, checkpoints={c[0]: f"weights-{run}-{c[1]}" for c in ckpts})
            meta = {"args": {}, "checkpoints": ckpts, "made_from": made_run}
            skill = {5: 0.4, 10: 0.8}
            write(os.path.join(results, "probe", run), "records.jsonl", meta,
                  [step_record(rng, c[0], c[1], i, s, skill[c[1]] + 0.1 * k) for c in ckpts for s, i in splits])
            write(os.path.join(results, "conflicts", run), "records.jsonl", meta,
                  [conflict_record(rng, c[0], c[1], i, s, skill[c[1]]) for c in ckpts for s, i in splits])
            last = ckpts[-1]
            write(os.path.join(results, "eval", run), "episodes.jsonl", dict(meta, checkpoints=[last]),
                  [episode(rng, last[0], last[1], i, s, mode, 1.0 + k) for mode in ("prompt", "cot") for s, i in splits])


if __name__ == "__main__":
    shutil.rmtree(FIXTURE, ignore_errors=True)
    build(os.path.join(FIXTURE, "input"))
    subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "--results", os.path.join(FIXTURE, "input")],
                   cwd=ROOT, check=True)
    os.rename(os.path.join(FIXTURE, "input", "report"), os.path.join(FIXTURE, "expected"))
    os.remove(os.path.join(FIXTURE, "input", ".report.lock"))  # report.py's writer lock: not part of the input
    for name in os.listdir(os.path.join(FIXTURE, "expected")):
        path = os.path.join(FIXTURE, "expected", name)
        if name.endswith(".png"):  # pixels depend on the fonts installed; the numbers are in the CSVs
            os.remove(path)
        else:
            with open(path) as f:
                text = normalized(f.read(), os.path.join(FIXTURE, "input"))
            with open(path, "w") as f:
                f.write(text)
    print(f"wrote {FIXTURE}")
