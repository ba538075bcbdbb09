"""The step format every stage shares, and the JSONL helpers they all use.

One agent step is one record; its response is

    Thought: <reasoning>
    Action: <action>

The tags live in data/templates/format.json, the system prompts in
data/templates/prompts.json; nothing here pastes a prompt inline. Pure functions
only (plus file I/O helpers: atomic writes, resumable appends, one writer and one
configuration per output), the way nanoGPT shares only model.py.
"""
import functools
import glob
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time

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
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, path, lineno)
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


def decode_line(raw, path, lineno):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


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
    if not isinstance(rec.get("task_id", ""), str):
        raise DataError(f"{where}: field 'task_id' must be a string, got {type(rec['task_id']).__name__}")
    cands = rec.get("candidates")
    if cands is not None and not (isinstance(cands, list) and all(isinstance(c, str) for c in cands)):
        raise DataError(f"{where}: field 'candidates' must be null or a list of strings")
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


# ----------------------------------------------------------------------------- one writer, one configuration per output

def check_numbers(args, rules, fail):
    """Validate numeric flags at parse time: rules = {name: (low, high)}, either bound None for open and a
    bound given as ("<", x) exclusive; every float must be finite (nan and inf never reach the code).
    fail(one line naming the flag) on the first bad value."""
    for name, (low, high) in rules.items():
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag} must be a finite number, got {value}")
        for bound, below in ((low, True), (high, False)):
            if bound is None:
                continue
            strict, x = bound if isinstance(bound, tuple) else ("", bound)
            bad = (value <= x if strict else value < x) if below else (value >= x if strict else value > x)
            if bad:
                rel = (">" if strict else ">=") if below else ("<" if strict else "<=")
                fail(f"{flag} must be {rel} {x}, got {value}")


def file_digest(path, whole_below=1 << 28):
    """sha256 of a file's bytes, so an input is known by content (a copy is the same input, an edit is not).
    Files of 256 MiB or more (whole models): of the size and the first and last 16 MiB, seconds not minutes."""
    import hashlib
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < whole_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(1 << 24))
            f.seek(size - (1 << 24))
            h.update(f.read())
    return h.hexdigest()


def folder_digest(folder):
    """One digest of a model or checkpoint folder: its configs and weights by content (tokenizer files and
    training state left out: they do not change what the weights compute)."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin")) and name != "training_args.bin" or name in ("config.json", "adapter_config.json"):
            h.update(f"{name}:{file_digest(os.path.join(folder, name))};".encode())
    return h.hexdigest()


def model_identity(path):
    """What a base model is, for made_from: a local folder by content, a hub id by name."""
    return folder_digest(path) if os.path.isdir(path) else f"hub:{path}"


_LOCKS = []  # lock file descriptors, held until the process exits however it exits


def claim_output(path, fail, is_file=False):
    """Make `path` this process's output (a folder, or with is_file a file): its folder created if missing (one
    line, not a traceback, when that or writing there fails, or when the path is of the other kind), then one
    writer only: an exclusive flock on .<name>.lock beside it (outside an output folder, whose listing stays
    the outputs'), held until this process exits. A second process on the same output gets fail(one line
    naming the holder); the kernel drops a killed process's lock, so none blocks a rerun."""
    import fcntl
    path = os.path.abspath(path)
    if is_file and os.path.isdir(path):
        fail(f"{path}: is a folder; give --out a file path")
    if not is_file and os.path.exists(path) and not os.path.isdir(path):
        fail(f"{path}: is a file, not a folder; give --out a folder")
    folder = os.path.dirname(path) if is_file else path
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        fail(f"{path}: cannot write there ({e.strerror}); give --out a writable place")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        fail(f"{path} is being written by {holder}; one writer per output: wait for it to end or use another --out")
    if not os.access(folder, os.W_OK):
        fail(f"{folder}: cannot write there (permission denied); give --out a writable place")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} ({os.path.basename(sys.argv[0])}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
    _LOCKS.append(fd)


def check_made_from(meta_path, made_from, results, fail):
    """An output belongs to one configuration. made_from = {"settings": {...}, "inputs": {...}, "checkpoints":
    {name: digest}}: the flags that change results, the input files and base model by content, and the
    checkpoints by content. When any of `results` (files) already holds something, the made_from recorded in
    meta_path must match: settings and inputs equal, a checkpoint already there the same weights (new ones may
    join). Otherwise fail(one line saying what differs) before anything is read or rewritten.
    Returns the made_from to record (the checkpoints of both runs)."""
    if not any(os.path.exists(p) and os.path.getsize(p) for p in results):
        return made_from
    where = os.path.dirname(meta_path) or "."
    try:
        with open(meta_path) as f:
            old = json.load(f)["made_from"]
        old_checkpoints = dict(old["checkpoints"])
    except FileNotFoundError:
        fail(f"{where} holds results but no {os.path.basename(meta_path)} saying what made them; use another --out")
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{meta_path}: no readable record of what the results there were made from ({type(e).__name__}: {e}; "
             f"written by an older version?); use another --out")
    for part in ("settings", "inputs"):
        was, now = old.get(part, {}), made_from[part]
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                what = f"--{key.replace('_', '-')}" if part == "settings" else f"input {key}"
                shown = (lambda v: v) if part == "settings" else (lambda v: "absent" if v is None else f"sha256 {v[:12]}")
                fail(f"{where} was made with {what} {shown(was.get(key))!s}, this run has {shown(now.get(key))!s}; "
                     f"an output folder holds one configuration: use another --out, or the same settings to resume")
    for name, digest in made_from["checkpoints"].items():
        if name in old_checkpoints and old_checkpoints[name] != digest:
            fail(f"{where} holds results of checkpoint {name} with other weights (sha256 {old_checkpoints[name][:12]}, "
                 f"now {digest[:12]}); use another --out")
    return dict(made_from, checkpoints={**old_checkpoints, **made_from["checkpoints"]})


def merged_checkpoints(meta_path, ckpts):
    """[name, step, path] of this run's checkpoints after those an earlier run into the same folder listed (its
    records stay, and report.py ties each record to its checkpoint through this list)."""
    try:
        with open(meta_path) as f:
            old = [c for c in json.load(f)["checkpoints"] if c[0] not in {name for name, _, _ in ckpts}]
    except (OSError, ValueError, KeyError, TypeError):
        old = []
    return [list(c) for c in old] + [list(c) for c in ckpts]


def exit_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM end the process with one line and no traceback, as a kill would: every
    stage writes whole records and resumes, so there is nothing to clean up."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        os.write(2, f"\n{os.path.basename(sys.argv[0])}: stopped by {name}; rerun the same command to resume\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def umask_mode(path):
    """Give files under path (a file or a folder) the mode a plain open() would, and folders the mode of a
    plain mkdir: writers such as safetensors' make 0600 files, and tempfile.mkdtemp 0700 folders, unreadable
    to collaborators sharing a results folder."""
    umask = os.umask(0)
    os.umask(umask)
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~umask)
        return
    for root, _, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


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


def check_finite_adapter(ckpt):
    """ValueError unless a PEFT adapter's weights (small: read whole) are all finite: a diverged run's NaN
    adapter would give records and episodes that look like an ordinary weak model's. Whole-model checkpoints
    are checked as they load (lm.load_model)."""
    path = os.path.join(ckpt, "adapter_model.safetensors")
    if os.path.exists(path):
        from safetensors.torch import load_file
        if not all(t.isfinite().all() for t in load_file(path).values() if t.is_floating_point()):
            raise ValueError(f"{ckpt}: non-finite weights (a diverged training run?); not probed or rolled out")


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
        check_finite_adapter(ckpt)
        step = checkpoint_step(ckpt)
        if step is None:
            raise ValueError(f"{ckpt}: no training step found (train.py's meta.json, trainer_state.json, or a checkpoint-N name)")
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}/{os.path.basename(os.path.normpath(ckpt))}"
        out.append((name, step, ckpt))
    return out


def base_model(given, checkpoints, default="smollm2-135m"):
    """The base model to load checkpoints on: --model when given; else what the checkpoints were trained on:
    train.py's meta.json naming the embedded default, or the base_model_name_or_path of a PEFT adapter (a
    local folder, or a hub id); else the embedded default. A base named as a path that is not there is a
    ValueError naming it: probing another model's adapter on the embedded one would measure nothing."""
    if given:
        return given
    for ckpt in checkpoints:
        meta = os.path.join(ckpt, "meta.json")
        if os.path.exists(meta):
            try:
                with open(meta) as f:
                    if json.load(f)["args"]["model"] == default:
                        return default
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not train.py's: the adapter config below says
        path = os.path.join(ckpt, "adapter_config.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    base = json.load(f).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"{path}: not readable ({type(e).__name__}: {e})") from None
            if not base or os.path.isdir(base):
                return base or default
            if base.startswith(("/", ".", "~")) or base.count("/") != 1:
                raise ValueError(f"{path} names base model {base!r}, which is not there; pass --model with its folder")
            return base  # a hub id
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
    for lineno, raw in enumerate(data[:end].split(b"\n"), 1):
        line = decode_line(raw, path, lineno)
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # damage other than a torn last line: never guess, never overwrite
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"fix or remove that line to resume") from None
    return records


def part_path(path, rank, world):
    """Where one process of a multi-process run appends: <name>.part-<rank>.jsonl beside path (path itself alone)."""
    return path if world == 1 else f"{path[:-len('.jsonl')]}.part-{rank}.jsonl"


def parts_of(path):
    """The part files a multi-process run left beside path (records.jsonl -> records.part-*.jsonl), sorted."""
    return sorted(glob.glob(f"{glob.escape(path[:-len('.jsonl')])}.part-[0-9]*.jsonl"))


def read_done_all(path):
    """Records already in path and in any part files beside it (a killed multi-process run's), path's first."""
    return [r for p in [path] + parts_of(path) for r in read_done(p)]


def merge_parts(path, order):
    """Rewrite path whole from itself and its part files, then remove the parts: the records in a canonical
    order (order(record): a sort key; equal keys keep file order, so a retried episode stays after its errored
    record), each distinct record once. The file is then the same whatever the number of processes was."""
    records, seen = [], set()
    for r in read_done_all(path):
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(r)
    records.sort(key=order)
    write_jsonl_atomic(path, records)
    for p in parts_of(path):
        os.remove(p)
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
