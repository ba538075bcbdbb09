"""bench/decode_speed.py: what one greedy decode step costs at batch 1, 8 and 16, and how much of it is
the weights' matmuls; the ceiling on what lockstep batching (evaluate.py --num-envs) can buy.

For each batch size B, a prompt cache of --context tokens per row is built, then single-token
decode steps are timed through the same in-place KV buffer evaluate.py uses (decode.run_branches), and
the model's linear layers alone are timed on (B, hidden) inputs. Prints ms per step, ms per row-token
and the batch-B step's cost relative to batch 1: if a batch-16 step costs 2x a batch-1 step, sixteen
rows decode 8x faster than one row at a time, before prefill, environments and startup.

    python bench/decode_speed.py --context 600
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
parser.add_argument("--context", type=int, default=600, help="prompt tokens per row in the cache")
parser.add_argument("--batch", default="1,8,16", help="comma list of batch sizes")
parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
parser.add_argument("--device", default="cpu", help="cpu, cuda (bf16) or auto")
args = parser.parse_args()

import torch  # noqa: E402

import decode  # noqa: E402
import lm  # noqa: E402

torch.set_num_threads(args.threads)
device, dtype = lm.pick_device(args.device)
model = lm.load_model(lm.resolve_model(args.model), None, device, dtype)
linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def sync():
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def decode_ms(b):
    """ms per decode step of b rows after a context-token prompt, through lm's KV buffer."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10_000, (b, args.context), generator=g)
    state = decode.encode_prompts(model, ids.tolist(), 0)
    cache = decode._rows(state["layers"], list(range(b)), room=args.steps + 2)
    mask, pos = state["mask"], state["next_pos"][:, None]
    x = torch.randint(100, 10_000, (b, 1), generator=g).to(device)
    keep = torch.zeros((b, 1), dtype=torch.long, device=device)
    times = []
    with torch.no_grad():
        for i in range(args.steps + 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            sync()
            t = time.perf_counter()
            decode._last_logits(model, x, mask, pos + i, cache, keep)
            sync()
            times.append(time.perf_counter() - t)
    return 1000 * sum(times[1:]) / args.steps  # the first step warms up


def linear_ms(b):
    """ms for one pass of b rows through every linear layer (the weight reads and matmuls of a step)."""
    xs = {m.in_features: torch.randn(b, m.in_features, device=device, dtype=dtype) for m in linears}
    with torch.no_grad():
        for m in linears:
            m(xs[m.in_features])
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            for m in linears:
                m(xs[m.in_features])
        sync()
    return 1000 * (time.perf_counter() - t) / args.steps


rows = []
for b in map(int, args.batch.split(",")):
    rows.append((b, decode_ms(b), linear_ms(b)))
    print(f"batch {b:3d}: decode step {rows[-1][1]:7.1f} ms ({rows[-1][1] / b:6.2f} ms per row-token), "
          f"linear layers {rows[-1][2]:6.1f} ms", flush=True)
base = rows[0][1]
for b, ms, lin in rows:
    print(f"batch {b:3d} step = {ms / base:4.2f}x the batch-{rows[0][0]} step: rows decode {b * base / ms:4.2f}x faster "
          f"than one at a time; linear layers {100 * lin / ms:3.0f}% of the step")
print(f"{args.model}, {device} {dtype}, {args.threads} threads, {args.context}-token context, {args.steps} steps each")
