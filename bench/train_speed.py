"""bench/train_speed.py: train.py's training throughput against TRL's SFTTrainer (+ peft), against the
machine's measured matmul peak, and against train.py run with other arguments (--variant), same model,
data, LoRA config, batch size and threads, in one run.

    pip install -r bench/requirements-trl.txt     # TRL only for this benchmark (make bench-deps)
    python bench/train_speed.py --examples 32 --batch-size 4
    python bench/train_speed.py --data data/study/alfworld_train.jsonl --episodes 8 --batch-size 8 --skip-trl --variant=--share-prefix

Prints, for each trainer, tokens per second over the same examples' (unpadded) tokens (one pass),
peak RSS, and model FLOP utilisation = 6 x parameters x tokens/s / measured matmul FLOP/s; for each
variant, its speed ratio to plain train.py and both loss curves. The second command on this project's
2-core CPU machine, quiet (2026-11-25; the run also timed a since-removed bf16 autocast variant):

    matmul peak 208.8 GFLOP/s (2 threads, fp32 2048x2048)
    train.py     226.7 tok/s  MFU 0.88  peak RSS 2.70 GB  (134.5M params, 31 examples, batch 8)
    train.py --share-prefix     314.1 tok/s (54% of tokens computed)  peak RSS 3.40 GB  vs plain: 1.39x
      loss per step, plain:   2.230 2.334 2.359
      loss per step, variant: 2.629 2.469 2.199  (max |diff| 0.398; mean 2.4322 vs 2.3079)

(--share-prefix batches whole episodes, so its batches, and so its loss per step, differ from plain's;
its gradient on a given batch is the same, which tests/test_train.py checks.)
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (embedded)")
parser.add_argument("--data", default="data/generated/alfworld_train.jsonl", help="step JSONL")
parser.add_argument("--examples", type=int, default=32, help="examples, one pass (a multiple of --batch-size)")
parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r, dropout 0.05, all linear projections)")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
parser.add_argument("--skip-trl", action="store_true", help="only train.py and the matmul peak")
parser.add_argument("--episodes", type=int, default=0,
                    help="train on the steps of the first N episodes of --data, whole (instead of --examples sampled steps); "
                         "what --share-prefix needs to share anything")
parser.add_argument("--variant", action="append", default=[],
                    help="extra train.py arguments to time against plain train.py on the same data, e.g. '--bf16-autocast' "
                         "(repeatable); prints the speed ratio and the loss curves side by side")
parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
args = parser.parse_args()

import torch  # noqa: E402

import jsonio  # noqa: E402
import lm  # noqa: E402
import steps  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trl_worker():
    """TRL's SFTTrainer on the examples train.py would pick (its seeded shuffle of --max-examples)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    import resource
    torch.set_num_threads(args.threads)
    records = steps.read_steps(args.data)
    random.Random(0).shuffle(records)
    records = records[:args.examples]  # with --episodes the data file holds exactly those steps
    data = Dataset.from_list([{"prompt": r["messages"], "completion": [
        {"role": "assistant", "content": steps.format_response(r["thought"], r["action"])}]} for r in records])
    path = lm.resolve_model(args.model)
    tok = lm.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                       max_steps=args.examples // args.batch_size, learning_rate=2e-4, lr_scheduler_type="cosine",
                       warmup_steps=max(1, round(0.05 * args.examples / args.batch_size)), logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True,
                       bf16=False, fp16=False, dataloader_num_workers=0, max_length=1024, seed=0,
                       completion_only_loss=True, disable_tqdm=True)
    peft = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    print(json.dumps({"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


if args.trl_worker:
    trl_worker()
    sys.exit(0)

torch.set_num_threads(args.threads)
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
for _ in range(3):
    a @ b
reps, t0 = 20, time.time()
for _ in range(reps):
    a @ b
peak = 2 * 2048 ** 3 * reps / (time.time() - t0)
print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({args.threads} threads, fp32 2048x2048)")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
with torch.device("meta"):
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm.resolve_model(args.model))).parameters())

out = tempfile.mkdtemp(prefix="train_speed_")
data, n_examples = args.data, args.examples
if args.episodes:  # whole episodes, so that --share-prefix has steps to share a prefix with
    records = steps.read_steps(args.data)
    keep = sorted({r["task_id"] for r in records})[:args.episodes]
    records = [r for r in records if r["task_id"] in keep]
    data, n_examples = os.path.join(out, "episodes_train.jsonl"), len(records)
    jsonio.write_jsonl_atomic(data, records)


def run_train(name, extra):
    """train.py for one pass over the examples; (tok/s, peak GB, loss per step)."""
    run = os.path.join(out, name)
    proc = subprocess.run([sys.executable, "train.py", "--model", args.model, "--data", data, "--max-examples", str(n_examples),
                           "--max-steps", str(n_examples // args.batch_size), "--batch-size", str(args.batch_size),
                           "--lora-r", str(args.lora_r), "--lora-alpha", str(2 * args.lora_r), "--threads", str(args.threads),
                           "--device", "cpu", "--log-every", "1", "--out", run, *extra],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"train.py {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    m = re.search(r"([\d.]+) tok/s \((\d+)% of the tokens computed\), peak RSS ([\d.]+) GB", proc.stdout)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))]
    return float(m.group(1)), float(m.group(3)), losses, int(m.group(2))


ours, ours_gb, base_losses, _ = run_train("plain", [])
print(f"train.py  {ours:8.1f} tok/s  MFU {6 * n_params * ours / peak:.2f}  peak RSS {ours_gb:.2f} GB  ({n_params / 1e6:.1f}M params, "
      f"{n_examples} examples, batch {args.batch_size})")
for i, variant in enumerate(args.variant):
    tok_s, gb, losses, computed = run_train(f"variant{i}", variant.split())
    diff = max(abs(a - b) for a, b in zip(losses, base_losses))
    print(f"train.py {variant}  {tok_s:8.1f} tok/s ({computed}% of tokens computed)  peak RSS {gb:.2f} GB  "
          f"vs plain: {tok_s / ours:.2f}x")
    print(f"  loss per step, plain:   {' '.join(f'{x:.3f}' for x in base_losses)}")
    print(f"  loss per step, variant: {' '.join(f'{x:.3f}' for x in losses)}  (max |diff| {diff:.3f}; "
          f"mean {sum(losses) / len(losses):.4f} vs {sum(base_losses) / len(base_losses):.4f})")
if not args.skip_trl:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-worker", "--model", args.model, "--data", data,
                           "--examples", str(n_examples), "--batch-size", str(args.batch_size), "--lora-r", str(args.lora_r),
                           "--threads", str(args.threads)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"TRL run failed (pip install -r bench/requirements-trl.txt):\n{proc.stderr[-3000:]}")
    trl = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"TRL       {trl['tok_s']:8.1f} tok/s  MFU {6 * n_params * trl['tok_s'] / peak:.2f}  peak RSS {trl['peak_gb']:.2f} GB")
    print(f"train.py / TRL: {ours / trl['tok_s']:.2f}x")
