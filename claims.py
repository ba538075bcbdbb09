"""The paper's claims (PAPER.md), each judged per environment from a study's pooled numbers (report.py).

A claim's measure comes with two intervals: the crossed bootstrap over seeds and items (report.py's
pooled_over_seeds and k_effect: between-seed and between-item variation together) and the t interval over the
seed means (seeds alone, at t's width for few seeds). A verdict needs both on one side of the claim's line;
with one training seed there is no t interval, and the verdict says "one seed" (no seed variation in it).

    claim         measure (last checkpoints of the smallest k, in domain unless said)        supported when
    prompt_gains  change from the base model of CoT-minus-prompt accuracy (offline)          < 0
    consistency   change from the base model of prompt action == CoT action                  > 0
    online_flat   online score, paired by game: both modes' change from the base model > 0,
                  and CoT-minus-prompt's change within +-FLAT_MARGIN                         both
    conflicts     change from the base model of following the conflicting trace (a2)         < 0
    ood_anchored  anchoring on the prompt (a1), out of domain vs in domain                   OOD above ID
    gradient      share of the action's input gradient on the prompt                         inside GRADIENT_RANGE
    k_ood         k=0.3 minus k=0, paired by game, out of domain: online CoT-mode score
                  (offline CoT accuracy where no rollout has success to move)                > 0
Online score is the environment's partial credit (ScienceWorld), the share of leading turns passed (multi-turn BFCL), or
success itself (ALFWorld, single-turn BFCL).
"""
import re

FLAT_MARGIN = 0.10      # "stays roughly flat": CoT-minus-prompt moves by less than this from the base model
GRADIENT_RANGE = (0.70, 0.85)
ENV_NAMES = {"alfworld": "ALFWorld", "scienceworld": "ScienceWorld", "bfcl": "BFCL single-turn",
             "bfcl_mt": "BFCL multi-turn"}
CLAIMS = {
    "prompt_gains": "training gains land in the prompt action",
    "consistency": "consistency (prompt action = CoT action) rises",
    "online_flat": "online CoT minus prompt stays flat while both rise",
    "conflicts": "later checkpoints follow a conflicting trace less",
    "ood_anchored": "out-of-domain prompts are more anchored",
    "gradient": "70-85% of the action's gradient lands on the prompt",
    "k_ood": "k = 0.3 improves out-of-domain success",
}
# The paper's figures as one secondary digest reports them (PAPER.md; unconfirmed). Its BFCL out-of-domain
# setting is multi-turn long context, our bfcl_mt.
PAPER = {
    ("gradient", "alfworld"): "73% (Qwen3 4B-14B)",
    ("gradient", "scienceworld"): "77-79% (Qwen3 4B-14B)",
    ("gradient", "bfcl_mt"): "83-85% (Qwen3 4B-14B)",
    ("k_ood", "alfworld"): "0.55 -> 0.63",
    ("k_ood", "scienceworld"): "0.25 -> 0.27",
    ("k_ood", "bfcl_mt"): "0.58 -> 0.62",
}


def parse_t(text):
    """'[-0.02, 0.55]' -> (-0.02, 0.55); '' (one seed) -> None."""
    m = re.match(r"\[(\S+), (\S+)\]$", text or "")
    return (float(m.group(1)), float(m.group(2))) if m else None


def fmt(value, lo, hi, t, signed=True):
    f = "{:+.2f}" if signed else "{:.2f}"
    out = f"{f.format(value)} [{f.format(lo)}, {f.format(hi)}]"
    t = parse_t(t)
    return out + (f"; t [{f.format(t[0])}, {f.format(t[1])}]" if t else "")  # one seed: the verdict says so


def intervals(lo, hi, t):
    """The bootstrap interval and, with several seeds, the t interval ('[a, b]' text)."""
    return [(lo, hi)] + ([parse_t(t)] if parse_t(t) else [])


def side(lo, hi, t, line=0.0):
    """+1 when both intervals are above line, -1 when both are below, else 0 (one seed: the bootstrap's alone)."""
    boxes = intervals(lo, hi, t)
    if all(a > line for a, _ in boxes):
        return 1
    if all(b < line for _, b in boxes):
        return -1
    return 0


def seeds(row):
    """Training seeds behind a row: pooled_over_seeds' `seeds`, or k_effect's 'pooled (N)' (a per-seed row: 1)."""
    if "seeds" in row:
        return int(row["seeds"])
    m = re.match(r"pooled \((\d+)\)$", str(row.get("seed", "")))
    return int(m.group(1)) if m else 1


def seeds_note(*rows):
    return " (one seed)" if any(seeds(r) < 2 for r in rows) else ""


def directional(row, key, expect, words=("supported", "contradicted", "cannot decide")):
    """Verdict of a measure whose claim says its sign (expect +1 or -1)."""
    s = side(row[f"{key}_lo"], row[f"{key}_hi"], row.get(f"{key}_t"))
    return (words[0] if s == expect else words[1] if s == -expect else words[2]) + seeds_note(row)


def judge(env, pooled, effect):
    """Claim rows of one environment from its pooled_over_seeds and k_effect rows (report.py)."""
    ks = sorted({r["k"] for r in pooled if isinstance(r["k"], float)})
    if not ks:
        return []
    k0 = ks[0]
    got = {(r["metric"], r["split"]): r for r in pooled if r["k"] == k0}
    rows = []

    def add(claim, measured, verdict):
        rows.append({"env": env, "claim": claim, "statement": CLAIMS[claim], "measured": measured, "verdict": verdict,
                     "paper": PAPER.get((claim, env), "")})

    def change(metric, split="id_test"):
        r = got.get((metric, split))
        return r if r and r.get("change") is not None else None

    r = change("cot_minus_prompt")
    if r:
        ood = change("cot_minus_prompt", "ood_test")
        add("prompt_gains", "CoT minus prompt accuracy gain " + fmt(r["change"], r["change_lo"], r["change_hi"], r["change_t"])
            + (f" (OOD {ood['change']:+.2f})" if ood else ""), directional(r, "change", -1))
    r = change("consistent")
    if r:
        add("consistency", fmt(r["change"], r["change_lo"], r["change_hi"], r["change_t"]), directional(r, "change", 1))
    rp, rc, rd = change("score_prompt"), change("score_cot"), change("score_cot_minus_prompt")
    if rp and rc and rd:
        rise = [side(x["change_lo"], x["change_hi"], x["change_t"]) for x in (rp, rc)]
        flat = (1 if all(-FLAT_MARGIN < a and b < FLAT_MARGIN for a, b in intervals(rd["change_lo"], rd["change_hi"], rd["change_t"]))
                else -1 if side(rd["change_lo"], rd["change_hi"], rd["change_t"]) else 0)
        verdict = ("supported" if rise == [1, 1] and flat == 1 else
                   "contradicted" if -1 in rise or flat == -1 else "cannot decide") + seeds_note(rp, rc, rd)
        add("online_flat", f"change from base: prompt {fmt(rp['change'], rp['change_lo'], rp['change_hi'], rp['change_t'])}, "
            f"CoT {fmt(rc['change'], rc['change_lo'], rc['change_hi'], rc['change_t'])}, CoT minus prompt "
            f"{fmt(rd['change'], rd['change_lo'], rd['change_hi'], rd['change_t'])} (flat: within +-{FLAT_MARGIN})", verdict)
    else:
        r = got.get(("score_cot_minus_prompt", "id_test"))
        if r:
            add("online_flat", "CoT minus prompt score " + fmt(r["value"], r["value_lo"], r["value_hi"], r["value_t"])
                + " at the last checkpoint; the base model not rolled out", "cannot decide (no base model online)")
    r = change("follows")
    if r:
        add("conflicts", "following " + fmt(r["change"], r["change_lo"], r["change_hi"], r["change_t"]), directional(r, "change", -1))
    i, o = got.get(("anchors", "id_test")), got.get(("anchors", "ood_test"))
    if i and o:
        ti, to = parse_t(i["value_t"]), parse_t(o["value_t"])
        above = o["value_lo"] > i["value_hi"] and (not (ti and to) or to[0] > ti[1])
        below = o["value_hi"] < i["value_lo"] and (not (ti and to) or to[1] < ti[0])
        add("ood_anchored", f"anchoring OOD {fmt(o['value'], o['value_lo'], o['value_hi'], o['value_t'], False)}, "
            f"ID {fmt(i['value'], i['value_lo'], i['value_hi'], i['value_t'], False)}",
            ("supported" if above else "contradicted" if below else "not seen: the intervals overlap") + seeds_note(i, o))
    r = got.get(("grad_prompt", "id_test"))
    if r:
        lo_r, hi_r = GRADIENT_RANGE
        boxes = intervals(r["value_lo"], r["value_hi"], r["value_t"])
        inside = all(lo_r <= a and b <= hi_r for a, b in boxes)
        outside = all(b < lo_r or a > hi_r for a, b in boxes)
        add("gradient", fmt(r["value"], r["value_lo"], r["value_hi"], r["value_t"], False),
            ("supported" if inside else "contradicted" if outside else "cannot decide") + seeds_note(r))
    pooled_effect = {(e["metric"], e["split"]): e for e in effect if str(e["seed"]).startswith("pooled")
                     and e["k"] == 0.3 and e["vs_k"] == k0}
    online = pooled_effect.get(("score (cot mode)", "ood_test"))
    offline = pooled_effect.get(("cot_correct", "ood_test"))
    moves = online and (online["diff_lo"], online["diff_hi"]) != (0.0, 0.0)  # no game's score changed: no power
    primary, name = (online, "online CoT-mode score") if moves or not offline else (offline, "offline CoT accuracy")
    if primary:
        other = offline if primary is online else online
        extra = ("; no game's score changed" if primary is online and not moves else
                 f"; offline CoT accuracy {offline['diff']:+.2f}" if other is offline and offline else
                 f"; online CoT-mode score {online['diff']:+.2f} (no game changed)" if other is online and online else "")
        verdict = ("cannot decide: no power" + seeds_note(primary) if primary is online and not moves else
                   directional(primary, "diff", 1, ("supported", "contradicted", "not supported: the interval holds 0")))
        add("k_ood", f"{name} " + fmt(primary["diff"], primary["diff_lo"], primary["diff_hi"], primary["diff_t"]) + extra,
            verdict)
    return rows


def rule():
    """The verdict rule, as one paragraph for a report (this module's docstring, second paragraph)."""
    return __doc__.split("\n\n")[1].strip().replace("\n", " ")


def verdicts(rows, envs):
    """Markdown: the verdicts alone, a row per claim and a column per environment (the README's table)."""
    by = {(r["claim"], r["env"]): r["verdict"] for r in rows}
    lines = ["| claim (PAPER.md) | " + " | ".join(ENV_NAMES.get(e, e) for e in envs) + " |", "|" + "---|" * (len(envs) + 1)]
    lines += [f"| {statement} | " + " | ".join(by.get((claim, e), "not measured") for e in envs) + " |"
              for claim, statement in CLAIMS.items()]
    return "\n".join(lines)


def table(rows, envs):
    """Markdown: a row per claim, a column per environment (verdict and measure), the paper's figures beside."""
    by = {(r["claim"], r["env"]): r for r in rows}
    lines = ["| claim (PAPER.md) | " + " | ".join(ENV_NAMES.get(e, e) for e in envs) + " | paper (reported, secondary) |",
             "|" + "---|" * (len(envs) + 2)]
    for claim, statement in CLAIMS.items():
        cells = []
        for e in envs:
            r = by.get((claim, e))
            cells.append(f"**{r['verdict']}**: {r['measured']}" if r else "not measured")
        paper = "; ".join(f"{ENV_NAMES[e]} {PAPER[(claim, e)]}" for e in ENV_NAMES if (claim, e) in PAPER)
        lines.append(f"| {statement} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)
