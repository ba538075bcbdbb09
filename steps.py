"""The step format every stage shares, and the JSONL helpers they all use.

One agent step is one record; its response is

    Thought: <reasoning>
    Action: <action>

The tags live in data/templates/format.json, the system prompts in
data/templates/prompts.json; nothing here pastes a prompt inline. Pure functions
only (plus file I/O helpers), the way nanoGPT shares only model.py.
"""
import functools
import glob
import json
import math
import os
import random
import re
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "data", "templates")

# Fields every step record must carry (make_data.py writes them, all later stages read them).
STEP_FIELDS = ("id", "env", "task_type", "split", "messages", "thought", "action")
SPLITS = ("train", "id_test", "ood_test")
ENVS = ("alfworld", "scienceworld", "bfcl", "bfcl_mt")


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


class ContextError(ValueError):
    """A prompt, with the tokens to be generated after it, does not fit the context (never cut silently)."""


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


# A private-use character that stands in for the assistant's reply while a chat template renders a turn.
RESPONSE_MARK = "\ue000"
# Templates with a dated system header (Llama-3.x writes "Today Date: ..." from the clock) get a fixed date,
# or a prompt rendered at training time and one rendered at inference would differ.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def render_turn(tokenizer, messages):
    """(prompt, end): how the model's chat template renders `messages` followed by an assistant turn,
    split around that turn's content. prompt is what stands before the reply, end what the template
    writes after it (its end of turn). This one rule is used for training (prompt + response + end) and
    for inference (the model continues prompt), so both see the same tokens, also where a template is not
    prefix-preserving: Qwen3's writes an empty <think></think> block before the final assistant message
    but not at the end of its generation prompt, so the prompt here includes that block."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": RESPONSE_MARK}], tokenize=False,
                                         **TEMPLATE_KWARGS)
    if full.count(RESPONSE_MARK) != 1:
        raise ValueError("the chat template does not render an assistant turn's content as given")
    prompt, end = full.split(RESPONSE_MARK)
    return prompt, end


def render_prompt(tokenizer, messages):
    """The prompt text in the model's own chat template, ending where the assistant's reply starts."""
    return render_turn(tokenizer, messages)[0]


# ----------------------------------------------------------------------------- JSONL

def read_jsonl_lines(path, required=()):
    """[(line number, record)] of a JSONL file (blank lines skipped); a malformed line or a missing field
    raises DataError naming the file, the line and the field."""
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
            records.append((lineno, rec))
    return records


def read_jsonl(path, required=()):
    """Records of a JSONL file (see read_jsonl_lines)."""
    return [rec for _, rec in read_jsonl_lines(path, required)]


def check_unique_ids(numbered, path):
    """[(line, record)] must not repeat an id: a repeated step would be trained or probed twice."""
    first = {}
    for lineno, rec in numbered:
        if rec.get("id") in first:
            raise DataError(f"{path}:{lineno}: field 'id': duplicate {rec['id']!r} (first on line {first[rec['id']]})")
        first[rec.get("id")] = lineno


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
    if rec["env"] not in ENVS:
        raise DataError(f"{where}: field 'env' is {rec['env']!r}, expected one of {', '.join(ENVS)}")
    check_messages(rec.get("messages"), where)


def check_messages(msgs, where):
    """A prompt: a non-empty list of {role, content} strings that ends with a user turn."""
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: field 'messages' must end with a user turn, not {msgs[-1]['role']!r}")


def read_steps(path, with_lines=False):
    """Step records of one JSONL file, each checked by check_step, ids unique ([(line, record)] with_lines)."""
    numbered = read_jsonl_lines(path)
    for lineno, rec in numbered:
        check_step(rec, f"{path}:{lineno} (id={rec.get('id')!r})")
    check_unique_ids(numbered, path)
    return numbered if with_lines else [rec for _, rec in numbered]


def read_steps_files(paths):
    """Step records of several files, in order; an id repeated across files is an error too."""
    records, first = [], {}
    for path in paths:
        for lineno, rec in read_steps(path, with_lines=True):
            if rec["id"] in first:
                raise DataError(f"{path}:{lineno}: field 'id': duplicate {rec['id']!r} (first in {first[rec['id']]})")
            first[rec["id"]] = f"{path}:{lineno}"
            records.append(rec)
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


def _mkstemp(folder, suffix):
    """A temp file for an atomic write, with the mode a plain open() would give (mkstemp's is 0600,
    which would make a shared results folder unreadable to collaborators)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_jsonl_atomic(path, records):
    """Write all records or nothing: a temp file in the same folder, then rename over the target."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _mkstemp(folder, ".jsonl")
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
    fd, tmp = _mkstemp(folder, ".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- checkpoints, from any trainer

def checkpoint_step(ckpt):
    """Training step of a checkpoint folder: train.py's meta.json, else the HF Trainer's / TRL's
    trainer_state.json (global_step), else the N of a checkpoint-N name; None if none of these says."""
    for name, key in (("meta.json", "step"), ("trainer_state.json", "global_step")):
        path = os.path.join(ckpt, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    value = json.load(f)[key]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: no readable '{key}' ({type(e).__name__}: {e})") from None
            if not isinstance(value, int):
                raise ValueError(f"{path}: field '{key}' must be an integer, got {value!r}")
            return value
    m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(ckpt)))
    return int(m.group(1)) if m else None


def list_checkpoints(folder):
    """A run folder -> its checkpoint-N folders in training-step order (never string order: a TRL
    series checkpoint-500, checkpoint-1000 sorts by number); a checkpoint folder -> [folder]."""
    found = [p for p in glob.glob(os.path.join(folder, "checkpoint-*")) if os.path.isdir(p)
             and os.path.basename(p)[len("checkpoint-"):].isdigit()]
    if not found:
        return [folder]
    return sorted(found, key=lambda p: (checkpoint_step(p), int(os.path.basename(p)[len("checkpoint-"):])))


def _check_safetensors(path):
    """A safetensors file is whole: its header parses and its last tensor ends where the file ends."""
    import struct
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
            end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise ValueError(f"{path}: corrupt safetensors header") from None
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated or corrupt safetensors file (tensors end at byte {8 + n + end}, file has {size})")


def check_checkpoint(ckpt):
    """Raise ValueError (one line) unless ckpt is a loadable PEFT adapter (adapter_config.json + weights) or a
    whole model folder (config.json + weights): its JSON configs parse and its safetensors files are whole.
    Cheap (no weights are read), so every checkpoint of a series is checked before the first is used."""
    if not os.path.isdir(ckpt):
        raise ValueError(f"checkpoint folder not found: {ckpt}")
    config = next((c for c in ("adapter_config.json", "config.json") if os.path.exists(os.path.join(ckpt, c))), None)
    if config is None:
        raise ValueError(f"{ckpt}: neither adapter_config.json (a PEFT adapter) nor config.json (a model) is there")
    try:
        with open(os.path.join(ckpt, config)) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{os.path.join(ckpt, config)}: not readable JSON ({e})") from None
    stem = "adapter_model" if config == "adapter_config.json" else "model"
    weights = sorted(glob.glob(os.path.join(ckpt, f"{stem}*.safetensors")) + glob.glob(os.path.join(ckpt, f"{stem}*.bin"))
                     + glob.glob(os.path.join(ckpt, "pytorch_model*.bin")))
    if not weights:
        raise ValueError(f"{ckpt}: {config} but no {stem}.safetensors (or .bin) weights")
    for path in weights:
        if path.endswith(".safetensors"):
            _check_safetensors(path)
        elif os.path.getsize(path) == 0:
            raise ValueError(f"{path}: empty weights file")


def checkpoint_series(folder, last_only=False):
    """[(name, step, folder)] of a run folder's checkpoints in training order (or the one checkpoint a
    folder is), each checked (check_checkpoint) before any is used; name = "<run>/<checkpoint>".
    last_only: only the last checkpoint, the only one checked. ValueError (one line) on any fault."""
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint folder not found: {folder}")
    found = list_checkpoints(folder)
    out = []
    for ckpt in found[-1:] if last_only else found:
        check_checkpoint(ckpt)
        step = checkpoint_step(ckpt)
        if step is None:
            raise ValueError(f"{ckpt}: no training step found (train.py's meta.json, trainer_state.json, or a checkpoint-N name)")
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}/{os.path.basename(os.path.normpath(ckpt))}"
        out.append((name, step, ckpt))
    return out


def base_model(given, checkpoints, default="smollm2-135m"):
    """The base model to load checkpoints on: --model when given; else the base_model_name_or_path a PEFT
    adapter among the checkpoints names, when that is a local folder (another trainer's run on
    another model); else the embedded default."""
    if given:
        return given
    for ckpt in checkpoints:
        path = os.path.join(ckpt, "adapter_config.json")
        if os.path.exists(path):
            with open(path) as f:
                base = json.load(f).get("base_model_name_or_path")
            if base and os.path.isdir(base):
                return base
    return default


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
    records = []
    for lineno, line in enumerate(data[:end].decode().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # damage other than a torn last line: never guess, never overwrite
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"fix or remove that line to resume") from None
    return records


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


def wilson(successes, n, z=1.96):
    """Wilson score 95% interval of a proportion: unlike the bootstrap, not degenerate at 0 or n successes
    (0 of 64 gives [0, 0.057], not [0, 0])."""
    if not n:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def fisher_greater(a, n_a, b, n_b):
    """One-sided Fisher exact p-value that a/n_a is above b/n_b: the probability, with the margins fixed,
    of a or more of the a + b successes falling in the first group (hypergeometric tail)."""
    k, total = a + b, n_a + n_b
    tail = sum(math.comb(n_a, i) * math.comb(n_b, k - i) for i in range(a, min(n_a, k) + 1))
    return tail / math.comb(total, k)


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
    fd, tmp = _mkstemp(folder, ".csv")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
