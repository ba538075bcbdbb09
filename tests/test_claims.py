"""The paper's claims judged per environment (claims.py through report.py): each verdict from both intervals, the
online "flat while both rise" claim across checkpoints, and the table across environments (--combine)."""
import csv
import json

import pytest

import claims
from conftest import run


def pooled(metric, split="id_test", k=0.0, value=0.5, lo=0.4, hi=0.6, t="[0.35, 0.65]", change=None, change_lo=None,
           change_hi=None, change_t="", seeds=3):
    return {"metric": metric, "split": split, "k": k, "seeds": seeds, "n": 300, "value": value, "value_lo": lo,
            "value_hi": hi, "value_t": t, "change": change, "change_lo": change_lo, "change_hi": change_hi,
            "change_t": change_t}


def verdicts(rows, effect=()):
    return {r["claim"]: r["verdict"] for r in claims.judge("alfworld", rows, list(effect))}


def test_a_verdict_needs_both_intervals_on_one_side():
    gains = dict(change=-0.2, change_lo=-0.3, change_hi=-0.1)
    assert verdicts([pooled("cot_minus_prompt", **gains, change_t="[-0.35, -0.05]")])["prompt_gains"] == "supported"
    # The bootstrap excludes 0 but the seeds' t interval does not: no verdict.
    assert verdicts([pooled("cot_minus_prompt", **gains, change_t="[-0.45, 0.05]")])["prompt_gains"] == "cannot decide"
    assert verdicts([pooled("consistent", change=-0.2, change_lo=-0.3, change_hi=-0.1,
                            change_t="[-0.3, -0.1]")])["consistency"] == "contradicted"
    # One seed: no t interval, and the verdict says so.
    assert verdicts([pooled("consistent", change=0.2, change_lo=0.1, change_hi=0.3, t="",
                            change_t="", seeds=1)])["consistency"] == "supported (one seed)"


def test_gradient_share_inside_outside_or_undecided():
    assert verdicts([pooled("grad_prompt", value=0.76, lo=0.72, hi=0.79, t="[0.74, 0.78]")])["gradient"] == "supported"
    assert verdicts([pooled("grad_prompt", value=0.5, lo=0.45, hi=0.55, t="[0.4, 0.6]")])["gradient"] == "contradicted"
    assert verdicts([pooled("grad_prompt", value=0.7, lo=0.65, hi=0.75, t="[0.6, 0.8]")])["gradient"] == "cannot decide"


def test_online_flat_needs_both_modes_to_rise_and_the_difference_to_stay_within_the_margin():
    rise = dict(change=0.3, change_lo=0.2, change_hi=0.4, change_t="[0.15, 0.45]")
    flat = dict(change=0.01, change_lo=-0.05, change_hi=0.06, change_t="[-0.04, 0.07]")
    rows = [pooled("score_prompt", **rise), pooled("score_cot", **rise), pooled("score_cot_minus_prompt", **flat)]
    assert verdicts(rows)["online_flat"] == "supported"
    moved = dict(flat, change=0.2, change_lo=0.12, change_hi=0.3, change_t="[0.11, 0.29]")
    assert verdicts(rows[:2] + [pooled("score_cot_minus_prompt", **moved)])["online_flat"] == "contradicted"
    wide = dict(flat, change_lo=-0.15, change_hi=0.17)  # holds 0 and passes the margin: neither
    assert verdicts(rows[:2] + [pooled("score_cot_minus_prompt", **wide)])["online_flat"] == "cannot decide"
    # Without the base model online there is no change to judge.
    assert verdicts([pooled("score_cot_minus_prompt")])["online_flat"] == "cannot decide (no base model online)"


def test_k_effect_online_first_offline_where_no_game_moved():
    def eff(metric, diff, lo, hi, t):
        return {"metric": metric, "split": "ood_test", "k": 0.3, "vs_k": 0.0, "seed": "pooled (3)", "n": 96,
                "diff": diff, "diff_lo": lo, "diff_hi": hi, "diff_t": t}
    base = [pooled("cot_correct")]
    moved = [eff("score (cot mode)", 0.1, 0.04, 0.16, "[0.02, 0.18]"), eff("cot_correct", -0.1, -0.2, 0.0, "[-0.3, 0.1]")]
    rows = {r["claim"]: r for r in claims.judge("bfcl", base, moved)}
    assert rows["k_ood"]["verdict"] == "supported" and rows["k_ood"]["measured"].startswith("online CoT-mode score +0.10")
    still = [eff("score (cot mode)", 0.0, 0.0, 0.0, "[0.00, 0.00]"), eff("cot_correct", 0.05, -0.02, 0.12, "[-0.1, 0.2]")]
    rows = {r["claim"]: r for r in claims.judge("alfworld", base, still)}
    assert rows["k_ood"]["measured"].startswith("offline CoT accuracy +0.05")
    assert rows["k_ood"]["verdict"] == "not supported: the interval holds 0"
    assert rows["k_ood"]["paper"] == "0.55 -> 0.63"
    # No game won by either k and nothing probed offline: no power, not evidence against the claim.
    rows = {r["claim"]: r for r in claims.judge("alfworld", base, still[:1])}
    assert rows["k_ood"]["verdict"] == "cannot decide: no power"


def write_eval(results, name, ckpts, episodes):
    """An evaluate.py output folder: ckpts [(checkpoint name, step, path or None)], episodes per checkpoint."""
    out = results / "eval" / name
    out.mkdir(parents=True)
    made = {"settings": {"seed": 0}, "inputs": {"data": "x", "model": "m"},
            "checkpoints": {c: f"weights-{c}" for c, _, p in ckpts if p}}
    (out / "meta.json").write_text(json.dumps({"args": {}, "checkpoints": [list(c) for c in ckpts], "made_from": made}))
    with open(out / "episodes.jsonl", "w") as f:
        for c, step, _ in ckpts:
            for e in episodes[c]:
                f.write(json.dumps(dict(e, id=f"{c}/{e['mode']}/{e['task_id']}", checkpoint=c, step=step)) + "\n")


def games(n, prompt_wins, cot_wins, split="id_test"):
    return [{"env": "bfcl", "split": split, "task_id": f"t{i}", "mode": mode, "won": won, "score": float(won),
             "errored": False}
            for i in range(n) for mode, won in (("prompt", i < prompt_wins), ("cot", i < cot_wins))]


def test_online_across_checkpoints_from_the_base_model(tmp_path):
    """Both modes rise from the base model over two checkpoints while CoT's lead stays 0.1: the by-step table holds the
    paired differences, and with one seed the verdict is supported, said to rest on one seed."""
    results = tmp_path / "results"
    write_eval(results, "base", [("base", 0, None)], {"base": games(100, 0, 10)})
    run_dir = results / "runs" / "k0.0_seed0"
    names = []
    for step in (10, 20):
        (run_dir / f"checkpoint-{step:06d}").mkdir(parents=True)
        names.append((f"k0.0_seed0/checkpoint-{step:06d}", step, str(run_dir / f"checkpoint-{step:06d}")))
    (run_dir / "run.json").write_text(json.dumps({"k": 0.0, "seed": 0}))
    write_eval(results, "k0.0_seed0", names, {names[0][0]: games(100, 20, 30), names[1][0]: games(100, 40, 50)})
    run("report.py", "--results", str(results))
    rows = list(csv.DictReader(open(results / "report" / "online_by_step.csv")))
    got = {r["step"]: (float(r["score_prompt"]), float(r["score_cot"]), float(r["score_cot_minus_prompt"])) for r in rows}
    assert got == {"0": (0.0, 0.1, 0.1), "10": (0.2, 0.3, 0.1), "20": (0.4, 0.5, 0.1)}
    assert (results / "report" / "online_by_step.png").exists()
    verdict = {r["claim"]: r for r in csv.DictReader(open(results / "report" / "claims.csv"))}["online_flat"]
    assert verdict["env"] == "bfcl" and verdict["verdict"] == "supported (one seed)"


def test_combine_sets_environments_side_by_side_and_refuses_two_studies_of_one(tmp_path):
    for name, env, verdict in (("a", "alfworld", "supported"), ("b", "bfcl", "contradicted"), ("c", "bfcl", "supported")):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "claims.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["env", "claim", "statement", "measured", "verdict", "paper"])
            w.writeheader()
            w.writerow({"env": env, "claim": "consistency", "statement": claims.CLAIMS["consistency"],
                        "measured": "+0.30 [+0.20, +0.40]; t [+0.10, +0.50]", "verdict": verdict, "paper": ""})
    out = tmp_path / "claims"
    run("report.py", "--combine", str(tmp_path / "b"), str(tmp_path / "a"), "--combine-out", str(out))
    text = (out / "results.md").read_text()
    assert "| claim (PAPER.md) | ALFWorld | BFCL single-turn | paper (reported, secondary) |" in text
    assert "| consistency (prompt action = CoT action) rises | **supported**: +0.30" in text
    assert "**contradicted**" in text and "not measured" in text  # the other claims
    assert (out / "claims.csv").exists()
    short = (out / "verdicts.md").read_text().splitlines()  # the README's table: verdicts alone
    assert short[0] == "| claim (PAPER.md) | ALFWorld | BFCL single-turn |" and len(short) == 2 + len(claims.CLAIMS)
    assert "| consistency (prompt action = CoT action) rises | supported | contradicted |" in short
    r = run("report.py", "--combine", str(tmp_path / "b"), str(tmp_path / "c"), "--combine-out", str(out), check=False)
    assert r.returncode != 0 and "one study per environment" in r.stderr
    (tmp_path / "c" / "claims.csv").write_text("env,claim\nbfcl,consistency\n")
    r = run("report.py", "--combine", str(tmp_path / "c"), "--combine-out", str(out), check=False)
    assert r.returncode != 0 and "c/claims.csv:1: no column 'measured'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text,parsed", [("[-0.02, 0.55]", (-0.02, 0.55)), ("", None), (None, None)])
def test_parse_t(text, parsed):
    assert claims.parse_t(text) == parsed
