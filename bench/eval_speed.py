"""bench/eval_speed.py: the ReAct/ETO loop (one environment, one HF generate call per step and mode on
the whole prompt) against evaluate.py with --num-envs N lockstep environments, on the same episodes, greedy.

Runs evaluate.py as subprocesses on the same episodes:
  reference   --backend generate --num-envs 1   one generate call per state and mode, nothing kept
  sequential  --backend hf --num-envs 1         the project's branches and per-episode KV cache, one env
  batched     --backend hf --num-envs N         the same, N environments in lockstep, one batch per step
  apart       --backend hf --num-envs N, --mode prompt and --mode cot as two processes (with --mode both):
              the order before f855177, each mode its own prompt pass, against batched's one pass per state
  fileorder   --backend hf --num-envs N --order file: episodes take the lockstep slots in file order, against
              batched's longest first prompt first (less padding in a batch)
(--runs picks which; the others are checked against the first one made), checks that every episode's
transcript (model outputs and actions) is the same in all of them, and prints episodes per minute and the
ratios: batched vs reference is the headline, batched vs sequential is what lockstep batching alone buys,
batched vs apart what sharing a state's prompt pass between the modes buys, batched vs fileorder what
ordering the queue by prompt length buys. Times are whole processes
(interpreter, imports, workers, model load, episodes; apart pays the start-up twice).

    python bench/eval_speed.py --split id_test,ood_test --mode both --max-episodes 16 --max-steps 4
    reference 3.86 ep/min (746 s), batched 13.11 ep/min (220 s)
    batched vs reference 3.40x (batched: 8 envs); 48 episodes of alfworld ... 0 transcripts differ
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
parser.add_argument("--adapter", default="", help="a train.py checkpoint to evaluate instead of the base model")
parser.add_argument("--data", default="data/generated", help="as in evaluate.py")
parser.add_argument("--env", default="alfworld", help="as in evaluate.py")
parser.add_argument("--split", default="id_test", help="as in evaluate.py")
parser.add_argument("--mode", default="cot", choices=["prompt", "cot", "both"], help="as in evaluate.py")
parser.add_argument("--max-episodes", type=int, default=8, help="episodes per env x split")
parser.add_argument("--max-steps", type=int, default=8, help="steps per episode (keeps the sequential run short)")
parser.add_argument("--max-thought-tokens", type=int, default=96, help="as in evaluate.py")
parser.add_argument("--max-action-tokens", type=int, default=96, help="as in evaluate.py")
parser.add_argument("--no-log-both", action="store_true", help="act in --mode only (no other-mode branch), as ReAct/ETO loops do")
parser.add_argument("--num-envs", type=int, default=8, help="parallel environments of the batched run")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both runs")
parser.add_argument("--device", default="cpu", help="as in evaluate.py")
parser.add_argument("--runs", default="reference,sequential,batched",
                    help="which runs (reference,sequential,batched,apart,fileorder)")
args = parser.parse_args()


def evaluate(backend, num_envs, out, mode=None, order="length"):
    cmd = [sys.executable, "evaluate.py", "--backend", backend, "--model", args.model, "--data", args.data, "--env", args.env,
           "--split", args.split, "--mode", mode or args.mode,
           "--max-episodes", str(args.max_episodes), "--max-steps", str(args.max_steps), "--num-envs", str(num_envs),
           "--order", order,
           "--max-thought-tokens", str(args.max_thought_tokens), "--max-action-tokens", str(args.max_action_tokens),
           "--threads", str(args.threads), "--device", args.device,
           "--out", out]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    if args.no_log_both:
        cmd += ["--no-log-both"]
    t = time.time()  # the whole process: interpreter, imports, workers, model load and the episodes
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t
    if proc.returncode:
        sys.exit(f"evaluate.py failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "episodes.jsonl")) as f:
        return seconds, {r["id"]: r for r in map(json.loads, f)}


tmp = tempfile.mkdtemp(prefix="eval_speed_")
runs = {}
for name, backend, n_envs in [("reference", "generate", 1), ("sequential", "hf", 1), ("batched", "hf", args.num_envs)]:
    if name not in args.runs.split(","):
        continue
    runs[name] = evaluate(backend, n_envs, os.path.join(tmp, name))
    print(f"{name}: {runs[name][0]:.1f} s", flush=True)
if "apart" in args.runs.split(","):
    if args.mode != "both":
        sys.exit("error: --runs apart compares against --mode both")
    parts = [evaluate("hf", args.num_envs, os.path.join(tmp, f"apart_{mode}"), mode) for mode in ("prompt", "cot")]
    runs["apart"] = (sum(t for t, _ in parts), {k: v for _, recs in parts for k, v in recs.items()})
    print(f"apart: {runs['apart'][0]:.1f} s", flush=True)
if "fileorder" in args.runs.split(","):
    runs["fileorder"] = evaluate("hf", args.num_envs, os.path.join(tmp, "fileorder"), order="file")
    print(f"fileorder: {runs['fileorder'][0]:.1f} s", flush=True)


def steps_of(rec):
    return [(s["action"], s.get("output"), s.get("other_action")) for s in rec["transcript"]]


ref = runs[next(iter(runs))][1]  # the first run made: every other must give its transcripts
differ = sorted({i for name in runs for i in ref if i not in runs[name][1] or steps_of(ref[i]) != steps_of(runs[name][1][i])})
for i in differ:
    print("transcripts differ:", i)
n = len(ref)
sec = {name: r[0] for name, r in runs.items()}
print(", ".join(f"{name} {60 * n / t:.2f} ep/min ({t:.0f} s)" for name, t in sec.items()))
ratios = [f"{a} vs {b} {sec[b] / sec[a]:.2f}x" for a, b in [("batched", "reference"), ("batched", "sequential"),
                                                           ("sequential", "reference"), ("batched", "apart"),
                                                           ("batched", "fileorder")]
          if a in sec and b in sec]
print(f"{'; '.join(ratios)} (batched: {args.num_envs} envs); {n} episodes of {args.env} {args.split} mode {args.mode}"
      f"{' (no log-both)' if args.no_log_both else ' (with log-both)'}, {len(differ)} transcripts differ")
sys.exit(1 if differ or any(set(r[1]) != set(ref) for r in runs.values()) else 0)
