"""train.py's inner loop: the gradient of one batch of encoded steps (lm.encode_step).

A batch is split into micro-batches of at most `max_tokens` padded tokens, each run, scored and
backpropagated in turn (gradient accumulation), so memory stays bounded whatever the batch. With
share_prefix, the steps of one episode in a batch run their common prompt prefix (system prompt, task,
first observation: often half the tokens) once.
"""
import torch

import lm
from lm import ACTION, PROMPT, THOUGHT


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
    prefix. Examples alone in their episode, or sharing fewer than lm.MIN_SHARED tokens, come first,
    together, with prefix_len 0."""
    by_episode = {}
    for i in batch:
        by_episode.setdefault(examples[i]["episode"], []).append(i)
    unshared, shared = [], []
    for members in by_episode.values():
        seqs = [examples[i]["ids"] for i in members]
        limit = min(next(t for t, k in enumerate(examples[i]["kinds"]) if k != PROMPT) - 1 for i in members)
        common = min(lm.common_len(seqs), limit)
        if len(members) > 1 and common >= lm.MIN_SHARED:
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
