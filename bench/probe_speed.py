"""bench/probe_speed.py: probe.py (one prompt pass, every quantity a KV-cache branch, records batched)
against the straightforward way (one full forward or one generate call per quantity, record by record).

Runs probe.py as a subprocess on the same records and model, recomputes every quantity naively here,
checks they agree (greedy texts identical, log-likelihoods within --tol nats) and prints the speed ratio:

    naive 412.3 s, probe.py 61.0 s: 6.76x faster; 24 records, 0 text mismatches, max |dLL| 0.0003 nats

    python bench/probe_speed.py --data data/generated/alfworld_id_test.jsonl data/generated/scienceworld_id_test.jsonl --max-records 3
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
parser.add_argument("--checkpoint", default="", help="a train.py checkpoint folder to probe instead of the base model")
parser.add_argument("--data", nargs="+", default=["data/generated/alfworld_id_test.jsonl", "data/generated/scienceworld_id_test.jsonl",
                                                 "data/generated/bfcl_id_test.jsonl"], help="step JSONL files")
parser.add_argument("--max-records", type=int, default=3, help="records per env x split (probe.py's seeded sample)")
parser.add_argument("--max-thought-tokens", type=int, default=160, help="as in probe.py")
parser.add_argument("--max-action-tokens", type=int, default=64, help="as in probe.py")
parser.add_argument("--trunc-fracs", default="0,0.25,0.5,0.75,1", help="as in probe.py")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both ways")
parser.add_argument("--tol", type=float, default=2e-3, help="allowed |log-likelihood difference| in nats (batched vs unbatched fp32)")
args = parser.parse_args()

import torch  # noqa: E402

import decode  # noqa: E402
import lm  # noqa: E402
import steps  # noqa: E402

torch.set_num_threads(args.threads)
out = tempfile.mkdtemp(prefix="probe_speed_")
cmd = [sys.executable, "probe.py", "--model", args.model, "--data", *args.data, "--max-records", str(args.max_records),
       "--attribution-samples", "0", "--threads", str(args.threads), "--device", "cpu", "--out", out,
       "--max-thought-tokens", str(args.max_thought_tokens), "--max-action-tokens", str(args.max_action_tokens),
       "--trunc-fracs", args.trunc_fracs]
if args.checkpoint:
    cmd += ["--no-base", "--checkpoints", args.checkpoint]
proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
if proc.returncode:
    sys.exit(f"probe.py failed:\n{proc.stderr[-3000:]}")
probe_s = float(re.search(r"probe done \(steps\): .*?, ([\d.]+)s", proc.stdout).group(1))
with open(os.path.join(out, "records.jsonl")) as f:
    fast = {r["record_id"]: r for r in map(json.loads, f)}
records = {r["id"]: r for path in args.data for r in steps.read_steps(path) if r["id"] in fast}

# ----------------------------------------------------------------------------- the naive way
path = lm.resolve_model(args.model)
tok = lm.load_tokenizer(path)
model = lm.load_model(path, args.checkpoint or None, "cpu", torch.float32)
thought_tag, action_tag = steps.tags()


class StopAt:
    """HF stopping criterion with probe.py's rule: a finished line, or the line after the action tag."""

    def __init__(self, n0, stop):
        self.n0, self.stop = n0, stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([decode._finished(tok.decode(input_ids[0, self.n0:]), self.stop)])


def naive_ll(prompt, prefix, target):
    """Log-likelihood (sum, nats) of target after prompt + prefix: one full forward."""
    p, pre, t = decode.encode_parts(tok, [prompt, prefix, " " + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + pre + t])).logits[0].float(), -1)
    n0 = len(p) + len(pre)
    return [logp[n0 - 1 + j, x].item() for j, x in enumerate(t)]


def naive_gen(prompt, prefix, max_new, stop):
    p, pre = decode.encode_parts(tok, [prompt, prefix])
    ids = torch.tensor([p + pre])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             stopping_criteria=[StopAt(ids.shape[1], stop)], pad_token_id=tok.pad_token_id)
    new = [t for t in gen[0, ids.shape[1]:].tolist() if t not in lm.stop_ids(tok, model)]
    return tok.decode(new, skip_special_tokens=True)


def pre(thought):
    return f"{thought_tag} {thought}\n{action_tag}"


def mean(lp):
    return sum(lp) / max(1, len(lp))


fracs = [float(x) for x in args.trunc_fracs.split(",")]
t0 = time.time()
naive = {}
for rid, rec in records.items():
    prompt = steps.render_prompt(tok, rec["messages"])
    ref = rec["action"]
    r = {"prompt_action": steps.first_line(naive_gen(prompt, action_tag, args.max_action_tokens, "line"))}
    r["cot_text"] = naive_gen(prompt, thought_tag, args.max_thought_tokens, "action")
    own_thought, _ = steps.parse_response(thought_tag + r["cot_text"])
    r["ll_prompt_sum"] = sum(naive_ll(prompt, action_tag, ref))
    r["ll_thought_sum"] = sum(naive_ll(prompt, pre(rec["thought"]), ref))
    r["ll_own_sum"] = sum(naive_ll(prompt, pre(own_thought), ref))
    for f in fracs:
        kept = " ".join(rec["thought"].split()[:round(f * len(rec["thought"].split()))])
        r[f"trunc_ll_{int(round(100 * f))}"] = sum(naive_ll(prompt, pre(kept), ref))
        r[f"trunc_action_{int(round(100 * f))}"] = steps.first_line(naive_gen(prompt, pre(kept), args.max_action_tokens, "line"))
    cands = [c for c in (rec.get("candidates") or []) if c != ref]
    for ctx, prefix in (("prompt", action_tag), ("thought", pre(rec["thought"]))):
        if cands:
            ref_mean = mean(naive_ll(prompt, prefix, ref))
            r[f"rank1_{ctx}"] = ref_mean > max(mean(naive_ll(prompt, prefix, c)) for c in cands)
    naive[rid] = r
naive_s = time.time() - t0

# ----------------------------------------------------------------------------- agreement
mismatch, max_dll = [], 0.0
for rid, r in naive.items():
    f = fast[rid]
    for key in ("prompt_action", "cot_text"):
        if r[key] != f[key]:
            mismatch.append((rid, key, r[key], f[key]))
    for key, v in r.items():
        if key.startswith(("ll_", "trunc_ll_")):
            max_dll = max(max_dll, abs(v - f[key]))
        elif key.startswith("rank1_") and v != f[key]:
            mismatch.append((rid, key, v, f[key]))
        elif key.startswith("trunc_action_"):
            correct = steps.normalize_action(v) == steps.normalize_action(f["reference"])
            if correct != f[f"trunc_correct_{key.split('_')[-1]}"]:
                mismatch.append((rid, key, v, f[f"trunc_correct_{key.split('_')[-1]}"]))
for m in mismatch:
    print("mismatch:", m)
print(f"naive {naive_s:.1f} s, probe.py {probe_s:.1f} s: {naive_s / max(probe_s, 1e-9):.2f}x faster; {len(naive)} records, "
      f"{len(mismatch)} mismatches, max |dLL| {max_dll:.4f} nats (tol {args.tol}), {args.threads} threads")
sys.exit(1 if mismatch or max_dll > args.tol else 0)
