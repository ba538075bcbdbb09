"""bench/eval_speed.py: evaluate.py with one environment at a time (the ReAct/ETO loop: one episode, one
generation per step) against --num-envs N lockstep environments, on the same episodes, greedy.

Runs evaluate.py twice as subprocesses, checks that every episode's transcript (actions and model
outputs) is the same both ways, and prints episodes per minute and the ratio:

    sequential 1.9 ep/min, 8 envs 6.1 ep/min: 3.21x; 16 episodes, 0 transcripts differ

    python bench/eval_speed.py --env alfworld --split id_test --max-episodes 8 --mode cot --max-steps 8
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
parser.add_argument("--adapter", default="", help="a train.py checkpoint to evaluate instead of the base model")
parser.add_argument("--env", default="alfworld", help="as in evaluate.py")
parser.add_argument("--split", default="id_test", help="as in evaluate.py")
parser.add_argument("--mode", default="cot", choices=["prompt", "cot", "both"], help="as in evaluate.py")
parser.add_argument("--max-episodes", type=int, default=8, help="episodes per env x split")
parser.add_argument("--max-steps", type=int, default=8, help="steps per episode (keeps the sequential run short)")
parser.add_argument("--max-thought-tokens", type=int, default=96, help="as in evaluate.py")
parser.add_argument("--no-log-both", action="store_true", help="act in --mode only (no other-mode branch), as ReAct/ETO loops do")
parser.add_argument("--num-envs", type=int, default=8, help="parallel environments of the batched run")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both runs")
parser.add_argument("--device", default="cpu", help="as in evaluate.py")
args = parser.parse_args()


def evaluate(num_envs, out):
    cmd = [sys.executable, "evaluate.py", "--model", args.model, "--env", args.env, "--split", args.split, "--mode", args.mode,
           "--max-episodes", str(args.max_episodes), "--max-steps", str(args.max_steps), "--num-envs", str(num_envs),
           "--max-thought-tokens", str(args.max_thought_tokens), "--threads", str(args.threads), "--device", args.device,
           "--out", out]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    if args.no_log_both:
        cmd += ["--no-log-both"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"evaluate.py failed:\n{proc.stderr[-3000:]}")
    seconds = float(re.search(r"evaluate done: (\d+) episodes, ([\d.]+)s", proc.stdout).group(2))
    with open(os.path.join(out, "episodes.jsonl")) as f:
        return seconds, {r["id"]: r for r in map(json.loads, f)}


tmp = tempfile.mkdtemp(prefix="eval_speed_")
seq_s, seq = evaluate(1, os.path.join(tmp, "seq"))
par_s, par = evaluate(args.num_envs, os.path.join(tmp, "par"))
differ = [i for i in seq if [(s["action"], s.get("output")) for s in seq[i]["transcript"]]
          != [(s["action"], s.get("output")) for s in par[i]["transcript"]]]
for i in differ:
    print("transcripts differ:", i)
n = len(seq)
print(f"sequential {60 * n / seq_s:.2f} ep/min ({seq_s:.0f} s), {args.num_envs} envs {60 * n / par_s:.2f} ep/min ({par_s:.0f} s): "
      f"{seq_s / par_s:.2f}x; {n} episodes of {args.env} {args.split} mode {args.mode}"
      f"{' (no log-both)' if args.no_log_both else ' (with log-both)'}, {len(differ)} transcripts differ")
sys.exit(1 if differ or set(seq) != set(par) else 0)
