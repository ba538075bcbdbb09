"""make_data.py: expert trajectories -> one JSONL record per agent step, in train / id_test / ood_test.

Runs the expert of each environment (envs/) on its tasks and writes, per env and split,
<out>/<env>_<split>.jsonl with one record per expert step, plus <out>/meta.json (arguments,
counts, seconds, versions). The same --seed writes byte-identical files.

One record (one line per field):
    "id":          "alfworld/train/pick_and_place_simple-3/trial_0/step002"   stable, unique
    "env":         "alfworld"                     alfworld | scienceworld | bfcl | bfcl_mt
    "task_type":   "pick_and_place_simple"        ALFWorld type, ScienceWorld task, BFCL category
    "split":       "train"                        train | id_test | ood_test
    "task_id":     "alfworld/train/pick_and_place_simple-3/trial_0"   the episode
    "step":        2                              index of this step in the episode
    "messages":    [{"role": "system", ...}, {"role": "user", ...}, ...]   the prompt (steps.build_messages)
    "thought":     "I see a mug 1 here. Taking it is the next step toward the goal."
    "action":      "take mug 1 from cabinet 2"    the expert action
    "candidates":  ["go to cabinet 1", ...]       valid actions at this step incl. the reference (null for BFCL, bfcl_mt)
    "task":        "put some mug on shelf."       the goal text
    "thought_kind": "take"                        which situation the reasoning was written for

Reasoning: written from the state by data/templates/thoughts.json. Each step's situation (searching,
opening, taking, carrying to a tool, using it, placing, ...) is read off the goal, what is held, what
is done and what the next expert actions do; one of several wordings is drawn with a seeded RNG and
filled with the object, the likely places (ALFWorld's own table of what can hold what, restricted
to the receptacles in the room), the tool and the goal. The action string itself never appears.
Multi-turn BFCL steps are one ground-truth call each, reasoned from the user's request and the
function's own description, then [] to end the user's turn.

ALFWorld games: generated offline by alfgen.py (planner-solved, walkthrough stored in the file),
or the real dataset with --alfworld-data DIR (DIR/json_2.1.1/<split>/<task>/trial_*/game.tw-pddl).

Also imports public ETO / AgentGym trajectories with --import-eto FILE (a JSON list or JSONL of
{"id", "conversations": [{"from": "human"|"gpt", "value"}]}, or the OpenAI-messages shape of
{"role": "user"|"assistant", "content"} turns). For ALFWorld with --alfworld-data DIR, each item's
game_file is replayed in its real game: actions in ALFWorld 0.3 wording (put X in/on Y) become the
installed 0.4 wording (move X to Y), candidates are the game's admissible commands, task type and split
come from the game, and only trajectories that replay to a win are kept (meta.json's "imported" counts
the rest); the output is <out>/alfworld_<split>.jsonl + meta.json, ready for train, probe and evaluate.

    python make_data.py --env all --out data/generated
    python make_data.py --env alfworld,bfcl --alfworld-train-per-type 2 --alfworld-test-per-type 1 --bfcl-train 10 --bfcl-test 5 --out /tmp/d
    python make_data.py --import-eto alfworld_sft.json --alfworld-data ~/alfworld_data --out data/eto
"""
import argparse
import ast
import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import time

from tqdm import tqdm

import cli
import envs
import eto
import jsonio
import provenance
import steps

cli.exit_cleanly()

parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    epilog="An output folder holds one configuration and one writer: a rerun into it with other flags (any but "
           "--jobs, which changes only the speed) is refused with one line saying what differs; with the same flags "
           "it writes the same bytes again. A second process on it is refused.")
# what to build
parser.add_argument("--env", default="all", help="comma list of alfworld, scienceworld, bfcl, bfcl_mt, or 'all'")
parser.add_argument("--out", default="data/generated", help="output folder for <env>_<split>.jsonl and meta.json")
parser.add_argument("--seed", type=int, default=0, help="seeds game generation, task sampling and thought wording")
parser.add_argument("--history", type=int, default=4, help="past (action, observation) exchanges kept in each prompt")
parser.add_argument("--max-candidates", type=int, default=20, help="ScienceWorld: valid actions kept per step (incl. the reference); ALFWorld keeps all")
# ALFWorld
parser.add_argument("--alfworld-data", default=None, help="real ALFWorld folder (holding json_2.1.1/); default: generate games offline")
parser.add_argument("--alfworld-train-per-type", type=int, default=10, help="train games per in-domain task type")
parser.add_argument("--alfworld-test-per-type", type=int, default=4, help="id_test games per in-domain type and ood_test games per held-out type")
parser.add_argument("--alfworld-search", type=int, default=0,
                    help="most receptacles the ALFWorld expert visits (seeded draw among those that could hold the object or lamp) "
                         "before the one where it is: the search an agent that cannot see inside makes (0 = walk straight there)")
parser.add_argument("--alfworld-plan-timeout", type=float, default=60.0, help="seconds the planner may take per generated game before it is redrawn")
parser.add_argument("--jobs", type=int, default=1,
                    help="processes for ALFWorld game generation and expert runs; the data is the same for any value")
# ScienceWorld
parser.add_argument("--sciworld-train-per-task", type=int, default=1, help="train variations per in-domain task (20 tasks)")
parser.add_argument("--sciworld-test-per-task", type=int, default=1, help="test variations per task (id_test: 20 tasks, ood_test: 10)")
parser.add_argument("--sciworld-tasks", default="all", help="comma list of ScienceWorld task names to use, or 'all' (30 tasks)")
parser.add_argument("--sciworld-max-gold", type=int, default=60, help="skip variations whose gold path is longer than this many steps")
# BFCL
parser.add_argument("--bfcl-train", type=int, default=200, help="train items (sampled from the in-domain categories)")
parser.add_argument("--bfcl-test", type=int, default=50, help="items per test split")
# multi-turn BFCL
parser.add_argument("--bfcl-mt-train", type=int, default=0, help="multi-turn train entries, a seeded sample (0 = all 154)")
parser.add_argument("--bfcl-mt-test", type=int, default=0, help="multi-turn entries per test split, a seeded sample (0 = all: 46 id, 48 ood)")
parser.add_argument("--bfcl-mt-obs-cap", type=int, default=envs.BFCL_MT_OBS_CAP,
                    help="characters of one call's result shown to the agent; longer results are cut, with the cut said "
                         "(long_context's inflated outputs are what this cuts; evaluate.py applies the data's cap)")
# import
parser.add_argument("--import-eto", default=None, help="convert an ETO/AgentGym conversation file (JSON list or JSONL) instead of "
                                                        "running experts; ALFWorld with --alfworld-data: replayed in the real games")
parser.add_argument("--import-env", default="alfworld", help="environment name recorded on imported steps")
parser.add_argument("--import-split", default="train", help="split recorded on imported steps (not with --alfworld-data: "
                                                             "there the game's folder and task type decide)")
args = parser.parse_args()

THOUGHTS = steps.load_template("thoughts.json")


def article(word):
    return ("an " if word[:1] in "aeiou" else "a ") + word


def plural(noun):
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def draw(rng, kind, table, **fields):
    text = rng.choice(table[kind]).format(**fields)
    return text


# ----------------------------------------------------------------------------- ALFWorld thoughts

def alfworld_goal(task):
    for pattern, kind in THOUGHTS["alfworld"]["goal_patterns"]:
        m = re.match(pattern, task.strip().rstrip("."))
        if m:
            return kind, m.group("obj"), m.group("recep")
    raise jsonio.DataError(f"ALFWorld goal not understood: {task!r}")


def room_receptacles(first_obs):
    """['cabinet 1', 'countertop 2', ...] from 'you see a cabinet 1, a countertop 2, and a fridge 1.'"""
    m = re.search(r"you see (.*?)\.\s*\n", first_obs + "\n")
    return re.findall(r"(?:an?|the) ([a-z]+ \d+)", m.group(1)) if m else []


def likely_places(obj, receptacles, first, rng):
    import alfworld.gen.constants as C
    lower = {r.lower(): r for r in C.VAL_RECEPTACLE_OBJECTS}
    otype = C.OBJECTS_LOWER_TO_UPPER.get(obj.replace(" ", ""), obj)
    kinds = sorted({r.split()[0] for r in receptacles
                    if otype in C.VAL_RECEPTACLE_OBJECTS.get(lower.get(r.split()[0], ""), ())})
    rng.shuffle(kinds)
    first_kind = first.split()[0]
    kinds = [first_kind] + [k for k in kinds if k != first_kind]
    kinds = kinds[:3]
    names = [plural(k) for k in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def holders(kind, receptacles):
    """The room's receptacles (room order) that ALFWorld's table lets hold an object of this kind."""
    import alfworld.gen.constants as C
    lower = {r.lower(): r for r in C.VAL_RECEPTACLE_OBJECTS}
    otype = C.OBJECTS_LOWER_TO_UPPER.get(kind, kind)
    return [r for r in receptacles if otype in C.VAL_RECEPTACLE_OBJECTS.get(lower.get(r.split()[0], ""), ())]


def search_target(plan, t, holding):
    """What the 'go to' at plan[t] walks to find: ("lamp", "desklamp"), ("object", "mug"), or None (not
    a search). Read from the next action that is not an 'open': using a lamp, or taking while empty-handed."""
    j = t + 1
    while j < len(plan) and plan[j].startswith("open "):
        j += 1
    nxt = plan[j].split() if j < len(plan) else []
    if nxt[:1] == ["use"]:
        return "lamp", nxt[1]
    if nxt[:1] == ["take"] and not holding:
        return "object", nxt[1]
    return None


def searching_plan(env, task, first_obs, walkthrough, rng):
    """The walkthrough with the search of an expert that cannot see inside receptacles: before walking
    to where the object (or the lamp) is, it visits up to --alfworld-search other receptacles that
    could hold it (seeded draw, room order), opening closed ones. Run live in `env`.

    Returns (plan, {index of a detour action: 'lamp' or 'object'}), or (walkthrough, None) when
    a detour would come upon what it looks for (the expert would then have to take that one), an
    action is not admissible, or the plan does not win."""
    receptacles = room_receptacles(first_obs)
    plan, detours, opened, visited, holding, here = [], {}, set(), set(), False, None
    env.reset(task)
    for t, action in enumerate(walkthrough):
        if action.startswith("go to "):
            goal = action[len("go to "):]
            sought = search_target(walkthrough, t, holding)
            if sought:
                kind = sought[1]
                options = [r for r in holders(kind, receptacles) if r not in visited | {goal, here}]
                chosen = set(rng.sample(options, rng.randint(0, min(args.alfworld_search, len(options)))))
                for place in [r for r in options if r in chosen]:
                    detour = [f"go to {place}"]
                    for a in detour:
                        if a not in env.valid_actions():
                            return walkthrough, None
                        obs, _, _, _ = env.step(a)
                        detours[len(plan)] = sought[0]
                        plan.append(a)
                        if re.search(rf"\b{kind} \d+", obs):
                            return walkthrough, None
                        if f"{place} is closed" in obs:
                            detour.append(f"open {place}")
                            opened.add(place)
                    visited.add(place)
                    here = place
        if action.startswith("open ") and action[len("open "):] in opened:
            continue  # opened on a detour already
        if action not in env.valid_actions():
            return walkthrough, None
        _, _, done, info = env.step(action)
        plan.append(action)
        if action.startswith("go to "):
            here = action[len("go to "):]
            visited.add(here)
        if action.startswith("open "):
            opened.add(action[len("open "):])
        if action.startswith("take "):
            holding = True
        if action.startswith(("move ", "put ")):
            holding = False
        if done:
            return (plan, detours) if info["won"] else (walkthrough, None)
    return walkthrough, None


def alfworld_thoughts(task, first_obs, plan, rng, detours=None):
    """One thought (and its situation) per expert action of an ALFWorld episode. detours: the
    indices of search visits that find nothing (searching_plan)."""
    table = THOUGHTS["alfworld"]
    kind, obj, recep = alfworld_goal(task)
    recs = room_receptacles(first_obs)
    detours = detours or {}
    holding, transformed, placed, lamp_on = False, False, 0, False
    searched = None  # the last place a still-running search looked at
    out = []
    for t, action in enumerate(plan):
        nxt = plan[t + 1] if t + 1 < len(plan) else ""
        words = action.split()
        target = " ".join(words[2:4]) if action.startswith("go to") else ""
        f = dict(obj=obj, a_obj=article(obj), A_obj=article(obj).capitalize(), recep=article(recep), target=target,
                 Target=target.capitalize(), lamp=recep if kind == "look" else "desklamp",
                 likely_lamp="a desk or a side table", prev=searched or "", Prev=(searched or "").capitalize())
        if kind in table["tool_state"]:
            state, tool, gerund = table["tool_state"][kind]
            f.update(state=state, tool=tool, gerund=gerund)
        f["ready"] = f" (now {f['state']})" if transformed and kind in table["tool_state"] else ""
        if action.startswith("go to"):
            sought = detours.get(t) or (search_target(plan, t, holding) or [None])[0]
            if sought == "lamp":
                situation = "lamp_next" if searched else ("to_lamp" if holding else "find_lamp")
            elif sought and searched:
                situation = "search_next"
            elif not holding:
                situation = "search_second" if placed else "search"
            elif re.match(r"(heat|cool|clean) ", nxt):
                situation = "to_tool"
            elif nxt.startswith(("move ", "put ")):
                situation = "to_goal"
            else:
                situation = "other"
            if situation in ("search", "search_second", "search_next"):
                f["likely"] = likely_places(obj, recs, target, rng)
            searched = target if sought else None
        elif action.startswith("open "):
            situation, f["target"] = "open", " ".join(words[1:3])
        elif action.startswith("take "):
            searched = None
            situation = "take_under_lamp" if lamp_on else ("take_second" if placed else "take")
            f["target"] = action.split(" from ")[-1]
            holding = True
        elif re.match(r"(heat|cool|clean) ", action):
            situation, transformed = "use_tool", True
        elif action.startswith(("move ", "put ")):
            situation = "place_first" if kind == "two" and placed == 0 else "place"
            f["target"] = re.split(r" to | in | on ", action)[-1]
            holding, transformed, placed = False, False, placed + 1
        elif action.startswith("use "):
            searched = None
            situation, lamp_on = "use_lamp", True
        else:
            situation = "other"
        out.append((draw(rng, situation, table, **f), situation))
    return out


# ----------------------------------------------------------------------------- ScienceWorld thoughts

SCIWORLD_VERBS = [  # (regex on the action, situation); first match wins
    (r"^open door to (?P<x>.+)$", "open door"), (r"^(?:go|teleport) to (?P<x>.+)$", "go to"),
    (r"^open (?P<x>.+)$", "open"), (r"^close (?P<x>.+)$", "close"),
    (r"^pick up (?P<x>.+)$", "pick up"), (r"^focus on (?P<x>.+)$", "focus on"),
    (r"^move (?P<x>.+?) to (?P<y>.+)$", "move"), (r"^pour (?P<x>.+?) (?:into|in|to) (?P<y>.+)$", "pour"),
    (r"^deactivate (?P<x>.+)$", "deactivate"), (r"^activate (?P<x>.+)$", "activate"),
    (r"^use (?P<x>.+?) on (?P<y>.+)$", "use"), (r"^look at (?P<x>.+)$", "look at"),
    (r"^look around$", "look around"), (r"^wait\d*$", "wait"),
    (r"^connect (?P<x>.+?) to (?P<y>.+)$", "connect"), (r"^disconnect (?P<x>.+)$", "disconnect"),
    (r"^mix (?P<x>.+)$", "mix"), (r"^read (?P<x>.+)$", "read"), (r"^put down (?P<x>.+)$", "put down"),
    (r"^eat (?P<x>.+)$", "eat"), (r"^flush (?P<x>.+)$", "flush"), (r"^examine (?P<x>.+)$", "examine"),
]


def sciworld_goal(task):
    first = task.strip().split(". ")[0].rstrip(".")
    return re.sub(r"^your task is to ", "", first, flags=re.I)


def sciworld_thought(task, action, rng):
    table = THOUGHTS["scienceworld"]
    for pattern, situation in SCIWORLD_VERBS:
        m = re.match(pattern, action.strip())
        if m:
            fields = {"x": "", "y": "", **{k: v for k, v in m.groupdict().items() if v}, "goal": sciworld_goal(task)}
            return draw(rng, situation, table, **fields), situation
    return draw(rng, "other", table, goal=sciworld_goal(task), x="", y=""), "other"


# ----------------------------------------------------------------------------- BFCL thoughts

def bfcl_thought(task, rng):
    table = THOUGHTS["bfcl"]
    names = [next(iter(c)) for c in task["ground_truth"]]
    funcs = {f["name"]: f for f in task["functions"]}
    if len(names) == 1:
        fn = funcs.get(names[0], {"description": "", "parameters": {}})
        desc = fn.get("description", "").strip() or "it matches what is asked."
        desc = desc if desc.endswith(".") else desc + "."
        short = desc.split(". ")[0].rstrip(".")
        short = short[:1].lower() + short[1:]
        req = fn.get("parameters", {}).get("required", [])
        return draw(rng, "single", table, fname=names[0], desc=desc, desc_short=short,
                    required=", ".join(req) if req else "no required arguments"), "single"
    unique = sorted(set(names), key=names.index)
    listed = ", ".join(f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in unique)
    return draw(rng, "multi", table, n=len(names), fnames=listed), "multi"


def bfcl_mt_thoughts(env, rng):
    """One thought per expert step of a multi-turn BFCL episode: each call reasoned from the user's
    request and the function's own description (never the call itself), then the end of the turn."""
    table = THOUGHTS["bfcl_mt"]
    out = []
    for question, calls in zip(env.questions, env.turn_plans):
        request = question if len(question) <= 160 else question[:157].rsplit(" ", 1)[0] + "..."
        for i, call in enumerate(calls):
            fname = call.split("(", 1)[0]
            desc = env.signatures[fname].split("): ", 1)[-1].rstrip(".")
            params = [kw.arg for kw in ast.parse(call, mode="eval").body.keywords]  # rendered by envs: keywords only
            fields = dict(request=request, fname=fname, desc=desc[:1].lower() + desc[1:],
                          params=", ".join(params) if params else "none")
            situation = "first_call" if i == 0 else "next_call"
            out.append((draw(rng, situation, table, **fields), situation))
        situation = "end_turn" if calls else "nothing_to_call"
        out.append((draw(rng, situation, table, request=request), situation))
    return out


# ----------------------------------------------------------------------------- episodes -> records

SEARCH_FALLBACKS = [0]  # ALFWorld episodes where searching_plan fell back to the walkthrough


def episode_records(task, env, rng, max_plan=None):
    """Run the expert on one task; its step records, None if the expert did not win, or
    "too long" if its plan has more than max_plan steps."""
    obs, info = env.reset(task)
    plan = env.expert_plan()
    if max_plan is not None and len(plan) > max_plan:
        return "too long"
    goal = info["task"]
    if task["env"] == "alfworld":
        detours = {}
        if args.alfworld_search:
            plan, detours = searching_plan(env, task, obs, plan, random.Random(f"search/{args.seed}/{task['id']}"))
            SEARCH_FALLBACKS[0] += detours is None
            obs, info = env.reset(task)
        thoughts = alfworld_thoughts(goal, obs, plan, rng, detours)
    elif task["env"] == "scienceworld":
        thoughts = [sciworld_thought(goal, a, rng) for a in plan]
    elif task["env"] == "bfcl_mt":
        thoughts = bfcl_mt_thoughts(env, rng)
    else:
        thoughts = [bfcl_thought(task, rng)]
    observations, records, won = [obs], [], False
    for t, action in enumerate(plan):
        cands = env.valid_actions()
        if cands is not None:
            others = sorted(set(cands) - {action})
            if task["env"] == "scienceworld" and len(others) > args.max_candidates - 1:
                others = sorted(rng.sample(others, args.max_candidates - 1))
            cands = sorted(others + [action])
        messages = steps.build_messages(task["env"], goal, observations, plan[:t], args.history, info.get("functions"))
        thought, situation = thoughts[t]
        records.append({"id": f"{task['id']}/step{t:03d}", "env": task["env"], "task_type": task["task_type"],
                        "split": task["split"], "task_id": task["id"], "step": t, "messages": messages,
                        "thought": thought, "action": action, "candidates": cands, "task": goal,
                        "thought_kind": situation})
        obs, _, done, step_info = env.step(action)
        observations.append(obs)
        won = step_info["won"]
        if done:
            break
    return records if won else None


# ----------------------------------------------------------------------------- ALFWorld game generation

def _plan_worker(path, queue):
    env = envs.AlfWorld()
    try:
        env.reset({"game": path})
        queue.put(env.expert_plan())
    finally:
        env.close()


def plan_game(path, timeout):
    """The planner's action list for a game, or None if it takes longer than timeout seconds."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_plan_worker, args=(path, queue), daemon=True)
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:  # queue.Empty on timeout, or the worker died
        return None
    finally:
        proc.kill()
        proc.join()


def _make_games(tmp, seed, split, tt, n):
    """n solvable games of one task type and split, drawn in a seeded sequence (a game the planner cannot
    solve in time is redrawn); returns how many were redrawn. Each (split, type) sequence stands alone,
    so the sequences can run in any order or in parallel."""
    import alfgen
    made, draw_idx, redrawn = 0, 0, 0
    while made < n:
        name = f"{tt}-{draw_idx}"
        rng = random.Random(f"{seed}/{split}/{name}")
        draw_idx += 1
        game = alfgen.make_game(rng, tt, name.replace("-", "_"))
        path = os.path.join(tmp, split, name, "trial_0", "game.tw-pddl")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            json.dump(game, f)
        walkthrough = plan_game(path, args.alfworld_plan_timeout)
        if not walkthrough:
            shutil.rmtree(os.path.dirname(os.path.dirname(path)))
            redrawn += 1
            continue
        game["walkthrough"] = walkthrough
        with open(path, "w") as f:
            json.dump(game, f)
        made += 1
    return redrawn


def in_parallel(fn, jobs, desc, unit):
    """[fn(*job) for job in jobs] with up to --jobs processes (forked, so they see this module's state),
    in the jobs' order; a bar counts finished jobs."""
    with tqdm(total=len(jobs), desc=desc, unit=unit) as bar:
        if args.jobs <= 1:
            return [(fn(*job), bar.update())[0] for job in jobs]
        from concurrent.futures import ProcessPoolExecutor  # non-daemonic workers: plan_game may fork
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            return [future.result() for future in futures]


def generate_alfworld_games(folder, seed):
    import alfgen
    plan = [(split, tt, n) for tt in alfgen.TASK_TYPES
            for split, n in ([("ood_test", args.alfworld_test_per_type)] if tt in envs.ALFWORLD_OOD else
                             [("train", args.alfworld_train_per_type), ("id_test", args.alfworld_test_per_type)])]
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    redrawn = sum(in_parallel(_make_games, [(tmp, seed, *job) for job in plan], "alfworld games", "type x split"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return redrawn


def expert_chunk(name, tasks):
    """({task id: episode_records}, search fallbacks) for tasks run one after another in one environment."""
    before = SEARCH_FALLBACKS[0]
    with envs.make_env(name) as env:
        records = {t["id"]: episode_records(t, env, random.Random(f"{args.seed}/{t['id']}")) for t in tasks}
    return records, SEARCH_FALLBACKS[0] - before


def pick(tasks, split, per_key, key, rng, prefer=None):
    """Up to per_key tasks of each key (task type) from one split, in a seeded order; with prefer(task),
    tasks it holds true for come first (the order within each part stays the seeded one)."""
    chosen = []
    for k in sorted({key(t) for t in tasks if t["split"] == split}):
        group = [t for t in tasks if t["split"] == split and key(t) == k]
        rng.shuffle(group)
        if prefer:
            group.sort(key=lambda t: not prefer(t))  # stable: the seeded order is kept within each part
        chosen += group[:per_key]
    return chosen


def in_test_folder(task):
    """A game from a test folder of the dataset (valid_seen, valid_unseen, or generated id_test / ood_test)."""
    return any(p.startswith("valid") or p in ("id_test", "ood_test") for p in task["id"].split("/")[1:])


def build_env(name, rng, meta):
    """All step records of one environment, keyed by split."""
    if name == "alfworld":
        if args.alfworld_data:
            root = os.path.join(args.alfworld_data, "json_2.1.1")
            root = root if os.path.isdir(root) else args.alfworld_data
            all_tasks = envs.alfworld_tasks(root)
        else:
            games = os.path.join(args.out, "alfworld_games")
            t0 = time.time()
            meta["alfworld_games_redrawn"] = generate_alfworld_games(games, args.seed)
            meta["alfworld_generation_seconds"] = round(time.time() - t0, 1)
            all_tasks = envs.alfworld_tasks(games)
        tasks = (pick(all_tasks, "train", args.alfworld_train_per_type, lambda t: t["task_type"], rng)
                 + pick(all_tasks, "id_test", args.alfworld_test_per_type, lambda t: t["task_type"], rng)
                 + pick(all_tasks, "ood_test", args.alfworld_test_per_type, lambda t: t["task_type"], rng,
                        prefer=in_test_folder))  # held-out types occur in train/ too; the benchmark's own first
    elif name == "scienceworld":
        with envs.ScienceWorld() as env:
            all_tasks = envs.sciworld_tasks(env)
        if args.sciworld_tasks != "all":
            wanted = args.sciworld_tasks.split(",")
            unknown = sorted(set(wanted) - {t["task_name"] for t in all_tasks})
            if unknown:
                raise envs.EnvError(f"unknown ScienceWorld task(s) in --sciworld-tasks: {', '.join(unknown)}")
            all_tasks = [t for t in all_tasks if t["task_name"] in wanted]
        # More candidates than needed: variations whose gold path is too long are skipped at rollout.
        tasks = (pick(all_tasks, "train", 4 * args.sciworld_train_per_task, lambda t: t["task_type"], rng)
                 + pick(all_tasks, "id_test", 4 * args.sciworld_test_per_task, lambda t: t["task_type"], rng)
                 + pick(all_tasks, "ood_test", 4 * args.sciworld_test_per_task, lambda t: t["task_type"], rng))
    elif name == "bfcl_mt":
        all_tasks, tasks = envs.bfcl_mt_tasks(), []
        for split, n in (("train", args.bfcl_mt_train), ("id_test", args.bfcl_mt_test), ("ood_test", args.bfcl_mt_test)):
            group = [dict(t, obs_cap=args.bfcl_mt_obs_cap) for t in all_tasks if t["split"] == split]
            rng.shuffle(group)
            tasks += group[:n or None]
        held = sum(t["split"] == "ood_test" for t in all_tasks)
        meta["bfcl_mt_split"] = {"base_entries": len(envs.bfcl_mt_entries(envs.BFCL_MT_ID)),
                                 "long_context_entries": len(envs.bfcl_mt_entries(envs.BFCL_MT_OOD)),
                                 "long_context_kept_as_ood": held, "id_test_frac": envs.BFCL_MT_TEST_FRAC}
    else:
        all_tasks = envs.bfcl_tasks()
        tasks = []
        for split, n in (("train", args.bfcl_train), ("id_test", args.bfcl_test), ("ood_test", args.bfcl_test)):
            group = [t for t in all_tasks if t["split"] == split]
            rng.shuffle(group)
            tasks += group[:n * 2]  # extra: items whose ground truth fails BFCL's own checker are dropped

    want = {"train": args.sciworld_train_per_task, "id_test": args.sciworld_test_per_task,
            "ood_test": args.sciworld_test_per_task}
    bfcl_want = {"train": args.bfcl_train, "id_test": args.bfcl_test, "ood_test": args.bfcl_test}
    by_split = {s: [] for s in steps.SPLITS}
    done_count, failed, skipped = {}, 0, 0
    t0 = time.time()
    n_steps = 0
    ran = {}  # ALFWorld with --jobs > 1: every task's records, computed up front in parallel
    if name == "alfworld" and args.jobs > 1:  # (no per-split limit here, so no task is run in vain)
        chunks = [tasks[j::args.jobs] for j in range(args.jobs)]
        for records, fallbacks in in_parallel(expert_chunk, [(name, c) for c in chunks], f"{name} experts", "chunk"):
            ran.update(records)
            SEARCH_FALLBACKS[0] += fallbacks
    with envs.make_env(name) if not ran else contextlib.nullcontext() as env:
        for task in tasks if ran else tqdm(tasks, desc=f"{name} experts", unit="ep"):
            key = (task["split"], task["task_type"]) if name == "scienceworld" else task["split"]
            limit = want[task["split"]] if name == "scienceworld" else (bfcl_want[task["split"]] if name == "bfcl" else None)
            if limit is not None and done_count.get(key, 0) >= limit:
                continue
            max_plan = args.sciworld_max_gold if name == "scienceworld" else None
            records = ran[task["id"]] if ran else episode_records(task, env, random.Random(f"{args.seed}/{task['id']}"), max_plan)
            if records == "too long":
                skipped += 1
                continue
            if records is None:
                failed += 1
                continue
            done_count[key] = done_count.get(key, 0) + 1
            n_steps += len(records)
            by_split[task["split"]] += records
    seconds = time.time() - t0
    meta[name] = {"episodes": {s: len({r["task_id"] for r in recs}) for s, recs in by_split.items()},
                  "steps": {s: len(recs) for s, recs in by_split.items()},
                  "expert_failed": failed, "skipped_long_gold": skipped,
                  **({"search_fallbacks": SEARCH_FALLBACKS[0]} if name == "alfworld" else {}),
                  "expert_seconds": round(seconds, 1), "expert_steps_per_second": round(n_steps / max(seconds, 1e-9), 1)}
    return by_split


def fail(msg):
    sys.exit(f"error: {msg}")


def versions():
    import importlib.metadata as md
    return {p: md.version(p) for p in ("alfworld", "textworld", "scienceworld", "bfcl-eval")}


def main():
    meta = {"args": {k: v for k, v in vars(args).items() if k != "jobs"},  # --jobs changes the speed, not the data
            "versions": versions(), "python": sys.version.split()[0]}
    for name in ("history", "max_candidates", "alfworld_train_per_type", "alfworld_test_per_type", "alfworld_search",
                 "sciworld_train_per_task", "sciworld_test_per_task", "sciworld_max_gold", "bfcl_train", "bfcl_test",
                 "bfcl_mt_train", "bfcl_mt_test"):
        if getattr(args, name) < 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.jobs < 1:
        sys.exit(f"error: --jobs must be at least 1, got {args.jobs}")
    if args.bfcl_mt_obs_cap < 1:
        sys.exit(f"error: --bfcl-mt-obs-cap must be at least 1, got {args.bfcl_mt_obs_cap}")
    settings = {k: v for k, v in vars(args).items() if k not in ("jobs", "out")}
    if args.import_eto:
        if args.import_split not in steps.SPLITS:
            sys.exit(f"error: --import-split {args.import_split!r} is not one of {', '.join(steps.SPLITS)}")
        by_split, summary = eto.import_conversations(args.import_eto, args.import_env, args.import_split, args.history,
                                                     args.max_candidates, args.seed, args.alfworld_data)
        inputs = {args.import_eto: provenance.file_digest(args.import_eto)}
        provenance.claim_output(args.out, fail)
        if summary["replayed_in_games"]:  # the same layout as the experts' data: <env>_<split>.jsonl + meta.json
            meta["made_from"] = provenance.check_made_from(os.path.join(args.out, "meta.json"),
                                                      {"settings": settings, "inputs": inputs, "checkpoints": {}},
                                                      [os.path.join(args.out, "meta.json")], fail)
            for split, records in by_split.items():
                jsonio.write_jsonl_atomic(os.path.join(args.out, f"{args.import_env}_{split}.jsonl"), records)
            jsonio.write_json_atomic(os.path.join(args.out, "meta.json"), dict(meta, imported=summary))
            where = f"{args.out}/{args.import_env}_{{{','.join(s for s in steps.SPLITS if by_split[s])}}}.jsonl"
        else:
            name = os.path.splitext(os.path.basename(args.import_eto))[0]
            where = out = os.path.join(args.out, f"import_{name}_{args.import_split}.jsonl")
            made_from = provenance.check_made_from(out + ".meta.json", {"settings": settings, "inputs": inputs, "checkpoints": {}},
                                              [out], fail)
            jsonio.write_jsonl_atomic(out, by_split[args.import_split])
            jsonio.write_json_atomic(out + ".meta.json", {"args": vars(args), "imported": summary, "made_from": made_from})
        print(f"imported {summary['kept']} of {summary['trajectories']} trajectories, {summary['steps']} steps -> {where}"
              + "".join(f"; {k}: {v}" for k, v in summary.items() if k not in ("kept", "trajectories", "steps",
                                                                               "replayed_in_games")))
        return
    names = list(steps.ENVS) if args.env == "all" else cli.comma_list(args.env, "--env")
    for name in names:
        if name not in steps.ENVS:
            sys.exit(f"error: unknown environment {name!r} in --env; expected {', '.join(steps.ENVS)} or all")
    provenance.claim_output(args.out, fail)
    meta["made_from"] = provenance.check_made_from(os.path.join(args.out, "meta.json"),
                                              {"settings": settings, "inputs": {}, "checkpoints": {}},
                                              [os.path.join(args.out, "meta.json")], fail)
    t0 = time.time()
    for name in names:
        by_split = build_env(name, random.Random(f"{args.seed}/{name}"), meta)
        for split, records in by_split.items():
            jsonio.write_jsonl_atomic(os.path.join(args.out, f"{name}_{split}.jsonl"), records)
        print(f"{name}: " + ", ".join(f"{s} {meta[name]['episodes'][s]} episodes / {meta[name]['steps'][s]} steps"
                                       for s in steps.SPLITS) + f" ({meta[name]['expert_steps_per_second']} expert steps/s)")
    meta["seconds"] = round(time.time() - t0, 1)
    # Timings vary run to run; keep them out of the byte-identical data, in their own file.
    timing_keys = [k for k in meta if k.endswith("_seconds") or k == "seconds"]
    jsonio.write_json_atomic(os.path.join(args.out, "timing.json"),
                            {**{k: meta.pop(k) for k in timing_keys},
                             **{n: {k: meta[n].pop(k) for k in ("expert_seconds", "expert_steps_per_second")} for n in names}})
    jsonio.write_json_atomic(os.path.join(args.out, "meta.json"), meta)
    print(f"make_data done: {', '.join(names)} -> {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except (jsonio.DataError, envs.EnvError) as e:
        sys.exit(f"error: {e}")
