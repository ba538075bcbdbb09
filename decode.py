"""One prompt, many branches: the KV-cache decoding of probe.py and evaluate.py.

They ask many questions of the same prompt: the action after the action tag, the reasoning after the
thought tag, the log-likelihood of a reference action with or without a thought, of every candidate
action. The prompt (hundreds of tokens) is run once (encode_prompts); every question is a branch that
starts from a copy of its KV cache and costs only its own tokens (run_branches).
"""
import torch
from transformers.cache_utils import DynamicLayer

import lm
import steps


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
        n = lm.common_len([prompts[r] for r in fresh])
        if n >= lm.MIN_SHARED:
            entry = prompt_cache(encode_prompts(model, [prompts[fresh[0]][:n]], pad_id, share=False), 0)
            for r in fresh:
                reuse[r] = entry
    common = [lm.common_len([p, old["ids"]]) if old is not None else 0 for p, old in zip(prompts, reuse)]
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
    stops = lm.stop_ids(tok, model)
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
