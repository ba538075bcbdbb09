"""bench/env_speed.py: expert steps per second of each environment, and what listing valid actions costs.

For each environment, replays the expert on a few tasks and prints steps/s of env.step alone and
with env.valid_actions() asked at every step (what make_data.py does), plus reset seconds. For
ScienceWorld it also times the package's own ScienceWorldEnv.step (which lists all valid actions
at every call) on the same episodes, as the baseline the server-level step is measured against.

    python bench/env_speed.py
    python bench/env_speed.py --episodes 2 --games data/generated/alfworld_games
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--episodes", type=int, default=4, help="episodes per environment")
parser.add_argument("--games", default="data/generated/alfworld_games", help="ALFWorld games folder (make data writes it)")
args = parser.parse_args()

import envs  # noqa: E402


def replay(env, tasks, with_valid):
    steps_done, step_s, reset_s, won = 0, 0.0, 0.0, 0
    for task in tasks:
        t = time.perf_counter()
        env.reset(task)
        reset_s += time.perf_counter() - t
        t = time.perf_counter()
        for a in env.expert_plan():
            if with_valid:
                env.valid_actions()
            *_, info = env.step(a)
            steps_done += 1
        step_s += time.perf_counter() - t
        won += info["won"]
    return steps_done / step_s, reset_s / len(tasks), won


def report(name, tasks, env):
    fast, reset, won = replay(env, tasks, with_valid=False)
    slow, *_ = replay(env, tasks, with_valid=True)
    print(f"{name:13s} {len(tasks)} episodes, expert won {won} | step {fast:8.1f} steps/s | step + valid actions {slow:8.1f} steps/s "
          f"| reset {reset:.2f} s")
    return fast


if os.path.isdir(args.games):
    tasks = [t for t in envs.alfworld_tasks(args.games)][:args.episodes]
    with envs.AlfWorld() as env:
        report("alfworld", tasks, env)
else:
    print(f"alfworld      skipped: {args.games} not found (run make data)")

sci = [t for t in envs.sciworld_tasks() if t["split"] == "id_test"]
sci = [next(t for t in sci if t["task_name"] == n) for n in ("find-living-thing", "use-thermometer", "chemistry-mix", "boil")]
sci = sci[:args.episodes]
with envs.ScienceWorld() as env:
    fast = report("scienceworld", sci, env)
    # Baseline: the package's own step(), which also lists every valid action and reads look/inventory.
    raw, n, elapsed = env._env, 0, 0.0
    for task in sci:
        raw.load(task["task_name"], task["variation"], "", generateGoldPath=True)
        raw.reset()
        t = time.perf_counter()
        for a in raw.get_gold_action_sequence():
            raw.step(a)
            n += 1
        elapsed += time.perf_counter() - t
    print(f"{'':13s} ScienceWorldEnv.step: {n / elapsed:.1f} steps/s; server-level step is {fast / (n / elapsed):.1f}x faster")

bfcl = [t for t in envs.bfcl_tasks() if t["split"] == "train"][:200]
report("bfcl", bfcl, envs.Bfcl())
