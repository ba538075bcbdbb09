"""A run's identity and the rules every output folder keeps: one writer (an flock held for the process's
life), one configuration (made_from: the flags that change results, the inputs and base model by content,
the checkpoints by content), so a rerun resumes its own results and never mixes in another run's.
"""
import json
import os
import sys
import time


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
        if name == "adapter_config.json":
            h.update(f"{name}:{adapter_config_digest(os.path.join(folder, name))};".encode())
        elif name.endswith((".safetensors", ".bin")) and name != "training_args.bin" or name == "config.json":
            h.update(f"{name}:{file_digest(os.path.join(folder, name))};".encode())
    return h.hexdigest()



# Config fields that PEFT keeps as sets and writes in set order (which changes with Python's hash seed).
SET_VALUED = ("target_modules", "modules_to_save", "exclude_modules")


def adapter_config_digest(path):
    """sha256 of a PEFT adapter_config.json by what it says, not by the order PEFT wrote a set in: rewritten as PEFT
    writes it (indent 2, keys sorted) with its set-valued lists sorted, so two saves of one run give one identity
    (and a file already in that order keeps its plain sha256); a file that is not JSON is taken by its bytes."""
    import hashlib
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, RecursionError):
        return file_digest(path)
    if isinstance(config, dict):
        for key in SET_VALUED:
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key], key=str)
    return hashlib.sha256(json.dumps(config, indent=2, sort_keys=True).encode()).hexdigest()


def model_identity(path):
    """What a base model is, for made_from: a local folder by content, a hub id by name."""
    return folder_digest(path) if os.path.isdir(path) else f"hub:{path}"


_LOCKS = []  # lock file descriptors, held until the process exits however it exits


def claim_output(path, fail, is_file=False):
    """Make `path` this process's output (a folder, or with is_file a file): its folder created if missing (one
    line, not a traceback, when that or writing there fails, or when the path is of the other kind), then one
    writer only: an exclusive flock on .<name>.lock beside it (outside an output folder, whose listing stays
    the outputs'), held until this process exits. A second process on the same output gets fail(one line
    naming the holder), also through a symlink (the lock belongs to the resolved path); the kernel drops a killed
    process's lock, so none blocks a rerun."""
    import fcntl
    path = os.path.realpath(path)  # the real folder: a symlink to it is the same output, with the same lock
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


def lock_holder(path):
    """Who holds the one-writer lock of an output (claim_output's), or None: so a reader can refuse an output that
    is still being written. A shared lock, taken and dropped at once, never blocks the writer for long."""
    import fcntl
    path = os.path.realpath(path)
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return os.read(fd, 4096).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


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
