"""make_conflicts.py: conflicting-CoT probe records. A reasoning trace that argues for a different, valid action.

For each step record with a list of valid actions, draw a2 != a1 (the reference action) from that
list, so a2 is never impossible, and write a trace t2 that argues for a2 in the style of the real
thoughts, in one or both ways (--methods):
  borrow    the thought of another episode's step whose action has a2's kind (same verb and
            argument slots), with its object and location names rewritten to a2's
  template  a wording for a2's verb from data/templates/conflicts.json, filled with a2's arguments
--keep-frac keeps only the first fraction of t2's words. BFCL steps have no valid-action list and
are skipped (counted). Seeded: the same inputs and --seed write byte-identical output.

probe.py --conflicts reads the output: prompt + t2 + action tag -> does the model follow t2 (a2),
anchor on the prompt (a1), or neither. Writes --out (JSONL) and <out>.meta.json. One record:
    "id":        "alfworld/id_test/pick_heat-1/trial_0/step003/conflict/borrow"
    "step_id":   "alfworld/id_test/pick_heat-1/trial_0/step003"    the original step
    "env", "task_type", "split", "messages"                        copied from the step (the prompt)
    "a1":        "take egg 1 from fridge 1"                        the reference action
    "a2":        "go to countertop 2"                              a different valid action
    "trace":     "I have not looked at countertop 2 yet, so that is where I check first."
    "method":    "borrow"                                          borrow | template
    "source":    "alfworld/train/pick_clean-4/trial_0/step000"     borrowed step id, or template key
    "keep_frac": 1.0

    python make_conflicts.py --data 'data/generated/*_test.jsonl' --out data/generated/conflicts.jsonl
    python make_conflicts.py --data /tmp/d/alfworld_id_test.jsonl --pool /tmp/d/alfworld_train.jsonl --max-per-split 5 --out /tmp/c.jsonl
"""
import argparse
import glob
import os
import random
import re
import sys

RESULT_FLAGS = ("methods", "keep_frac", "max_per_split", "seed")  # with the input files: what the records depend on
parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    epilog="An output holds one configuration and one writer: an existing --out is rewritten only with the same "
           + ", ".join("--" + f.replace("_", "-") for f in RESULT_FLAGS) + " and input files (the same bytes again); "
           "otherwise one line says what differs. A second process on it is refused.")
parser.add_argument("--data", nargs="+", default=["data/generated/*_id_test.jsonl", "data/generated/*_ood_test.jsonl"],
                    help="step JSONL files or globs (sorted) to build conflicts for")
parser.add_argument("--pool", nargs="+", default=["data/generated/*_train.jsonl"],
                    help="step JSONL files or globs whose thoughts may be borrowed (plus --data itself)")
parser.add_argument("--methods", default="borrow,template", help="comma list of borrow, template")
parser.add_argument("--keep-frac", type=float, default=1.0, help="fraction in (0, 1] of the trace's words kept")
parser.add_argument("--max-per-split", type=int, default=0,
                    help="per env x split, a seeded sample of this many steps (0 = all): the steps probe.py --max-records N picks with the same --seed")
parser.add_argument("--seed", type=int, default=0, help="seeds the step sample, a2 and the trace choice")
parser.add_argument("--out", default="data/generated/conflicts.jsonl", help="output JSONL")
args = parser.parse_args()

import cli  # noqa: E402
import jsonio  # noqa: E402
import provenance  # noqa: E402
import steps  # noqa: E402

cli.exit_cleanly()

# Verb phrases that take more than one word; any other action's verb is its first word.
VERBS = ("open door to", "go to", "teleport to", "pick up", "put down", "focus on", "look at", "look around")
SLOTS = r" (to|from|with|into|in|on|in/on) "


def fail(msg):
    sys.exit(f"error: {msg}")


def parse_action(action):
    """(kind, args): kind = verb + the words between arguments, e.g. ('take|from', ['egg 1', 'fridge 1'])."""
    a = " ".join(action.strip().split())
    verb = next((v for v in VERBS if a == v or a.startswith(v + " ")), a.split(" ")[0] if a else "")
    rest = a[len(verb):].strip()
    if not rest:
        return verb, []
    parts = re.split(SLOTS, rest, maxsplit=1)
    if len(parts) == 3:
        return f"{verb}|{parts[1]}", [parts[0], parts[2]]
    return verb, [rest]


def bare(name):
    """'fridge 1' -> 'fridge': the name without its instance number."""
    return re.sub(r"\s+\d+$", "", name)


def rewrite(thought, src_args, dst_args):
    """Replace the borrowed step's argument names by a2's: full names first, then bare names."""
    pairs = list(zip(src_args, dst_args)) + [(bare(s), bare(d)) for s, d in zip(src_args, dst_args)]
    # One pass with placeholders, so a name swapped in is never swapped again.
    marks = {}
    for n, (s, d) in enumerate(pairs):
        if not s or s == d:
            continue
        mark = f"\x00{n}\x00"
        thought, k = re.subn(rf"(?<![\w-]){re.escape(s)}(?![\w-])", mark, thought, flags=re.I)
        if k:
            marks[mark] = d
    for mark, d in marks.items():
        thought = thought.replace(mark, d)
    return thought


def expand(patterns):
    files = sorted({f for pattern in patterns for f in (sorted(glob.glob(pattern)) or [pattern])})
    for path in files:
        if not os.path.exists(path):
            fail(f"data file not found: {path}")
    return files


def keep(trace):
    return steps.first_words(trace, args.keep_frac, at_least=1)


methods = args.methods.split(",")
for m in methods:
    if m not in ("borrow", "template"):
        fail(f"--methods: unknown method {m!r}, expected borrow and/or template")
cli.check_numbers(args, {"keep_frac": (("<", 0), 1), "max_per_split": (0, None)}, fail)
data_files, pool_files = expand(args.data), expand(args.pool)
try:
    records = steps.read_steps_files(data_files)
    pool = {}
    for path in sorted(set(pool_files) | set(data_files)):
        for lineno, r in steps.read_steps(path, with_lines=True):
            if not isinstance(r.get("task_id"), str):  # borrowing never takes a thought from the step's own episode
                raise jsonio.DataError(f"{path}:{lineno}: field 'task_id' missing or not a string (id={r['id']!r})")
            pool[r["id"]] = r
except jsonio.DataError as e:
    fail(str(e))
if not records:
    fail(f"no step records in {', '.join(data_files)}")
provenance.claim_output(args.out, fail, is_file=True)
made_from = provenance.check_made_from(
    args.out + ".meta.json", {"settings": {name: getattr(args, name) for name in RESULT_FLAGS},
                              "inputs": {f: provenance.file_digest(f) for f in sorted(set(data_files) | set(pool_files))},
                              "checkpoints": {}}, [args.out], fail)

# Borrowable thoughts by (env, action kind), in a fixed order.
by_kind = {}
for rec in sorted(pool.values(), key=lambda r: r["id"]):
    kind, a = parse_action(rec["action"])
    if a:
        by_kind.setdefault((rec["env"], kind), []).append((rec, a))
templates = steps.load_template("conflicts.json")["verbs"]

rng = random.Random(f"conflicts/{args.seed}")
out, skipped = [], {"no candidates": 0, "no other valid action": 0, "nothing to borrow": 0}
# The same steps probe.py --max-records N --seed S samples, given the same N and S.
for recs in steps.sample_per_split(records, args.max_per_split, args.seed).values():
    for rec in recs:
        if not rec.get("candidates"):
            skipped["no candidates"] += 1
            continue
        a1 = rec["action"]
        others = [c for c in rec["candidates"] if steps.normalize_action(c) != steps.normalize_action(a1)]
        # Actions with an object ('go to shelf 1') make arguable traces; 'look' or 'inventory' only if nothing else.
        others = [c for c in others if parse_action(c)[1]] or others
        if not others:
            skipped["no other valid action"] += 1
            continue

        def donors(action):
            kind, a = parse_action(action)
            return [(r, ra) for r, ra in by_kind.get((rec["env"], kind), [])
                    if r["task_id"] != rec["task_id"] and len(ra) == len(a)] if a else []

        # Prefer an a2 whose kind has thoughts to borrow, so both methods share the same a2.
        borrowable = [c for c in others if donors(c)]
        a2 = rng.choice(borrowable or others)
        kind, a2_args = parse_action(a2)
        base = {"step_id": rec["id"], "env": rec["env"], "task_type": rec["task_type"], "split": rec["split"],
                "messages": rec["messages"], "candidates": rec["candidates"], "a1": a1, "a2": a2,
                "keep_frac": args.keep_frac}
        for method in methods:
            if method == "borrow":
                if not borrowable:
                    skipped["nothing to borrow"] += 1
                    continue
                donor, donor_args = rng.choice(donors(a2))
                trace, source = rewrite(donor["thought"], donor_args, a2_args), donor["id"]
            else:
                verb = kind.split("|")[0]
                key_t = verb if verb in templates else "_default"
                x, y = (a2_args + [a2, ""])[:2] if a2_args else (a2, "")
                trace = rng.choice(templates[key_t]).format(x=x, y=y, goal=rec.get("task", "").rstrip(".") or "the task")
                source = f"template:{key_t}"
            out.append({"id": f"{rec['id']}/conflict/{method}", **base, "trace": keep(trace), "method": method, "source": source})

jsonio.write_jsonl_atomic(args.out, out)
jsonio.write_json_atomic(args.out + ".meta.json", {"args": vars(args), "data": data_files, "pool": pool_files,
                                                  "records": len(out), "skipped": skipped, "made_from": made_from})
by_method = {m: sum(r["method"] == m for r in out) for m in methods}
print(f"conflicts done: {len(out)} records ({', '.join(f'{m} {n}' for m, n in by_method.items())}), "
      f"skipped {', '.join(f'{k}: {v}' for k, v in skipped.items())}, {args.out}")
