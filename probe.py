"""probe.py: where do the training gains land, in the prompt action or in the CoT action? Per checkpoint.

For every step record (make_data.py) and every checkpoint (train.py; the base model is step 0):
  prompt action   the turn prefilled with the action tag, the action decoded greedily (one line)
  CoT action      the turn prefilled with the thought tag, reasoning then action decoded greedily
  log-likelihood  of the reference action tokens (sum and per-token mean, nats) (a) after the action
                  tag alone, (b) after the reference thought, (c) after the model's own thought
  rank-1          is the reference the best of the step's valid actions by per-token mean
                  log-likelihood, after the tag alone and after the reference thought
  agreement       prompt / CoT action == reference (normalised), consistency (prompt == CoT),
                  revision: none (same), helpful (prompt wrong, CoT right), harmful, neutral
  truncation      reference log-likelihood and greedy-action agreement keeping the first
                  0/25/50/75/100% of the reference thought's words (after Lanham et al. 2023)
  attribution     on --attribution-samples records per env x split: share of attention mass
                  (all layers and heads) and of input-embedding gradient norm of the action loss
                  that lands on prompt / thought / other (tags, earlier action tokens) positions
With --conflicts FILE (make_conflicts.py) it runs the conflict probe instead: prompt + a trace that
argues for a2 + action tag; does the model follow the trace (a2), anchor on the prompt (a1), neither?
With --conflicts FILE --conflicts-out DIR it runs both in one pass: a conflict made from a probed step
branches from that step's prompt pass, so its prompt is not run twice.

The prompt is run once per record; every quantity above is a branch from its KV cache (decode.py).

Writes to --out: records.jsonl (one line per checkpoint x record, appended and flushed; a rerun
skips ids already there), summary.jsonl and summary.csv (one row per checkpoint x env x split,
every metric with a bootstrap 95% interval as <metric>_lo/_hi), meta.json. One record:
    "id":             "k0.3_seed0/checkpoint-000040/alfworld/id_test/pick_heat-1/trial_0/step003"
    "checkpoint":     "k0.3_seed0/checkpoint-000040"   run/checkpoint, or "base"
    "step":           40                                 training step (base = 0)
    "record_id":      "alfworld/id_test/pick_heat-1/trial_0/step003"
    "env", "task_type", "split"                          from the step record
    "reference":      "take egg 1 from fridge 1"
    "prompt_action":  "take egg 1 from fridge 1"        "cot_action": "go to fridge 1"  (null: no tag)
    "cot_text":       " The egg is in the fridge ... Action: go to fridge 1"   what the model wrote
    "prompt_correct": true, "cot_correct": false, "consistent": false, "revision": "harmful"
    "ll_prompt_sum": -0.41, "ll_prompt_mean": -0.05, "ll_thought_sum": ..., "ll_own_sum": ...
    "rank1_prompt": true, "rank1_thought": true, "n_candidates": 14
    "trunc_ll_0": -3.2, "trunc_correct_0": false, ..., "trunc_ll_100": ..., "trunc_correct_100": ...
    "attn_prompt": 0.61, "attn_thought": 0.22, "attn_other": 0.17, "grad_prompt": ..., (null unless sampled)

    python probe.py --checkpoints runs/k0.3_seed0 --data 'data/generated/*_test.jsonl' --out results/probe/k0.3_seed0
    python probe.py --model /tmp/tiny --no-base --checkpoints runs/tiny --max-records 4 --out /tmp/probe
    python probe.py --checkpoints runs/k0_seed0 --data 'data/generated/*_test.jsonl' --conflicts conflicts.jsonl \
        --conflicts-out results/conflicts/k0_seed0 --out results/probe/k0_seed0
"""
import argparse
import glob
import json
import os
import random
import sys
import time

# The flags that change records: a rerun into the same --out resumes only with these (and the same inputs,
# model and checkpoint weights); the others (batching, threads, device) change speed only.
RESULT_FLAGS = ("max_records", "max_action_tokens", "max_thought_tokens", "trunc_fracs", "no_candidates",
                "attribution_samples", "max_len", "seed", "dtype")
parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    epilog="An output folder holds one configuration and one writer: a rerun into it resumes only with the same "
           + ", ".join("--" + f.replace("_", "-") for f in RESULT_FLAGS) + ", input files, base model and checkpoint "
           "weights (new checkpoints may join); otherwise one line says what differs. A second process on it is refused.")
# inputs
parser.add_argument("--model", default="", help="base model: hub id, local folder, or smollm2-135m (embedded); default: the "
                                                 "adapters' own base_model_name_or_path where it is a local folder, else smollm2-135m")
parser.add_argument("--checkpoints", nargs="*", default=[], help="train.py run folders (all their checkpoint-* in order) or checkpoint folders")
parser.add_argument("--no-base", action="store_true", help="skip the base model (step 0)")
parser.add_argument("--data", nargs="+", default=["data/generated/*_id_test.jsonl", "data/generated/*_ood_test.jsonl"],
                    help="step JSONL files or globs (sorted)")
parser.add_argument("--conflicts", default="", help="make_conflicts.py JSONL: run the conflict probe on it instead of --data")
parser.add_argument("--conflicts-out", default="", help="with --conflicts: run both probes in one pass, the step probe on --data "
                                                      "into --out and the conflict probe into this folder (a conflict whose "
                                                      "step is probed shares that step's prompt pass)")
parser.add_argument("--max-records", type=int, default=0, help="per env x split, a seeded sample of this many records (0 = all); "
                                                                "with --conflicts-out it samples the steps, and every conflict runs")
# what to measure
parser.add_argument("--max-action-tokens", type=int, default=64, help="greedy tokens for an action line")
parser.add_argument("--max-thought-tokens", type=int, default=160, help="greedy tokens for reasoning + action in CoT mode")
parser.add_argument("--trunc-fracs", default="0,0.25,0.5,0.75,1", help="comma list of kept fractions of the reference thought")
parser.add_argument("--no-candidates", action="store_true", help="skip rank-1 among valid actions")
parser.add_argument("--attribution-samples", type=int, default=4, help="records per env x split for attention/gradient shares (0 = off)")
# run
parser.add_argument("--batch-size", type=int, default=4, help="records whose prompts run together (similar lengths are grouped)")
parser.add_argument("--max-rows", type=int, default=16, help="branches per forward pass (bounds memory: rows x prompt length KV)")
parser.add_argument("--max-len", type=int, default=0, help="most tokens of a prompt plus what is scored or generated after it; "
                                                          "a longer one stops with an error naming the record (0 = the model's context)")
parser.add_argument("--seed", type=int, default=0, help="record sample, attribution sample, bootstrap")
parser.add_argument("--out", default="results/probe", help="output folder")
parser.add_argument("--device", default="auto", help="auto (cuda+bf16 if present, else cpu+fp32), cpu, cuda, cuda:1")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16; score in fp32 for comparisons")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
args = parser.parse_args()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint_io  # noqa: E402
import cli  # noqa: E402
import decode  # noqa: E402
import jsonio  # noqa: E402
import lm  # noqa: E402
import provenance  # noqa: E402
import stats  # noqa: E402
import steps  # noqa: E402

cli.exit_cleanly()

PROBE_METRICS = ["prompt_correct", "cot_correct", "consistent", "cot_tag_missing", "helpful", "harmful", "neutral",
                 "ll_prompt_sum", "ll_prompt_mean", "ll_thought_sum", "ll_thought_mean", "ll_own_sum", "ll_own_mean",
                 "rank1_prompt", "rank1_thought", "attn_prompt", "attn_thought", "attn_other",
                 "grad_prompt", "grad_thought", "grad_other"]
CONFLICT_METRICS = ["follows", "anchors", "neither", "prefers_a2", "ll_a1_mean", "ll_a2_mean"]


def fail(msg):
    sys.exit(f"\nerror: {msg}")  # on a line of its own, after any progress bar


def checkpoint_list():
    """[(name, step, checkpoint folder or None)] in training order (checkpoint_io.list_checkpoints); every checkpoint
    is checked (lm.check_checkpoint) before the first model state is probed."""
    out = [] if args.no_base else [("base", 0, None)]
    try:
        out += checkpoint_io.series_of_all(args.checkpoints, "--checkpoints")
    except ValueError as e:
        fail(str(e))
    if not out:
        fail("nothing to probe: give --checkpoints or drop --no-base")
    return out


def load_records(kind):
    """(records, files, ids sampled for attribution) of kind 'steps' (--data) or 'conflicts' (--conflicts)."""
    if kind == "conflicts":
        files = [args.conflicts]
        numbered = jsonio.read_jsonl_lines(args.conflicts, required=("id", "step_id", "env", "split", "messages", "a1", "a2",
                                                                     "trace", "method"))
        for lineno, rec in numbered:
            where = f"{args.conflicts}:{lineno}"
            for field in ("id", "env", "split", "a1", "a2", "trace", "method"):
                if not isinstance(rec[field], str) or not rec[field].strip():
                    raise jsonio.DataError(f"{where}: field '{field}' must be a non-empty string, got {rec[field]!r}")
            steps.check_messages(rec["messages"], where)
        jsonio.check_unique_ids(numbered, args.conflicts)
        records = [rec for _, rec in numbered]
    else:
        files = sorted({f for pattern in args.data for f in (sorted(glob.glob(pattern)) or [pattern])})
        for path in files:
            if not os.path.isfile(path):
                fail(f"data file not found: {path}")
        records = steps.read_steps_files(files)
    if not records:
        fail(f"no records in {', '.join(files)}")
    rng = random.Random(f"attribution/{args.seed}")
    chosen, sampled = [], set()
    # Run with the steps, every conflict runs: make_conflicts.py --max-per-split N made them from the steps
    # that --max-records N samples, and a step can have several.
    cap = 0 if kind == "conflicts" and args.conflicts_out else args.max_records
    for recs in steps.sample_per_split(records, cap, args.seed).values():
        chosen += recs
        # The attribution sample is fixed by the seed, the same records for every checkpoint.
        k = min(args.attribution_samples, len(recs))
        sampled |= {recs[i]["id"] for i in rng.sample(range(len(recs)), k)}
    return chosen, files, sampled


def ll(logprobs):
    return round(sum(logprobs), 4), round(sum(logprobs) / max(1, len(logprobs)), 4)


def thought_prefix(thought):
    """The response text up to and including the action tag, after a given thought."""
    thought_tag, action_tag = steps.tags()
    return f"{thought_tag} {thought}\n{action_tag}"


# ----------------------------------------------------------------------------- the two probes

def probe_batch(model, tok, recs):
    """All step metrics of a batch of records: one prompt pass, then every quantity as a branch.
    Returns (rows, the prompt state, for conflict_batch to branch from)."""
    thought_tag, action_tag = steps.tags()
    fracs = [float(x) for x in args.trunc_fracs.split(",")]
    prompts = [steps.render_prompt(tok, r["messages"]) for r in recs]
    enc = [decode.encode_parts(tok, [p, action_tag]) for p in prompts]
    ref_prefix = [decode.encode_parts(tok, [p, thought_prefix(r["thought"])])[1] for p, r in zip(prompts, recs)]
    decode.check_fits(model, [f"record {r['id']}" for r in recs],
                  [len(e[0]) + max(len(t), args.max_thought_tokens) for e, t in zip(enc, ref_prefix)],
                  args.max_action_tokens, args.max_len)
    state = decode.encode_prompts(model, [e[0] for e in enc], tok.pad_token_id)
    # Everything asked after the reference thought (its log-likelihood, every candidate, the greedy
    # action) branches from a second state: prompt + thought, computed once from the prompt's cache.
    state_t = decode.encode_prompts(model, [e[0] + t[:-1] for e, t in zip(enc, ref_prefix)], tok.pad_token_id,
                                reuse=[decode.prompt_cache(state, i) for i in range(len(recs))])
    branches = {"prompt": [], "thought": []}
    plan = {"prompt": [], "thought": []}

    def add(rec_i, key, prefix_text, target=None, max_new=None, stop=None, ctx="prompt"):
        head, prefix, tgt = decode.encode_parts(tok, [prompts[rec_i], prefix_text, "" if target is None else " " + target])
        if head != enc[rec_i][0]:
            raise ValueError(f"{recs[rec_i]['id']}: the tokenizer merges the prompt's last token with the response")
        if ctx == "thought":
            if prefix != ref_prefix[rec_i]:
                raise ValueError(f"{recs[rec_i]['id']}: the tokenizer merges the action tag with the action")
            prefix = prefix[-1:]  # the rest of the thought prefix is in state_t
        b = {"row": rec_i, "prefix": prefix}
        if target is None:
            b.update(max_new=max_new, stop=stop)
        else:
            b["target"] = tgt
        branches[ctx].append(b)
        plan[ctx].append((rec_i, key))

    for i, rec in enumerate(recs):
        ref_thought = thought_prefix(rec["thought"])
        add(i, "prompt_gen", action_tag, max_new=args.max_action_tokens, stop="line")
        add(i, "cot_gen", thought_tag, max_new=args.max_thought_tokens, stop="action")
        add(i, "ll_prompt", action_tag, rec["action"])
        add(i, "ll_thought", ref_thought, rec["action"], ctx="thought")
        for f in fracs:
            ctx = "thought" if f >= 1 else "prompt"
            if f < 1:  # f = 1 is the full reference thought, scored above
                add(i, ("trunc_ll", f), thought_prefix(steps.first_words(rec["thought"], f)), rec["action"])
            add(i, ("trunc_gen", f), thought_prefix(steps.first_words(rec["thought"], f)), max_new=args.max_action_tokens,
                stop="line", ctx=ctx)
        cands = [c for c in (rec.get("candidates") or []) if c != rec["action"]]
        if not args.no_candidates and cands:
            for c in cands:
                add(i, ("cand_prompt", c), action_tag, c)
                add(i, ("cand_thought", c), ref_thought, c, ctx="thought")
    got = {}
    for ctx, st in (("prompt", state), ("thought", state_t)):
        for (i, key), res in zip(plan[ctx], decode.run_branches(model, tok, st, branches[ctx], args.max_rows)):
            got[i, key] = res
    # (c) needs the model's own reasoning, so it is a second round of branches from the same prompt state.
    own = []
    for i, rec in enumerate(recs):
        thought, action = steps.parse_response(thought_tag + got[i, "cot_gen"]["text"])
        own.append((thought, action))
    second = [{"row": i, "prefix": p, "target": t} for i, rec in enumerate(recs)
              for p, t in [decode.encode_parts(tok, [prompts[i], thought_prefix(own[i][0]), " " + rec["action"]])[1:]]]
    own_ll = decode.run_branches(model, tok, state, second, args.max_rows)

    out = []
    for i, rec in enumerate(recs):
        ref = rec["action"]
        prompt_action = steps.first_line(got[i, "prompt_gen"]["text"])
        cot_thought, cot_action = own[i]
        pc, cc = steps.same_action(prompt_action, ref), steps.same_action(cot_action, ref)
        consistent = steps.same_action(prompt_action, cot_action)
        revision = "none" if consistent else "helpful" if cc and not pc else "harmful" if pc and not cc else "neutral"
        row = {"record_id": rec["id"], "env": rec["env"], "task_type": rec["task_type"], "split": rec["split"],
               "reference": ref, "prompt_action": prompt_action, "cot_action": cot_action,
               "cot_text": got[i, "cot_gen"]["text"], "cot_tag_missing": cot_action is None,
               "prompt_correct": pc, "cot_correct": cc, "consistent": consistent, "revision": revision,
               "helpful": revision == "helpful", "harmful": revision == "harmful", "neutral": revision == "neutral"}
        for name, lp in (("prompt", got[i, "ll_prompt"]["logprobs"]), ("thought", got[i, "ll_thought"]["logprobs"]),
                         ("own", own_ll[i]["logprobs"])):
            row[f"ll_{name}_sum"], row[f"ll_{name}_mean"] = ll(lp)
        cands = [c for c in (rec.get("candidates") or []) if c != ref]
        row["n_candidates"] = len(cands) + 1 if cands else 0
        for ctx in ("prompt", "thought"):
            if cands and not args.no_candidates:
                ref_mean = row[f"ll_{ctx}_mean"]
                best_other = max(ll(got[i, (f"cand_{ctx}", c)]["logprobs"])[1] for c in cands)
                row[f"rank1_{ctx}"] = ref_mean > best_other  # ties count against the reference
            else:
                row[f"rank1_{ctx}"] = None
        for f in fracs:
            pct = int(round(100 * f))
            lp = got[i, "ll_thought"]["logprobs"] if f >= 1 else got[i, ("trunc_ll", f)]["logprobs"]
            row[f"trunc_ll_{pct}"] = ll(lp)[0]
            row[f"trunc_correct_{pct}"] = steps.same_action(steps.first_line(got[i, ("trunc_gen", f)]["text"]), ref)
        out.append(row)
    return out, state


def conflict_batch(model, tok, recs, shared=None):
    """Prompt + conflicting trace + action tag: which action does the model write, and which does it prefer?
    shared: (state, rows), a prompt state (probe_batch's) holding record i's prompt at row rows[i]; used
    when every prompt's tokens are the same as there, else the prompts run here."""
    prompts = [steps.render_prompt(tok, r["messages"]) for r in recs]
    ids, pre = zip(*(decode.encode_parts(tok, [p, thought_prefix(r["trace"])]) for p, r in zip(prompts, recs)))
    decode.check_fits(model, [f"record {r['id']}" for r in recs], [len(i) + len(p) for i, p in zip(ids, pre)],
                  args.max_action_tokens, args.max_len)
    if shared and all(i == shared[0]["ids"][r] for i, r in zip(ids, shared[1])):
        state, rows = shared
    else:
        state, rows = decode.encode_prompts(model, list(ids), tok.pad_token_id), list(range(len(recs)))
    # The trace runs once per record (a second state, from the prompt's cache); the greedy action and
    # the two scored actions branch from its last token. A tokenizer that merges the tag with an
    # action gets that branch from the prompt state instead, with the whole trace as its prefix.
    state_t = decode.encode_prompts(model, [i + p[:-1] for i, p in zip(ids, pre)], tok.pad_token_id,
                                reuse=[decode.prompt_cache(state, r) for r in rows])
    branches = {"prompt": [], "trace": []}
    where = []
    for i, rec in enumerate(recs):
        branches["trace"].append({"row": i, "prefix": pre[i][-1:], "max_new": args.max_action_tokens, "stop": "line"})
        where.append(("trace", len(branches["trace"]) - 1))
        for a in (rec["a1"], rec["a2"]):
            p, t = decode.encode_parts(tok, [prompts[i], thought_prefix(rec["trace"]), " " + a])[1:]
            ctx, b = ("trace", {"row": i, "prefix": p[-1:], "target": t}) if p == pre[i] else \
                ("prompt", {"row": rows[i], "prefix": p, "target": t})
            branches[ctx].append(b)
            where.append((ctx, len(branches[ctx]) - 1))
    got = {ctx: decode.run_branches(model, tok, st, branches[ctx], args.max_rows) if branches[ctx] else []
           for ctx, st in (("prompt", state), ("trace", state_t))}
    res = [got[ctx][j] for ctx, j in where]
    out = []
    for i, rec in enumerate(recs):
        gen, l1, l2 = res[3 * i:3 * i + 3]
        action = steps.first_line(gen["text"])
        follows, anchors = steps.same_action(action, rec["a2"]), steps.same_action(action, rec["a1"])
        m1, m2 = ll(l1["logprobs"])[1], ll(l2["logprobs"])[1]
        out.append({"record_id": rec["id"], "step_id": rec["step_id"], "env": rec["env"], "task_type": rec.get("task_type"),
                    "split": rec["split"], "method": rec["method"], "a1": rec["a1"], "a2": rec["a2"], "action": action,
                    "follows": follows, "anchors": anchors, "neither": not follows and not anchors,
                    "ll_a1_mean": m1, "ll_a2_mean": m2, "prefers_a2": m2 > m1})
    return out


def attribution(model, tok, rec):
    """Shares of attention mass and of input-gradient norm, from the reference action onto
    prompt / thought / other positions, with the reference thought in context. Each triple sums to 1."""
    ids, _, kinds = lm.encode_step(tok, rec)
    ids_t = torch.tensor([ids], device=model.device)
    kinds_t = torch.tensor(kinds, device=model.device)
    action_pos = (kinds_t == lm.ACTION).nonzero()[:, 0]
    predictors = action_pos - 1  # the positions whose outputs predict the action tokens
    embeds = model.get_input_embeddings()(ids_t).detach().requires_grad_(True)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
    try:
        out = model(inputs_embeds=embeds, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    logp = torch.log_softmax(out.logits[0, predictors].float(), -1)
    loss = -logp.gather(1, ids_t[0, action_pos][:, None]).sum()
    loss.backward()
    groups = {"prompt": kinds_t == lm.PROMPT, "thought": kinds_t == lm.THOUGHT}
    groups["other"] = ~(groups["prompt"] | groups["thought"])
    # (layers, heads, action predictors, keys) -> mean mass per key over layers, heads and predictors
    attn = torch.stack([a[0, :, predictors].detach().float() for a in out.attentions]).mean((0, 1, 2))
    grad = embeds.grad[0].float().norm(dim=-1)
    row = {}
    for name, m in groups.items():
        row[f"attn_{name}"] = round(float(attn[m].sum() / attn.sum()), 4)
        row[f"grad_{name}"] = round(float(grad[m].sum() / grad.sum()), 4)
    return row


# ----------------------------------------------------------------------------- main

for name, low in (("batch_size", 1), ("max_rows", 1), ("max_action_tokens", 1), ("max_thought_tokens", 1), ("max_len", 0),
                  ("max_records", 0), ("attribution_samples", 0), ("threads", 0)):
    if getattr(args, name) < low:
        fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
try:
    fracs = [float(x) for x in args.trunc_fracs.split(",")]
except ValueError:
    fail(f"--trunc-fracs must be a comma list of numbers in [0, 1], got {args.trunc_fracs!r}")
if not all(0 <= f <= 1 for f in fracs):
    fail(f"--trunc-fracs must be a comma list of numbers in [0, 1], got {args.trunc_fracs!r}")
pcts = [int(round(100 * f)) for f in fracs]  # each fraction is stored under its whole percent (trunc_ll_50)
if len(set(pcts)) < len(pcts):
    fail(f"--trunc-fracs must differ by whole percents (they are stored as trunc_ll_<percent>), got {args.trunc_fracs!r}")
if args.threads:
    torch.set_num_threads(args.threads)
device, dtype = lm.pick_device(args.device)
if args.dtype != "auto":
    dtype = getattr(torch, args.dtype)
# Under torchrun each process takes every world-th batch (the batches are those of one process, so each
# record is computed as it would be alone) and appends to its own part file; the first process checks the
# output folder before the others start, and merges the parts at the end.
try:
    rank, world, device = lm.distributed(device)
except ValueError as e:
    fail(str(e))
ckpts = checkpoint_list()
if args.conflicts_out and not args.conflicts:
    fail("--conflicts-out needs --conflicts")
kinds = ["steps", "conflicts"] if args.conflicts_out else ["conflicts"] if args.conflicts else ["steps"]
outs = {"steps": args.out, "conflicts": args.conflicts_out or args.out}
if args.conflicts_out and os.path.abspath(args.conflicts_out) == os.path.abspath(args.out):
    fail("--conflicts-out must be another folder than --out")
records, files, attr_ids = {}, {}, set()
try:
    for kind in kinds:
        records[kind], files[kind], sampled = load_records(kind)
        attr_ids |= sampled if kind == "steps" else set()
except jsonio.DataError as e:
    fail(str(e))
try:
    args.model, model_path, tok = lm.load_base(args.model, [c for _, _, c in ckpts if c])
except ValueError as e:
    fail(str(e))
except OSError as e:
    fail(f"cannot load model {args.model!r}: {e}")

done_recs, done, fouts, made_from = {}, {}, {}, {}
settings = {name: getattr(args, name) for name in RESULT_FLAGS} | {"dtype": str(dtype)}
ckpt_ids = {name: provenance.folder_digest(ckpt) for name, _, ckpt in ckpts if ckpt}
paths = {kind: os.path.join(outs[kind], "records.jsonl") for kind in kinds}
for kind in kinds if rank == 0 else []:  # one writer and one configuration per output folder, checked first
    provenance.claim_output(outs[kind], fail)
    inputs = {**{f"{kind} {f}": provenance.file_digest(f) for f in files[kind]}, "model": provenance.model_identity(model_path)}
    if kind == "conflicts" and len(kinds) == 2:  # conflicts then come from the steps --data samples
        inputs.update({f"steps {f}": provenance.file_digest(f) for f in files["steps"]})
    made_from[kind] = provenance.check_made_from(os.path.join(outs[kind], "meta.json"),
                                            {"settings": settings, "inputs": inputs, "checkpoints": ckpt_ids},
                                            [paths[kind], *jsonio.parts_of(paths[kind])], fail)
for kind in kinds if rank == 0 else []:
    try:
        jsonio.read_done_all(paths[kind])  # a damaged line stops the run here, before anything is rewritten
    except jsonio.DataError as e:
        fail(str(e))
    meta_path = os.path.join(outs[kind], "meta.json")
    jsonio.write_json_atomic(meta_path, {"args": vars(args), "model_path": model_path, "files": files[kind],
                                        "checkpoints": provenance.merged_checkpoints(meta_path, ckpts), "device": device,
                                        "dtype": str(dtype), "made_from": made_from[kind], "processes": world})
lm.barrier(world)
for kind in kinds:
    done[kind] = {r["id"] for r in jsonio.read_done_all(paths[kind])}
    if rank == 0:
        print(f"probe ({kind}) device {device} ({dtype}) x {world} process(es), model {model_path}, {len(ckpts)} "
              f"checkpoint(s), {len(records[kind])} records from {', '.join(files[kind])}, {len(done[kind])} already in "
              f"{paths[kind]}")


def write_rows(kind, batch, rows, name, step):
    for rec, row in zip(batch, rows):
        row.update(id=f"{name}/{rec['id']}", checkpoint=name, step=step)
    jsonio.append_jsonl(fouts[kind], rows)


t0 = time.time()
for kind in kinds:
    fouts[kind] = open(jsonio.part_path(paths[kind], rank, world), "a")
for name, step, ckpt in ckpts:
    todo = {kind: [r for r in records[kind] if f"{name}/{r['id']}" not in done[kind]] for kind in kinds}
    if not any(todo.values()):
        continue
    try:
        model = lm.load_model(model_path, ckpt, device, dtype)
    except ValueError as e:
        fail(str(e))
    for p in model.parameters():
        p.requires_grad_(False)
    # With both probes, a conflict runs with its step's batch, from the same prompt pass; the rest after.
    by_step = {}
    if len(kinds) == 2:
        in_pass = {r["id"] for r in todo["steps"]}
        for c in todo["conflicts"]:
            by_step.setdefault(c["step_id"], []).append(c)
        todo["conflicts"] = [c for c in todo["conflicts"] if c["step_id"] not in in_pass]  # those whose step is done
    try:
        for kind in kinds:
            todo[kind].sort(key=lambda r: len(json.dumps(r["messages"])))  # similar prompt lengths share a batch
            starts = range(0, len(todo[kind]), args.batch_size)[rank::world]  # this process's batches
            bar = tqdm(total=sum(len(todo[kind][b:b + args.batch_size]) for b in starts), desc=f"probe {name} {kind}",
                       unit="rec", disable=rank > 0)
            for b in starts:
                batch = todo[kind][b:b + args.batch_size]
                if kind == "conflicts":
                    write_rows(kind, batch, conflict_batch(model, tok, batch), name, step)
                    bar.update(len(batch))
                    continue
                rows, state = probe_batch(model, tok, batch)
                for rec, row in zip(batch, rows):
                    shares = attribution(model, tok, rec) if rec["id"] in attr_ids else {}
                    for g in ("prompt", "thought", "other"):
                        row[f"attn_{g}"], row[f"grad_{g}"] = shares.get(f"attn_{g}"), shares.get(f"grad_{g}")
                write_rows(kind, batch, rows, name, step)
                pairs = [(c, i) for i, rec in enumerate(batch) for c in by_step.pop(rec["id"], [])]
                if pairs:
                    confs = [c for c, _ in pairs]
                    write_rows("conflicts", confs, conflict_batch(model, tok, confs, shared=(state, [i for _, i in pairs])),
                               name, step)
                bar.update(len(batch))
            bar.close()
    except steps.ContextError as e:  # rows already written stay; a rerun with a fix continues
        fail(str(e))
    del model
for f in fouts.values():
    f.close()
lm.barrier(world)
if rank > 0:
    sys.exit(0)
# One file per output whatever the number of processes: the records in input order within each checkpoint.
order = {kind: {f"{n}/{r['id']}": (i, j) for i, (n, _, _) in enumerate(ckpts) for j, r in enumerate(records[kind])}
         for kind in kinds}
for kind in kinds:
    done_recs[kind] = jsonio.merge_parts(paths[kind], lambda r, o=order[kind]: o.get(r["id"], (-1, 0)))

for kind in kinds:
    conflicts = kind == "conflicts"
    keys = ["checkpoint", "step", "env", "split"] + (["method"] if conflicts else [])
    metrics = CONFLICT_METRICS if conflicts else PROBE_METRICS + sorted(
        {k for r in done_recs[kind] for k in r if k.startswith("trunc_")}, key=lambda k: (k.split("_")[1], int(k.split("_")[-1])))
    wanted = {f"{n}/{r['id']}" for n, _, _ in ckpts for r in records[kind]}
    rows = stats.summarize([r for r in done_recs[kind] if r["id"] in wanted], keys, metrics, seed=args.seed)
    rows.sort(key=lambda r: (r["step"], r["checkpoint"], r["env"], r["split"], r.get("method", "")))
    jsonio.write_jsonl_atomic(os.path.join(outs[kind], "summary.jsonl"), rows)
    jsonio.write_csv_atomic(os.path.join(outs[kind], "summary.csv"), rows)
    headline = ("follows", "anchors") if conflicts else ("prompt_correct", "cot_correct", "consistent")
    for row in rows:
        print(f"{row['checkpoint']:>32} {row['env']:>12} {row['split']:>8} n={row['n']:4d} " +
              " ".join(f"{m} {row[m]:.3f}" for m in headline if row[m] is not None))
    print(f"probe done ({kind}): {len(rows)} summary rows, {time.time() - t0:.1f}s, {os.path.join(outs[kind], 'summary.csv')}")
