"""Checkpoint folders from any trainer (train.py, the HF Trainer, TRL, a bare PEFT adapter): listed in
training-step order, checked whole before the first is loaded (configs parse, safetensors complete, weights
finite), and the base model each was trained on.
"""
import glob
import json
import os
import re
import sys


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


def series_of_all(folders, flag, last_only=False):
    """checkpoint_series of every folder given to one flag: a folder given twice (also through another path or a
    symlink) is taken once, with a note on stderr; two different runs whose checkpoints would get one name (a/run,
    b/run) are a ValueError naming both, since their records would share ids and pool as one run."""
    out, seen, names = [], {}, {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            print(f"note: {flag} {folder} is {seen[real]} again; taken once", file=sys.stderr)
            continue
        seen[real] = folder
        for name, step, ckpt in checkpoint_series(folder, last_only):
            if name in names:
                raise ValueError(f"{flag}: {names[name]} and {folder} both give checkpoint {name!r}: two runs with one "
                                 f"folder name would share record ids; give them separate --out, or rename one")
            names[name] = folder
            out.append((name, step, ckpt))
    return out
