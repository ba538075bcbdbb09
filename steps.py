"""The step format every stage shares, and the JSONL helpers they all use.

One agent step is one record; its response is

    Thought: <reasoning>
    Action: <action>

The tags live in data/templates/format.json, the system prompts in
data/templates/prompts.json; nothing here pastes a prompt inline. Pure functions
only (plus file I/O helpers), the way nanoGPT shares only model.py.
"""
import functools
import json
import os
import random
import re
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "data", "templates")

# Fields every step record must carry (make_data.py writes them, all later stages read them).
STEP_FIELDS = ("id", "env", "task_type", "split", "messages", "thought", "action")
SPLITS = ("train", "id_test", "ood_test")
ENVS = ("alfworld", "scienceworld", "bfcl")


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


@functools.lru_cache(maxsize=None)
def load_template(name):
    path = os.path.join(TEMPLATES, name)
    with open(path) as f:
        return json.load(f)


def tags():
    fmt = load_template("format.json")
    return fmt["thought_tag"], fmt["action_tag"]


def format_response(thought, action):
    """The assistant turn for one step: 'Thought: ...\\nAction: ...'."""
    thought_tag, action_tag = tags()
    return f"{thought_tag} {thought}\n{action_tag} {action}"


def action_only_response(action):
    """The response of action-only SFT (--no-cot) and of prompt-mode history turns."""
    return f"{tags()[1]} {action}"


def response_spans(thought, action):
    """Character spans (start, end) of thought, action tag and action in format_response's output.

    train.py maps these onto tokens by offsets, so the masked tokens are exactly those of the action.
    """
    thought_tag, action_tag = tags()
    text = format_response(thought, action)
    t0 = len(thought_tag) + 1
    tag0 = t0 + len(thought) + 1
    a0 = tag0 + len(action_tag) + 1
    assert text[t0:t0 + len(thought)] == thought and text[a0:] == action
    return {"thought": (t0, t0 + len(thought)), "tag": (tag0, tag0 + len(action_tag)), "action": (a0, len(text))}


def parse_response(text):
    """Split model output into (thought, action). action is None when no action tag was written.

    The action is the first line after the last action tag; the thought is what stands before
    that tag, without its own tag.
    """
    thought_tag, action_tag = tags()
    i = text.rfind(action_tag)
    if i < 0:
        return text.strip(), None
    before, after = text[:i], text[i + len(action_tag):]
    thought = before.strip()
    if thought.startswith(thought_tag):
        thought = thought[len(thought_tag):].strip()
    action = after.strip().split("\n")[0].strip()
    return thought, action


def first_line(text):
    """The action a prompt-prefilled turn produced: its first non-empty line."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def normalize_action(action):
    """Exact-match key: lower case, single spaces, no trailing period."""
    if action is None:
        return None
    return re.sub(r"\s+", " ", action.strip().lower()).rstrip(".").strip()


def same_action(a, b):
    """Do two actions agree? Equal exact-match keys, and an action at all: two empty or missing
    actions (no tag, nothing after it) are two failures to act, not an agreement."""
    a, b = normalize_action(a), normalize_action(b)
    return bool(a) and a == b


def build_messages(env, task, observations, actions, window, functions=None):
    """Chat messages of the prompt at step t = len(actions).

    observations: [o_0 .. o_t] (o_t is the current one); actions: [a_0 .. a_{t-1}].
    History turns show past actions only (no past reasoning), so prompt-mode and CoT-mode
    rollouts see the same kind of history. Only the last `window` exchanges are kept; the
    first user turn (task + first observation) is always kept.
    """
    if len(observations) != len(actions) + 1:
        raise ValueError(f"need one more observation than actions, got {len(observations)} and {len(actions)}")
    prompts = load_template("prompts.json")[env]
    first = prompts["first_user"].format(task=task, observation=observations[0], functions=functions or "")
    messages = [{"role": "system", "content": prompts["system"]}, {"role": "user", "content": first}]
    t = len(actions)
    start = max(0, t - window)
    if start > 0:
        omitted = load_template("format.json")["history_omitted"].format(n=start)
        messages[1]["content"] += "\n" + omitted
    for i in range(start, t):
        messages.append({"role": "assistant", "content": action_only_response(actions[i])})
        messages.append({"role": "user", "content": observations[i + 1]})
    return messages


def render_prompt(tokenizer, messages):
    """The prompt text in the model's own chat template, ending where the assistant starts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- JSONL

def read_jsonl(path, required=()):
    """Records of a JSONL file; a malformed line or a missing field raises DataError naming both."""
    records = []
    try:
        f = open(path)
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field in required:
                if field not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
            records.append(rec)
    return records


def check_step(rec, where):
    """Validate one step record's field types; where = 'file:line' for the message."""
    for field in STEP_FIELDS:
        if field not in rec:
            raise DataError(f"{where}: missing field '{field}'")
    for field in ("id", "env", "task_type", "split", "thought", "action"):
        if not isinstance(rec[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(rec[field]).__name__}")
    if rec["split"] not in SPLITS:
        raise DataError(f"{where}: field 'split' is {rec['split']!r}, expected one of {', '.join(SPLITS)}")
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: field 'messages' must end with a user turn")


def read_steps(path):
    """Step records of one JSONL file, each checked by check_step."""
    records = read_jsonl(path)
    for i, rec in enumerate(records):
        check_step(rec, f"{path}:record {i + 1} (id={rec.get('id')!r})")
    return records


def sample_per_split(records, n, seed):
    """{(env, split): records} with at most n records per env x split, in file order, drawn with a
    generator of its own per group, so probe.py and make_conflicts.py given the same n and seed pick
    the same steps (n = 0: all)."""
    groups = {}
    for rec in records:
        groups.setdefault((rec["env"], rec["split"]), []).append(rec)
    for (env, split), recs in groups.items():
        if n and len(recs) > n:
            pick = sorted(random.Random(f"sample/{seed}/{env}/{split}").sample(range(len(recs)), n))
            groups[(env, split)] = [recs[i] for i in pick]
    return dict(sorted(groups.items()))


def write_jsonl_atomic(path, records):
    """Write all records or nothing: a temp file in the same folder, then rename over the target."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- resumable outputs and summaries

def read_done(path):
    """Records already in an append-only output (resume); a torn last line from a kill is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the process died mid-write: drop the partial line so appends stay valid JSONL
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def append_jsonl(f, records):
    """Append and flush, so a kill loses at most the record being written."""
    for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    f.flush()


def mean_ci(values, seed=0, n_boot=1000):
    """(mean, low, high): the mean of numbers/bools (None skipped) and its bootstrap 95% interval."""
    import numpy as np
    x = np.array([float(v) for v in values if v is not None])
    if len(x) == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return round(float(x.mean()), 4), round(float(lo), 4), round(float(hi), 4)


def summarize(records, keys, metrics, seed=0):
    """One row per distinct value of `keys`: n and, per metric, its mean with _lo/_hi bootstrap bounds."""
    groups = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(k) for k in keys), []).append(rec)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        recs = groups[key]
        row = dict(zip(keys, key), n=len(recs))
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean_ci([r.get(m) for r in recs], seed)
        rows.append(row)
    return rows


def write_csv_atomic(path, rows):
    """Rows (dicts) as CSV, columns in first-seen order; all or nothing like write_jsonl_atomic."""
    import csv
    import io
    cols = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".csv")
    with os.fdopen(fd, "w") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
