"""report.py's k effect: k=0.3 minus k=0 paired by step (offline) and by game (online), per seed and pooled
over seeds with a crossed bootstrap (seeds and steps drawn together), on synthetic results whose true effects
are known."""
import csv
import json
import random

from conftest import run


def write_run(results, kind, k, seed, step, records):
    """One probe/eval output folder of run k{k}_seed{seed} at one checkpoint, as probe.py / evaluate.py write it."""
    run_dir = results / "runs" / f"k{k}_seed{seed}"
    ckpt = run_dir / f"checkpoint-{step:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"k": k, "seed": seed}))
    name = f"k{k}_seed{seed}/checkpoint-{step:06d}"
    out = results / kind / f"k{k}_seed{seed}"
    out.mkdir(parents=True)
    made = {"settings": {"seed": 0}, "inputs": {"data": "x"}, "checkpoints": {name: f"weights-{k}-{seed}"}}
    (out / "meta.json").write_text(json.dumps({"args": {}, "checkpoints": [[name, step, str(ckpt)]], "made_from": made}))
    with open(out / ("episodes.jsonl" if kind == "eval" else "records.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(dict(r, id=f"{name}/{r['id']}", checkpoint=name, step=step)) + "\n")


def test_k_effect_is_paired_and_pooled_over_seeds(tmp_path):
    rng = random.Random(0)
    results = tmp_path / "results"
    # 60 out-of-domain steps: k=0.3 gets +0.2 on CoT accuracy (seed 2: +0.4), prompt accuracy unchanged.
    # Consistency: k=0.3 is consistent on the same 30 of the 60 steps in every seed, k=0 on none.
    same = {i: i % 2 == 0 for i in range(60)}
    for seed, gain in ((0, 0.2), (1, 0.2), (2, 0.4)):
        base = {i: rng.random() < 0.3 for i in range(60)}
        for k in (0.0, 0.3):
            recs = [{"id": f"step{i}", "env": "alfworld", "split": "ood_test", "prompt_correct": base[i],
                     "cot_correct": float(base[i]) + (gain if k else 0.0), "consistent": bool(k and same[i])}
                    for i in range(60)]
            write_run(results, "probe", k, seed, 10, recs)
            eps = [{"id": f"cot/g{i}", "env": "alfworld", "split": "ood_test", "task_id": f"g{i}", "mode": "cot",
                    "won": bool(i < (10 if k else 5)), "errored": False} for i in range(20)]
            write_run(results, "eval", k, seed, 10, eps)
    run("report.py", "--results", str(results))
    rows = list(csv.DictReader(open(results / "report" / "k_effect.csv")))
    cot = {r["seed"]: r for r in rows if r["metric"] == "cot_correct" and r["split"] == "ood_test"}
    assert [round(float(cot[s]["diff"]), 3) for s in ("0", "1", "2")] == [0.2, 0.2, 0.4]
    pooled = cot["pooled (3)"]
    assert round(float(pooled["diff"]), 3) == round((0.2 + 0.2 + 0.4) / 3, 3) and int(pooled["n"]) == 180
    # Between-seed variation is in the pooled interval: it spans the seeds' spread, which no step varies by.
    assert float(pooled["diff_lo"]) <= 0.2 + 1e-9 and float(pooled["diff_hi"]) >= 0.4 - 1e-9
    # The t interval over the 3 seed means: 0.267 +- 4.303 * 0.115 / sqrt(3).
    assert pooled["diff_t"] == "[-0.02, 0.55]" and cot["0"]["diff_t"] == ""
    # The seeds agree step by step, so pooling them adds no information about the steps: the pooled interval is
    # as wide as one seed's (steps drawn anew for each seed would make it sqrt(3) times narrower).
    con = {r["seed"]: r for r in rows if r["metric"] == "consistent"}
    width = {s: float(con[s]["diff_hi"]) - float(con[s]["diff_lo"]) for s in ("0", "pooled (3)")}
    assert float(con["pooled (3)"]["diff"]) == 0.5 and width["pooled (3)"] > 0.85 * width["0"] > 0.2
    prompt = next(r for r in rows if r["metric"] == "prompt_correct" and r["seed"].startswith("pooled"))
    assert float(prompt["diff"]) == 0.0 and float(prompt["diff_lo"]) == 0.0 == float(prompt["diff_hi"])
    won = next(r for r in rows if r["metric"] == "won (cot mode)" and r["seed"].startswith("pooled"))
    assert round(float(won["diff"]), 3) == 0.25 and int(won["n"]) == 60
    assert "The k effect, paired" in (results / "report" / "results.md").read_text()


def test_claims_measures_are_pooled_over_seeds_with_their_change_from_base(tmp_path):
    rng = random.Random(1)
    results = tmp_path / "results"
    base = {i: rng.random() < 0.3 for i in range(50)}
    out = results / "probe" / "base"
    out.mkdir(parents=True)
    made = {"settings": {"seed": 0}, "inputs": {"data": "x", "model": "m"}, "checkpoints": {}}
    (out / "meta.json").write_text(json.dumps({"args": {}, "checkpoints": [["base", 0, None]], "made_from": made}))
    with open(out / "records.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"id": f"base/step{i}", "checkpoint": "base", "step": 0, "env": "alfworld",
                                "split": "id_test", "prompt_correct": base[i], "cot_correct": False}) + "\n")
    # Training adds 0.1, 0.3 and 0.5 to CoT accuracy by seed; prompt accuracy stays the base's.
    for seed, gain in ((0, 0.1), (1, 0.3), (2, 0.5)):
        recs = [{"id": f"step{i}", "env": "alfworld", "split": "id_test", "prompt_correct": base[i], "cot_correct": gain}
                for i in range(50)]
        write_run(results, "probe", 0.0, seed, 10, recs)
        eps = [{"id": f"{mode}/g{i}", "env": "alfworld", "split": "id_test", "task_id": f"g{i}", "mode": mode,
                "won": bool(i < (4 + seed if mode == "cot" else 2)), "errored": False}
               for mode in ("prompt", "cot") for i in range(20)]
        write_run(results, "eval", 0.0, seed, 10, eps)
    run("report.py", "--results", str(results))
    rows = {r["metric"]: r for r in csv.DictReader(open(results / "report" / "pooled_over_seeds.csv"))}
    cot = rows["cot_correct"]
    assert cot["seeds"] == "3" and cot["n"] == "150"
    assert round(float(cot["value"]), 3) == 0.3 == round(float(cot["change"]), 3)
    # Between-seed variation is in the interval: it spans the seeds' spread, which no step varies by.
    assert float(cot["change_lo"]) <= 0.1 + 1e-9 and float(cot["change_hi"]) >= 0.5 - 1e-9
    assert cot["change_t"] == "[-0.20, 0.80]"  # 0.3 +- 4.303 * 0.2 / sqrt(3): wider than the bootstrap's
    prompt = rows["prompt_correct"]
    assert float(prompt["change"]) == 0.0 == float(prompt["change_lo"]) == float(prompt["change_hi"])
    mean_base = sum(base.values()) / 50
    assert round(float(rows["cot_minus_prompt"]["value"]), 3) == round(0.3 - mean_base, 3)
    # Online, paired by game: CoT wins 4, 5, 6 of 20 by seed, prompt 2; no base rollouts, so no change.
    won = rows["won_cot_minus_prompt"]
    assert round(float(won["value"]), 3) == 0.15 and won["change"] == ""
    md = (results / "report" / "results.md").read_text()
    assert "Pooled over training seeds" in md and "| k=0.0, seed 2 | id_test | cot | 20 |" in md
    # Seed 0's paired differences are 2 ones and 18 zeros: sd 0.308, so (1.96 * 0.308 / 0.05)^2 = 146 games.
    assert "| k=0.0, seed 0 | id_test | 20 | 0.10 [0.00, 0.25] | 146 |" in md


def test_report_of_the_committed_fixture_is_unchanged(tmp_path):
    """report.py on tests/data/report_small/input gives, byte for byte, the committed expected/ (results.md and
    every CSV): a change to any number the report prints shows here (tests/make_report_fixture.py remakes it)."""
    import os
    import shutil

    from make_report_fixture import FIXTURE, normalized
    results = tmp_path / "input"
    shutil.copytree(os.path.join(FIXTURE, "input"), results)
    run("report.py", "--results", str(results))
    expected = sorted(os.listdir(os.path.join(FIXTURE, "expected")))
    made = sorted(n for n in os.listdir(results / "report") if not n.endswith(".png"))
    assert made == expected
    for name in expected:
        with open(os.path.join(FIXTURE, "expected", name)) as f:
            assert normalized((results / "report" / name).read_text(), str(results)) == f.read(), name
