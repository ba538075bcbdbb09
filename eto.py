"""ETO/AgentGym SFT conversations -> step records (make_data.py --import-eto): the public trajectories the
paper trains on, as this project's step format.

An item is {"id", "conversations": [{"from": "human" | "gpt", "value": ...}, ...]}; every gpt turn after the
instruction exchange is one step, its "Thought: ... Action: ..." split by steps.parse_response. With the
games at hand (ALFWorld's with --alfworld-data, ScienceWorld's always), each trajectory is replayed in its
game (replay): the prompts then hold the game's own observations, the candidates its valid actions, and
only trajectories that replay to a win are kept, the rest counted by reason. Without them the conversations
are converted as they are. Errors are jsonio.DataError naming the file, the item and the field.
"""
import collections
import json
import os
import random
import re

from tqdm import tqdm

import envs
import jsonio
import steps

ETO_SCIWORLD = steps.load_template("eto_sciworld_tasks.json")["tasks"]  # ETO's task numbers -> ScienceWorld names

SPEAKERS = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def conversation_turns(item, loc):
    """[(speaker, text)] of one item, speaker human | gpt: {"conversations": [{"from": "human"|"gpt", "value"}]}
    (ETO, AgentGym) or the OpenAI-messages shape some copies ship ({"messages"} or {"conversations"} of
    {"role": "user"|"assistant", "content"}); a leading system turn is joined to the first human turn."""
    conv = item.get("conversations", item.get("messages")) if isinstance(item, dict) else None
    if not isinstance(conv, list) or not conv:
        raise jsonio.DataError(f"{loc}: missing field 'conversations' (a list of {{from, value}} or {{role, content}} turns)")
    turns, system = [], ""
    for j, turn in enumerate(conv):
        who = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if j == 0 and who == "system" and isinstance(text, str):
            system = text + "\n\n"
            continue
        if who not in SPEAKERS or not isinstance(text, str):
            raise jsonio.DataError(f"{loc}: conversations[{j}] needs 'from' (human|gpt) and a string 'value' "
                                  f"(or 'role' user|assistant and a string 'content')")
        turns.append((SPEAKERS[who], text))
    for j, (who, _) in enumerate(turns):
        if who != ("human" if j % 2 == 0 else "gpt"):  # otherwise observations and replies misalign
            at = j + bool(system)
            raise jsonio.DataError(f"{loc}: conversations[{at}] is a {who} turn; turns must alternate "
                                  f"human, gpt, human, ... starting with human")
    if not turns:
        raise jsonio.DataError(f"{loc}: no human turn (only a system turn)")
    if system:
        turns[0] = ("human", system + turns[0][1])
    return turns


def read_items(path):
    """[(where, item)] of a JSON list (or object) or a JSONL file."""
    if not os.path.isfile(path):
        raise jsonio.DataError(f"--import-eto: {path}: " + ("a folder, not a file" if os.path.isdir(path) else "no such file"))
    with open(path, "rb") as f:
        data = f.read()
    try:
        items = json.loads(data)
        items = items if isinstance(items, list) else [items]
        return [(f"{path}: item {i + 1}", item) for i, item in enumerate(items)]
    except (ValueError, UnicodeDecodeError, RecursionError):  # not one JSON document: JSONL, read line by line
        pass
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = jsonio.decode_line(raw, path, lineno)
        if line.strip():
            out.append((f"{path}:{lineno}", jsonio.parse_json(line, f"{path}:{lineno}")))
    return out


def episode_turns(turns, loc):
    """(observations, [(thought, action)]) of one conversation: the first human turn carries the instruction
    and the task (ETO's bare 'OK' reply and the turn after it are joined to it)."""
    humans = [text for who, text in turns if who == "human"]
    gpts = [text for who, text in turns if who == "gpt"]
    if gpts and steps.parse_response(gpts[0])[1] is None:
        gpts = gpts[1:]
        humans = [humans[0] + "\n\n" + humans[1]] + humans[2:] if len(humans) > 1 else humans
    replies = []
    for t, reply in enumerate(gpts):
        thought, action = steps.parse_response(reply)
        if action is None or not thought:
            raise jsonio.DataError(f"{loc}: gpt turn {t + 1} has no 'Thought:' and 'Action:' lines")
        if not action:
            raise jsonio.DataError(f"{loc}: gpt turn {t + 1} has an empty action")
        replies.append((thought, action))
    return humans, replies


def game_of(item, loc, games_root):
    """The real game an ALFWorld item names in 'game_file' (e.g. data/json_2.1.1/train/<task>/<trial>/game.tw-pddl),
    as a task of games_root (which holds json_2.1.1/), or None when that game is not there."""
    game_file = item.get("game_file")
    if not isinstance(game_file, str) or "json_2.1.1/" not in game_file:
        raise jsonio.DataError(f"{loc}: field 'game_file' must name a game under json_2.1.1/, got {game_file!r}")
    rel = game_file[game_file.index("json_2.1.1/") + len("json_2.1.1/"):].rstrip("/")
    rel = rel if rel.endswith("game.tw-pddl") else rel + "/game.tw-pddl"
    root = os.path.join(games_root, "json_2.1.1") if os.path.isdir(os.path.join(games_root, "json_2.1.1")) else games_root
    if not os.path.isfile(os.path.join(root, rel)):
        return None
    return envs.alfworld_task(root, rel)


def sciworld_task_of(item, loc, known):
    """The ScienceWorld task and variation an ETO item's id names ('<n>_<variation>', n as in ETO's task
    table: data/templates/eto_sciworld_tasks.json), with its split here (known: envs.sciworld_tasks by id);
    None when the id names none, or a variation in no split here (ScienceWorld's dev variations)."""
    m = re.fullmatch(r"(\d+)_(\d+)", str(item.get("id", "")))
    name = ETO_SCIWORLD.get(m.group(1)) if m else None
    if name is None:
        return None
    return known.get(f"scienceworld/{name}/{int(m.group(2))}")


def clean_observation(text):
    return envs.alfworld_v4_observation(text.strip().removeprefix("Observation:").strip())


def replay(env, task, replies, recorded, rng, history, max_candidates):
    """Replay one trajectory in its game: (records, observation mismatches), or (reason, None) when it does not
    replay cleanly: an action the game does not admit at that state (ALFWorld: in either wording; ScienceWorld:
    one it answers as unknown), or no win at the end. The records' prompts hold the game's own observations
    (what a rollout shows), their actions the installed wording, their candidates the game's valid actions at
    that state (ALFWorld: all; ScienceWorld: --max-candidates of them with the reference, as the experts' data)."""
    if not replies:
        return "no win", None
    obs, info = env.reset(task)
    goal, observations, actions, records, mismatches = info["task"], [obs], [], [], 0
    for t, (thought, action) in enumerate(replies):
        valid = env.valid_actions()
        if task["env"] == "alfworld":
            action = envs.alfworld_v4(action)
            if action not in valid:
                return "diverged", None
            cands = sorted(valid)
        else:
            others = sorted(set(valid) - {action})
            cands = sorted(rng.sample(others, min(len(others), max_candidates - 1)) + [action])
        records.append({"id": f"{task['id']}/step{t:03d}", "env": task["env"], "task_type": task["task_type"],
                        "split": task["split"], "task_id": task["id"], "step": t,
                        "messages": steps.build_messages(task["env"], goal, observations, actions, history),
                        "thought": thought, "action": action, "candidates": cands, "task": goal, "thought_kind": "imported"})
        obs, _, done, step_info = env.step(action)
        if obs.startswith(envs.INVALID_FEEDBACK.get(task["env"], ())):
            return "diverged", None
        observations.append(obs)
        actions.append(action)
        if t + 1 < len(recorded) and clean_observation(recorded[t + 1]) != clean_observation(obs):
            mismatches += 1
        if done:
            break
    if not step_info["won"] or len(records) < len(replies):
        return "no win", None
    return records, mismatches


def import_conversations(path, env_name, split, history, max_candidates, seed, alfworld_data=None):
    """ETO/AgentGym SFT files -> step records: {split: records} and a summary for meta.json.

    ALFWorld with --alfworld-data: each item's game_file is found among the real games and the trajectory is
    replayed in it (replay); only whole trajectories that replay cleanly are kept, split by the game's task
    type and folder (held-out types are out-of-domain), and the summary counts what was dropped and why.
    ScienceWorld (always installed): the same, the task and variation read off ETO's '<n>_<variation>' id.
    Otherwise the conversations are converted as they are (no candidates, task type from the id's prefix,
    --import-split), and the summary says what is missing."""
    if env_name not in steps.ENVS:
        raise jsonio.DataError(f"--import-env: unknown environment {env_name!r}; expected one of {', '.join(steps.ENVS)}")
    items, seen, games_seen = read_items(path), {}, set()
    with_games = alfworld_data and env_name == "alfworld" or env_name == "scienceworld"
    by_split = {s: [] for s in steps.SPLITS}
    counts = collections.Counter()
    env = envs.make_env(env_name) if with_games else None
    # ScienceWorld: a held-out task's every variation is out-of-domain, as ALFWorld's held-out types are
    known = {t["id"]: t for t in envs.sciworld_tasks(env, every_ood_variation=True)} if env_name == "scienceworld" else {}
    try:
        for loc, item in tqdm(items, desc="import", unit="traj", disable=not with_games):
            turns = conversation_turns(item, loc)
            episode = str(item.get("id", loc))
            if episode in seen:
                raise jsonio.DataError(f"{loc}: field 'id': duplicate {episode!r} (first at {seen[episode]})")
            seen[episode] = loc
            humans, replies = episode_turns(turns, loc)
            counts["trajectories"] += 1
            if not with_games:
                by_split[split] += conversation_records(episode, item, humans, replies, env_name, split, history)
                continue
            task = game_of(item, loc, alfworld_data) if env_name == "alfworld" else sciworld_task_of(item, loc, known)
            if task is None:
                counts["game not found" if env_name == "alfworld" else "task or variation not found"] += 1
                continue
            if task["id"] in games_seen:  # a game is one episode: its first trajectory that replays is kept
                counts["same game again"] += 1
                continue
            records, mismatches = replay(env, task, replies, humans, random.Random(f"{seed}/{task['id']}"), history,
                                         max_candidates)
            if mismatches is None:
                counts[records] += 1
                continue
            games_seen.add(task["id"])
            counts["replayed to a win"] += 1
            counts["observations differing from the game's"] += mismatches
            by_split[task["split"]] += records
    finally:
        if env is not None:
            env.close()
    n = sum(map(len, by_split.values()))
    if not n:
        raise jsonio.DataError(f"{path}: nothing to import (" + (", ".join(f"{k}: {v}" for k, v in counts.items()) if with_games
                              else "no gpt turn with 'Thought:' and 'Action:' lines") + ")")
    summary = dict(counts, steps=n, kept=counts["replayed to a win"] if with_games else counts["trajectories"],
                   replayed_in_games=bool(with_games))
    if not with_games:
        summary["missing"] = ("candidates (no game to ask), task types and splits from the games, replay checks: "
                              "pass --alfworld-data DIR" if env_name == "alfworld" else "candidates (no environment asked)")
    return by_split, summary


def conversation_records(episode, item, humans, replies, env_name, split, history):
    """Records of one conversation as it is, without its environment: the human turns are the observations."""
    observations, actions, records = [humans[0]], [], []
    for t, (thought, action) in enumerate(replies):
        messages = steps.build_messages(env_name, "", observations, actions, history)
        messages[1]["content"] = messages[1]["content"].removeprefix("Task: \n")
        records.append({"id": f"import/{episode}/step{t:03d}", "env": env_name,
                        "task_type": str(item.get("task_type", episode.split("_")[0])),
                        "split": split, "task_id": f"import/{episode}", "step": t,
                        "messages": messages, "thought": thought, "action": action, "candidates": None,
                        "task": "", "thought_kind": "imported"})
        actions.append(action)
        if t + 1 < len(humans):
            observations.append(humans[t + 1])
        else:
            break
    return records
