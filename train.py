"""train.py: LoRA SFT on CoT agent steps, with reduced action supervision (--mask-action-frac).

Reads step JSONL (make_data.py), one example per record: prompt = the chat messages in the model's
own template, response = "Thought: ...\\nAction: ..." + end of turn; loss only on the response.
A fraction k of examples, drawn by random.Random(seed) alone, has the loss on its final action
tokens masked (thought, action tag and end of turn stay supervised). k=0 is plain CoT SFT;
--no-cot trains on "Action: ..." alone.

Writes <out>/checkpoint-<step:06d>/ every --save-every steps and at the end: a PEFT adapter
(adapter_config.json + adapter_model.safetensors, loadable with PeftModel.from_pretrained), the
tokenizer, meta.json and the training state for --resume. Names sort in training order. Also
<out>/metrics.jsonl, one line per --log-every steps:
    {"step": 10, "epoch": 0, "loss": 1.23, "action_loss": 0.8, "thought_loss": 1.4, "tokens_per_s": 950.0,
     "computed_frac": 1.0, "lr": 0.0002}
tokens_per_s counts the examples' tokens; computed_frac is the share of them that ran through the model
(below 1 with --share-prefix).

    python train.py --mask-action-frac 0.3
    python train.py --data 'data/generated/*_train.jsonl' --max-steps 20 --batch-size 4 --out runs/tiny
"""
import argparse
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# data
parser.add_argument("--data", nargs="+", default=["data/generated/*_train.jsonl"], help="step JSONL files or globs (sorted)")
parser.add_argument("--any-split", action="store_true",
                    help="train on steps of every split, test splits included (a memorization probe); without it, "
                         "steps whose split is not 'train' are refused")
parser.add_argument("--max-examples", type=int, default=0, help="use only the first N examples after a seeded shuffle (0 = all)")
parser.add_argument("--max-len", type=int, default=2048, help="tokens per example; longer examples are an error")
# objective
parser.add_argument("--mask-action-frac", type=float, default=0.0, help="fraction k in [0, 1] of examples whose action tokens get no loss")
parser.add_argument("--no-cot", action="store_true", help="action-only SFT baseline (response = 'Action: ...')")
# model
parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (the embedded SmolLM2-135M-Instruct)")
parser.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (scale = alpha / r)")
parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout probability")
parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma list of module names LoRA adapts (Llama/Qwen/Mistral naming)")
# optimisation
parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored if --max-steps > 0)")
parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0 = from --epochs)")
parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
parser.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="padded tokens per forward pass; gradient accumulation splits a batch (bounds activation memory: "
                         "~3.6 MB per token for SmolLM2-135M LoRA on CPU). 0 = 512 on CPU (as fast as 2048 there), "
                         "4096 on CUDA (6.6x 512's speed on an H200, bench/README.md)")
parser.add_argument("--share-prefix", action="store_true",
                    help="batches are whole episodes' steps (episodes in seeded order) and the prompt prefix the steps "
                         "of an episode share (system prompt, task, first observation) runs once per batch; the same "
                         "gradient as running every step whole (tested), fewer tokens through the model. 1.39x on CPU; "
                         "on a GPU, where a pass costs its kernel launches, 4x slower: leave it off there")
parser.add_argument("--grad-checkpoint", default="auto", choices=["off", "auto", "on"],
                    help="recompute activations in the backward pass (~1/3 more compute, ~half the memory): "
                         "auto = only for micro-batches longer than --micro-batch-tokens (single long examples)")
parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (LoRA); use ~1e-5 for --full-finetune")
parser.add_argument("--warmup-frac", type=float, default=0.05, help="linear warmup as a fraction of all steps, then cosine to 0")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
parser.add_argument("--seed", type=int, default=0, help="seeds masking choice, data order, LoRA init, dropout")
# output
parser.add_argument("--out", default="runs/k{k}_seed{seed}", help="run folder ({k} and {seed} are filled in)")
parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
parser.add_argument("--save-steps", default="", help="comma list of extra steps to checkpoint at (e.g. 8,16,33,66: denser "
                                                     "early, where the probes' curves move); the last step is always saved")
parser.add_argument("--log-every", type=int, default=5, help="log line + metrics.jsonl every N steps")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--init-adapter", default="", help="start from this LoRA adapter's weights (a train.py or PEFT checkpoint) "
                                                        "with a fresh optimizer and schedule: continued training, curricula")
parser.add_argument("--stop-at-step", type=int, default=0, help="exit after saving this step, as if killed (for tests and preemptible jobs)")
parser.add_argument("--device", default="auto", help="auto (cuda+bf16 if present, else cpu+fp32), cpu, cuda, cuda:1")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
args = parser.parse_args()

import torch  # noqa: E402  (after argparse so --help is instant)
from tqdm import tqdm  # noqa: E402

import checkpoint_io  # noqa: E402
import cli  # noqa: E402
import jsonio  # noqa: E402
import lm  # noqa: E402
import provenance  # noqa: E402
import sft  # noqa: E402
import steps  # noqa: E402

cli.exit_cleanly()


def fail(msg):
    sys.exit(f"\nerror: {msg}")  # on a line of its own, after any progress bar


def load_examples(tok):
    """Token ids, labels and kinds of every record; which ones are masked comes from their own RNG."""
    files = sorted({f for pattern in args.data for f in (sorted(glob.glob(pattern)) or [pattern])})
    for path in files:
        if not os.path.isfile(path):
            fail(f"data file not found: {path}")
    records = steps.read_steps_files(files)
    if not records:
        fail(f"no training records in {', '.join(files)}")
    held_out = sorted({r["split"] for r in records} - {"train"})
    if held_out and not args.any_split:  # e.g. --data 'DATA/*.jsonl', which also matches the test files
        first = next(r for r in records if r["split"] != "train")
        fail(f"--data holds {sum(r['split'] != 'train' for r in records)} steps of the {', '.join(held_out)} split(s) "
             f"(first: {first['id']}); train on the train split (DATA/*_train.jsonl), or pass --any-split on purpose")
    data_rng = random.Random(args.seed)
    if args.max_examples:
        data_rng.shuffle(records)
        records = records[:args.max_examples]
    # Exactly round(k * n) examples are masked, chosen by a generator used for nothing else.
    n_mask = round(args.mask_action_frac * len(records))
    masked = set(random.Random(f"mask/{args.seed}").sample(range(len(records)), n_mask))
    examples = []
    for i, rec in enumerate(tqdm(records, desc="tokenize", unit="ex", leave=False)):
        ids, labels, kinds = lm.encode_step(tok, rec, mask_action=i in masked, no_cot=args.no_cot)
        if len(ids) > args.max_len:
            fail(f"record {rec['id']}: {len(ids)} tokens is more than --max-len {args.max_len}")
        examples.append({"ids": ids, "labels": labels, "kinds": kinds, "masked": i in masked,
                         "episode": rec.get("task_id") or rec["id"]})
    hashes = {}
    for path in files:
        with open(path, "rb") as f:
            hashes[path] = hashlib.sha256(f.read()).hexdigest()
    return examples, hashes


def epoch_batches(examples, epoch):
    """Batches of one epoch: a seeded shuffle, then length-grouped within windows of 50 batches,
    so a batch pads little while the order stays random. Same (seed, epoch) -> same batches.
    With --share-prefix: episodes in a seeded order, their steps packed into batches in order."""
    rng = random.Random(f"order/{args.seed}/{epoch}")
    if args.share_prefix:
        episodes = {}
        for i, e in enumerate(examples):
            episodes.setdefault(e["episode"], []).append(i)
        order = sorted(episodes)
        rng.shuffle(order)
        idx = [i for ep in order for i in episodes[ep]]
        return [idx[j:j + args.batch_size] for j in range(0, len(idx), args.batch_size)]
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    window = args.batch_size * 50
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: len(examples[i]["ids"]))
        batches += [chunk[j:j + args.batch_size] for j in range(0, len(chunk), args.batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step, total):
    warm = max(1, int(args.warmup_frac * total))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def trainable_state(model):
    if args.full_finetune:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(model)


def save_checkpoint(model, tok, optimizer, step, epoch, data_hashes):
    """Write to a hidden temp folder, then rename: a kill never leaves a half checkpoint."""
    if not all(torch.isfinite(p).all() for p in params):
        fail(f"training diverged by step {step}: non-finite weights (lower --lr?); not saved")
    largest = max(float(p.detach().abs().max()) for p in params)
    if largest > WEIGHT_LIMIT:
        fail(f"training diverged by step {step}: weights up to {largest:.3g}, past 1000x the largest weight of the model "
             f"as built ({WEIGHT_LIMIT / 1000:.3g}) (lower --lr?); not saved")
    name = f"checkpoint-{step:06d}"
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "torch_rng": torch.get_rng_state(), "log_acc": dict(acc),  # the sums of the log line in progress
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, "training_state.pt"))
    import importlib.metadata as md
    meta = {"args": vars(args), "model_path": model_path, "model_identity": model_identity, "data": data_hashes,
            "step": step, "epoch": epoch, "seed": args.seed, "device": device, "dtype": str(dtype), "run_identity": run_identity(data_hashes),
            "versions": {p: md.version(p) for p in ("torch", "transformers", "peft")}}
    jsonio.write_json_atomic(os.path.join(tmp, "meta.json"), meta)
    jsonio.umask_mode(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# The settings that define a run: --resume refuses a checkpoint trained with any other value of these
# (or other data). Threads, logging, checkpoint cadence, device and micro-batching may change.
RUN_DEFINING = ("model", "init_adapter", "full_finetune", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "mask_action_frac",
                "no_cot", "max_examples", "max_len", "epochs", "max_steps", "batch_size", "lr", "warmup_frac",
                "weight_decay", "grad_clip", "seed", "share_prefix")


def run_identity(data_hashes):
    """What defines this run's weights (the settings above and the data by content): report.py tells runs
    apart by it, so a copied run folder is one run and two runs sharing a folder name are two."""
    return {"settings": {name: getattr(args, name) for name in RUN_DEFINING}, "data": sorted(data_hashes.values())}


def check_resume(ckpt, data_hashes):
    """The checkpoint must come from this same run: same defining settings, same data (by content)."""
    path = os.path.join(ckpt, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        saved, saved_data = meta["args"], meta["data"]
        saved_data.values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{path}: not readable train.py metadata ({type(e).__name__}: {e}); cannot check what the run was")
    for name in RUN_DEFINING:
        was, now = saved.get(name, parser.get_default(name)), getattr(args, name)
        if was != now:
            fail(f"--resume: {ckpt} was trained with --{name.replace('_', '-')} {was!r}, this run asks for {now!r}; "
                 f"rerun with the same value or use another --out")
    if sorted(saved_data.values()) != sorted(data_hashes.values()):
        fail(f"--resume: the training data differ from {ckpt}'s (its files: {', '.join(sorted(saved_data))}; "
             f"now: {', '.join(sorted(data_hashes))}, compared by sha256); use another --out")


def latest_checkpoint():
    found = sorted(glob.glob(os.path.join(out_dir, "checkpoint-[0-9]*")))
    return found[-1] if found else None


# ----------------------------------------------------------------------------- setup

cli.check_numbers(args, {
    "mask_action_frac": (0, 1), "lora_r": (1, None), "lora_alpha": (("<", 0), None), "lora_dropout": (0, ("<", 1)),
    "epochs": (("<", 0), None), "max_steps": (0, None), "batch_size": (1, None), "micro_batch_tokens": (0, None),
    "lr": (("<", 0), None), "warmup_frac": (0, 1), "weight_decay": (0, None), "grad_clip": (0, None),
    "max_examples": (0, None), "max_len": (1, None), "save_every": (0, None), "log_every": (1, None),
    "stop_at_step": (0, None), "threads": (0, None)}, fail)
try:
    save_steps = {int(x) for x in args.save_steps.split(",") if x.strip()}
except ValueError:
    fail(f"--save-steps must be a comma list of step numbers, got {args.save_steps!r}")
if any(x < 1 for x in save_steps):
    fail(f"--save-steps must list steps >= 1, got {args.save_steps!r}")
if args.threads:
    torch.set_num_threads(args.threads)
try:
    out_dir = args.out.format(k=args.mask_action_frac, seed=args.seed)
except (KeyError, IndexError, ValueError) as e:  # '{name}', '{0}', a lone brace: a name to keep as it is needs {{ }}
    fail(f"--out {args.out!r}: only {{k}} and {{seed}} are filled in ({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}")
device, dtype = lm.pick_device(args.device)
args.micro_batch_tokens = args.micro_batch_tokens or (4096 if device.startswith("cuda") else 512)

# Under torchrun each process takes a slice of every batch; gradients are summed across processes
# after the micro-batches (no DDP wrapper: slices may differ in micro-batch count). Rank 0 writes.
try:
    world = lm.world_size()
except ValueError as e:
    fail(str(e))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
main_process = rank == 0
try:
    model_path = lm.resolve_model(args.model)
    tok = lm.load_tokenizer(model_path)
    model_identity = provenance.model_identity(model_path)  # probe.py and evaluate.py check adapters against it
except (OSError, ValueError) as e:
    fail(f"cannot load model {args.model!r}: {e}")
pad_id = tok.pad_token_id
try:
    examples, data_hashes = load_examples(tok)
except (jsonio.DataError, ValueError) as e:
    fail(str(e))

random.seed(args.seed)
torch.manual_seed(args.seed)  # same LoRA init on every rank
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
if args.grad_checkpoint != "off":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if not args.full_finetune:
    from peft import LoraConfig, get_peft_model
    have = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in args.target_modules.split(",") if m not in have]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        fail(f"--target-modules: {', '.join(unknown)} not in {model_path} (its linear layers: {', '.join(linear)})")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.target_modules.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
if args.init_adapter:
    if args.full_finetune:
        fail("--init-adapter starts LoRA from an adapter; for full fine-tuning pass the model folder as --model")
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    try:
        checkpoint_io.check_checkpoint(args.init_adapter)
        set_peft_model_state_dict(model, load_file(os.path.join(args.init_adapter, "adapter_model.safetensors")))
    except (ValueError, OSError, RuntimeError) as e:
        fail(f"--init-adapter {args.init_adapter}: {e}")
if main_process:  # one writer per run folder, before anything is trained (or written) there
    provenance.claim_output(out_dir, fail)
params = [p for p in model.parameters() if p.requires_grad]
# Divergence that stays finite (a huge --lr) is caught by what it does: weights past 1000x the largest weight of the
# model as built, or a batch loss past 3x that of a uniform guess over the vocabulary (ln V nats per token).
WEIGHT_LIMIT = 1000 * max(float(p.detach().abs().max()) for p in model.parameters())
LOSS_LIMIT = 3 * math.log(model.get_output_embeddings().weight.shape[0])
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

batches_per_epoch = math.ceil(len(examples) / args.batch_size)
total_steps = args.max_steps or max(1, math.ceil(args.epochs * batches_per_epoch))
step = 0
if args.resume and latest_checkpoint():
    ckpt = latest_checkpoint()
    for other in sorted(glob.glob(os.path.join(out_dir, "checkpoint-[0-9]*"))):  # every one: a folder is one run
        check_resume(other, data_hashes)
    try:
        state = torch.load(os.path.join(ckpt, "training_state.pt"), weights_only=True)
        if args.full_finetune:
            model.load_state_dict(AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).state_dict())
        else:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            set_peft_model_state_dict(model, load_file(os.path.join(ckpt, "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
    except Exception as e:  # a truncated or corrupt file: torch, safetensors and transformers each raise their own
        fail(f"{ckpt}: cannot load the checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             f"remove that folder to resume from the one before")
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    step = state["step"]
    print(f"resumed from {ckpt} at step {step}")
elif os.path.exists(latest_checkpoint() or "") and not args.resume:
    fail(f"{out_dir} already has checkpoints; pass --resume to continue or choose another --out")
if main_process:
    os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(args.seed + 1000 * rank + step)  # dropout differs across ranks, fixed by seed and step
if args.resume and step and world == 1:
    torch.set_rng_state(state["torch_rng"])

n_masked = sum(e["masked"] for e in examples)
n_tokens = sum(len(e["ids"]) for e in examples)
if main_process:
    print(f"device {device} ({dtype}) x {world} process(es), model {model_path}, {len(examples)} examples ({n_tokens} tokens), "
          f"{n_masked} with masked action ({n_masked / len(examples):.3f}), {total_steps} steps, out {out_dir}")

# ----------------------------------------------------------------------------- train

model.train()
metrics_path = os.path.join(out_dir, "metrics.jsonl")
if main_process and os.path.exists(metrics_path):
    # A fresh run starts a new log; a resumed one keeps the lines up to its checkpoint, which the
    # steps after it (logged before the kill) would otherwise repeat.
    kept = [r for r in jsonio.read_done(metrics_path) if r.get("step", 0) <= step]
    jsonio.write_jsonl_atomic(metrics_path, kept)
acc = {"loss": 0.0, "n": 0, "action": 0.0, "n_action": 0, "thought": 0.0, "n_thought": 0, "tokens": 0, "computed": 0}
if args.resume and step and state.get("log_acc"):  # so the next log line averages the same steps as an unbroken run's
    acc.update(state["log_acc"])
t_log = time.time()
t_start = time.time()
run_tokens = 0  # the examples' (unpadded) tokens trained on by this process, for the final throughput
run_computed = 0  # of which went through the model (fewer with --share-prefix)
bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not main_process)
while step < total_steps:
    epoch, pos = divmod(step, batches_per_epoch)
    batch = epoch_batches(examples, epoch)[pos]
    lr = lr_at(step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_sup = sft.supervised_tokens(examples, batch)
    optimizer.zero_grad(set_to_none=True)
    shard = batch[rank::world]
    sums = sft.batch_backward(model, examples, shard, n_sup, pad_id, args.micro_batch_tokens, args.share_prefix,
                             args.grad_checkpoint) if shard else {}
    for key, value in sums.items():
        acc[key] += value
    run_computed += sums.get("computed", 0)
    shard_tokens = sum(len(examples[i]["ids"]) for i in shard)
    acc["tokens"] += shard_tokens
    run_tokens += shard_tokens
    if world > 1:
        for p in params:  # sum of slices = the whole batch's gradient (the loss is divided by the batch's n_sup)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
    batch_loss = sums.get("loss", 0.0) / max(1, n_sup)  # a host number: no device sync in a plain run
    if world > 1:  # the whole batch's loss, so every process takes the same decision below
        total = torch.tensor(sums.get("loss", 0.0), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        batch_loss = total.item() / max(1, n_sup)
    if not (math.isfinite(batch_loss) and torch.isfinite(norm)) or batch_loss > LOSS_LIMIT:
        # A diverged run must not leave checkpoints that later stages would read as a trained model.
        fail(f"training diverged at step {step + 1}: loss {batch_loss:.4g} (limit {LOSS_LIMIT:.3g}: 3x a uniform guess), gradient norm "
             f"{norm.item():.4g} (lower --lr?); nothing saved after {latest_checkpoint() or 'the start'}")
    optimizer.step()
    step += 1
    bar.update()
    log_now = step % args.log_every == 0 or step == total_steps
    if log_now and world > 1:
        totals = torch.tensor([acc[k] for k in sorted(acc)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        acc = dict(zip(sorted(acc), totals.tolist()))
    if log_now and main_process:
        dt = time.time() - t_log
        row = {"step": step, "epoch": epoch, "loss": round(acc["loss"] / max(1, acc["n"]), 4),
               "action_loss": round(acc["action"] / max(1, acc["n_action"]), 4),
               "thought_loss": round(acc["thought"] / max(1, acc["n_thought"]), 4),
               "tokens_per_s": round(acc["tokens"] / max(dt, 1e-9), 1),
               "computed_frac": round(acc["computed"] / max(1, acc["tokens"]), 4), "lr": lr}
        tqdm.write(f"step {step:6d} | loss {row['loss']:.4f} | action {row['action_loss']:.4f} | "
                   f"thought {row['thought_loss']:.4f} | {row['tokens_per_s']:8.1f} tok/s | lr {lr:.2e}")
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        t_log = time.time()
    if log_now:
        acc = dict.fromkeys(acc, 0.0)
    if (step == total_steps or (args.save_every and step % args.save_every == 0) or step in save_steps
            or step == args.stop_at_step):
        if main_process:
            save_checkpoint(model, tok, optimizer, step, epoch, data_hashes)
        if world > 1:
            dist.barrier()
    if step == args.stop_at_step:
        bar.close()
        print(f"stopped at step {step} (--stop-at-step); rerun with --resume to continue")
        if world > 1:
            dist.destroy_process_group()
        sys.exit(0)
bar.close()
if world > 1:
    dist.destroy_process_group()
if main_process:
    import resource
    seconds = time.time() - t_start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB
    print(f"train done: {step} steps, {len(examples)} examples, k={args.mask_action_frac}, {seconds:.1f}s, "
          f"{run_tokens * world / max(seconds, 1e-9):.1f} tok/s ({run_computed / max(1, run_tokens):.0%} of the tokens computed), peak RSS {peak_gb:.2f} GB, "
          f"final {os.path.join(out_dir, f'checkpoint-{step:06d}')}")
