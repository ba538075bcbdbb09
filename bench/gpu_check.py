"""bench/gpu_check.py: the CUDA path end to end in minutes, with nothing to download (make gpu-check).

A Qwen3-style model (q/k norms, grouped-query attention) is built from a config with random weights, with
the embedded SmolLM2 tokenizer; then, on --device:
  1. train.py for --steps steps (bf16 on CUDA), and again under torchrun --nproc_per_node 1 (nccl on CUDA);
  2. probe.py on a few records of the trained run;
  3. evaluate.py --backend hf on a few episodes, the environment replayed from the step data (a worker that
     answers the expert's action with the recorded next observation and anything else with "Nothing
     happens."), since a GPU machine may lack the environments' packages;
  4. with CUDA: greedy texts and log-likelihoods of a tiny random model on CUDA fp32 against the CPU;
  5. prints training tokens/s and MFU (6 x parameters x tokens/s over the GPU's dense bf16 peak, or the
     measured matmul peak on CPU), warm training steps in-process (train.py's step without its start-up,
     first step and saving) per micro-batch size with --share-prefix on and off, one kernel launch's cost,
     and greedy decode tokens/s at batch 1, 8 and 32 against transformers' generate at batch 1; --profile
     adds torch.profiler's tables of a training step and of both decoders.
--stages picks stages; --micro-batch-tokens 4096,16384 trains once per value (train.py's micro-batching).
Exits non-zero if any stage fails or CUDA disagrees with the CPU. Needs only the repository, torch,
transformers and peft. A machine without the embedded model gets the tokenizer folder and a step file
carried along (a few MB; make them here with make_data.py and
`python -c "import lm; lm.load_tokenizer(lm.resolve_model('smollm2-135m')).save_pretrained('cache/tokenizer')"`):

    python bench/gpu_check.py --tokenizer cache/tokenizer       # on a GPU machine: Qwen3-style ~0.6B
    python bench/gpu_check.py --device cpu --size tiny --steps 2  # the CPU smoke test (tests/test_gpu_check.py)
    python bench/gpu_check.py --tokenizer cache/tokenizer --stages step,speed --micro-batch-tokens 4096,16384 --profile

On an NVIDIA H200 (2026-11-26) every stage passed; its figures and profiles are in bench/README.md.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
parser.add_argument("--size", default="0.5b", choices=["tiny", "0.5b"], help="tiny: 2 layers, hidden 64; 0.5b: Qwen3-0.6B-like")
parser.add_argument("--tokenizer", default="", help="tokenizer folder (default: the embedded SmolLM2's, converted on first use)")
parser.add_argument("--data", default="data/study/alfworld_train.jsonl", help="step JSONL to train on, probe and replay")
parser.add_argument("--steps", type=int, default=20, help="training steps per train.py run")
parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
parser.add_argument("--records", type=int, default=4, help="probe records and replayed episodes")
parser.add_argument("--micro-batch-tokens", default="4096",
                    help="train.py's --micro-batch-tokens (4096 is its CUDA default); a comma list trains once per value "
                         "and prints each one's speed")
parser.add_argument("--stages", default="train,torchrun,probe,eval,cpu,step,speed",
                    help="comma list of the stages to run (train is needed by torchrun's speed line, probe and eval)")
parser.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's tables of one warm training step and of 16 greedy tokens at batch 1 "
                         "(decode.run_branches, then generate)")
parser.add_argument("--out", default="", help="work folder (default: a temp folder)")
parser.add_argument("--replay-worker", default="", help=argparse.SUPPRESS)
args = parser.parse_args()


def replay_worker(path):
    """python -m envs --serve's protocol over recorded episodes: the expert's action gets the recorded next
    observation, any other action "Nothing happens."; the episode is won when the expert path ends."""
    import steps
    episodes = {}
    for rec in sorted(steps.read_steps(path), key=lambda r: (r["task_id"], r["step"])):
        episodes.setdefault(rec["task_id"], []).append(rec)
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    recs, t = None, 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "close":
            break
        if msg["cmd"] == "reset":
            recs, t = episodes[msg["task"]["id"]], 0
            reply = {"obs": recs[0]["messages"][1]["content"], "info": {"task": recs[0]["task"], "max_steps": 50},
                     "plan": [r["action"] for r in recs], "valid": recs[0]["candidates"] if msg.get("valid") else None}
        else:
            right = msg["action"] == recs[t]["action"]
            t += right
            done = t == len(recs)
            obs = "You won." if done else recs[t]["messages"][-1]["content"] if right else "Nothing happens."
            reply = {"obs": obs, "reward": float(done), "done": done, "info": {"won": done, "score": float(done)},
                     "invalid": not right, "valid": None if done else recs[t]["candidates"] if msg.get("valid") else None}
        proto.write(json.dumps(dict(reply, ok=True)) + "\n")
        proto.flush()


if args.replay_worker:
    replay_worker(args.replay_worker)
    sys.exit(0)

import torch  # noqa: E402

import decode  # noqa: E402
import jsonio  # noqa: E402
import lm  # noqa: E402
import sft  # noqa: E402
import steps  # noqa: E402

device, model_dtype = lm.pick_device(args.device)  # also the CUDA attention settings the scripts use
work = args.out or tempfile.mkdtemp(prefix="gpu_check_")
os.makedirs(work, exist_ok=True)
failures = []


def clock():
    """time.time() once the device has finished its queued work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time()


def profiled():
    """A torch.profiler context recording the CPU, and CUDA where the device is one (--profile)."""
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else []))


def finish():
    print(f"gpu_check done: {'all stages ok' if not failures else 'FAILED: ' + ', '.join(failures)} (work folder {work})")
    sys.exit(1 if failures else 0)


def sh(name, argv, env=None):
    """Run a stage; its seconds and stdout, or a failure noted (and the check goes on)."""
    t0 = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.time() - t0
    if proc.returncode:
        failures.append(name)
        print(f"FAIL {name} ({seconds:.0f}s):\n{proc.stderr[-3000:]}")
    else:
        print(f"ok   {name} ({seconds:.0f}s)")
    return seconds, proc.stdout


def build_model(folder, size, tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16) if size == "tiny" else
             dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128))  # Qwen3-0.6B's shape, with SmolLM2's vocabulary
    config = Qwen3Config(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the model and the data

if not os.path.isfile(args.data):
    sys.exit(f"error: --data {args.data}: no such step file (make one with make_data.py, or carry one, and pass --data)")
try:
    tok = lm.load_tokenizer(args.tokenizer or lm.resolve_model(lm.EMBEDDED))
except (OSError, ValueError) as e:
    sys.exit(f"error: no tokenizer ({e}); pass --tokenizer FOLDER")
model_dir = os.path.join(work, f"qwen3_style_{args.size}")
n_params = build_model(model_dir, args.size, tok)
print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), "
      f"Qwen3-style model {n_params / 1e6:.1f}M parameters (random weights) in {model_dir}")
records = steps.read_steps(args.data)
keep = sorted({r["task_id"] for r in records})[:max(args.records, args.steps * args.batch_size // 6 + 1)]
data = os.path.join(work, "steps_train.jsonl")
jsonio.write_jsonl_atomic(data, [r for r in records if r["task_id"] in keep])
few = sorted({r["task_id"] for r in records})[:args.records]
test = os.path.join(work, "replay")  # evaluate.py reads <data>/alfworld_id_test.jsonl and the games' folder layout
jsonio.write_jsonl_atomic(os.path.join(test, "alfworld_id_test.jsonl"),
                         [dict(r, split="id_test") for r in records if r["task_id"] in few])
for tid in few:  # the game files are never opened by the replay worker; evaluate.py only lists them
    game = os.path.join(test, "alfworld_games", *tid.split("/")[1:], "game.tw-pddl")
    os.makedirs(os.path.dirname(game), exist_ok=True)
    open(game, "w").close()

# ----------------------------------------------------------------------------- 1-3: the scripts on the device

stages = set(args.stages.split(","))
common = ["--model", model_dir, "--data", data, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
          "--device", device, "--log-every", str(args.steps)]  # no --share-prefix: slower on a GPU (the step stage)
train_tok_s = {}  # --micro-batch-tokens -> training tokens/s
for i, mbt in enumerate(args.micro_batch_tokens.split(",") if "train" in stages else []):
    out_dir = os.path.join(work, "run" if i == 0 else f"run_mbt{mbt}")  # the first value's run is probed and replayed
    seconds, out = sh(f"train.py --micro-batch-tokens {mbt}",
                      [sys.executable, "train.py", *common, "--micro-batch-tokens", mbt, "--out", out_dir])
    m = re.search(r"([\d.]+) tok/s .*peak RSS ([\d.]+) GB", out)
    if m:
        train_tok_s[mbt] = float(m.group(1))
common += ["--micro-batch-tokens", args.micro_batch_tokens.split(",")[0]]
if "torchrun" in stages:
    sh("torchrun --nproc_per_node 1 train.py", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node", "1", "train.py", *common, "--out", os.path.join(work, "run_torchrun")],
       env={"OMP_NUM_THREADS": "4"})
if "probe" in stages:
    sh("probe.py", [sys.executable, "probe.py", "--model", model_dir, "--checkpoints", os.path.join(work, "run"), "--data",
                    os.path.join(test, "alfworld_id_test.jsonl"), "--max-records", str(args.records), "--device", device,
                    "--dtype", "float32", "--out", os.path.join(work, "probe")])
if "eval" in stages:
    sh("evaluate.py --backend hf", [sys.executable, "evaluate.py", "--model", model_dir, "--adapter", os.path.join(work, "run"),
                                    "--data", test, "--env", "alfworld", "--split", "id_test", "--max-steps", "4",
                                    "--max-thought-tokens", "32", "--num-envs", str(args.records), "--device", device,
                                    "--worker-cmd", f"{sys.executable} {os.path.abspath(__file__)} --replay-worker {data}",
                                    "--out", os.path.join(work, "eval")])

# ----------------------------------------------------------------------------- 4: CUDA fp32 against the CPU


def greedy_and_ll(model, prompts, targets):
    state = decode.encode_prompts(model, prompts, tok.pad_token_id)
    tag = tok(" Action:", add_special_tokens=False)["input_ids"]
    branches = ([{"row": i, "prefix": tag, "max_new": 12, "stop": "never"} for i in range(len(prompts))]
                + [{"row": i, "prefix": tag, "target": t} for i, t in enumerate(targets)])
    out = decode.run_branches(model, tok, state, branches)
    return [o["text"] for o in out[:len(prompts)]], [sum(o["logprobs"]) for o in out[len(prompts):]]


recs = [r for r in records if r["task_id"] in few][:args.records]
prompts = [tok(steps.render_prompt(tok, r["messages"]), add_special_tokens=False)["input_ids"] for r in recs]
targets = [tok(" " + r["action"], add_special_tokens=False)["input_ids"] for r in recs]
if device.startswith("cuda") and "cpu" in stages:
    from transformers import AutoModelForCausalLM
    tiny_dir = os.path.join(work, "qwen3_style_tiny")
    build_model(tiny_dir, "tiny", tok)
    results = {}
    for d in ("cpu", device):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to(d).eval()
        results[d] = greedy_and_ll(model, prompts, targets)
    same_text = results["cpu"][0] == results[device][0]
    d_ll = max(abs(a - b) for a, b in zip(results["cpu"][1], results[device][1]))
    print(f"{'ok  ' if same_text and d_ll < 1e-3 else 'FAIL'} CUDA fp32 vs CPU: greedy texts {'equal' if same_text else 'DIFFER'}, "
          f"max |dLL| {d_ll:.2e} nats over {len(prompts)} records")
    if not (same_text and d_ll < 1e-3):
        failures.append("cuda vs cpu")

# ----------------------------------------------------------------------------- 5: speed

if device.startswith("cuda"):
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))
                 if k in name), None)
    peak_name = f"{name} dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else None
else:
    a = torch.randn(2048, 2048)
    t0, reps = time.time(), 10
    for _ in range(reps):
        a @ a
    peak, peak_name = 2 * 2048 ** 3 * reps / (time.time() - t0), "measured fp32 matmul peak"
if peak is None:  # an unlisted GPU: measure its bf16 matmul instead
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t0, reps = clock(), 20
    for _ in range(reps):
        a @ a
    peak, peak_name = 2 * 8192 ** 3 * reps / (clock() - t0), "measured bf16 matmul peak"
for mbt, tok_s in train_tok_s.items():
    print(f"train.py --micro-batch-tokens {mbt}: {tok_s:.0f} tok/s, MFU {6 * n_params * tok_s / peak:.3f} ({peak_name}; "
          f"6 x parameters x tokens, LoRA r=16, batch {args.batch_size}, the whole run from its first step)")


def train_steps(model, examples, batches, mbt, share):
    """train.py's step (sft.batch_backward, clipping, AdamW) over the given batches; seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    t0 = clock()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        sft.batch_backward(model, examples, batch, sft.supervised_tokens(examples, batch), tok.pad_token_id, mbt, share)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return (clock() - t0) / len(batches)


if "step" in stages:  # warm training steps in this process, without train.py's start-up, first step and saving
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    examples = []
    for rec in steps.read_steps(data):
        ids, labels, kinds = lm.encode_step(tok, rec)
        examples.append({"ids": ids, "labels": labels, "kinds": kinds, "episode": rec["task_id"]})
    batches = [list(range(i, i + args.batch_size)) for i in range(0, len(examples) - args.batch_size + 1, args.batch_size)]
    batch_tokens = sum(len(examples[i]["ids"]) for b in batches for i in b) / len(batches)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model_dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    for mbt in map(int, args.micro_batch_tokens.split(",")):
        for share in (True, False):
            train_steps(model, examples, batches[:2], mbt, share)  # warm-up: kernels, allocator
            seconds = train_steps(model, examples, batches[2:2 + args.steps] or batches[-1:], mbt, share)
            print(f"warm training step, micro-batch tokens {mbt:5d}, share-prefix {'on ' if share else 'off'}: "
                  f"{seconds * 1e3:7.1f} ms, {batch_tokens / seconds:8.0f} tok/s "
                  f"(batch {args.batch_size}, {batch_tokens:.0f} tokens, LoRA r=16 on all linear layers)")
    if args.profile:
        mbt = int(args.micro_batch_tokens.split(",")[0])
        with profiled() as prof:
            train_steps(model, examples, batches[-1:], mbt, True)
        print(f"profile of one warm training step (micro-batch tokens {mbt}, share-prefix on):")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
        if device.startswith("cuda"):
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50))
    del model
if "speed" not in stages:
    finish()
from transformers import AutoModelForCausalLM  # noqa: E402
if device.startswith("cuda"):  # the fixed cost of one kernel launch bounds any launch-bound loop (decode at batch 1)
    x = torch.zeros(16, device=device)
    for reps in (100, 2000):
        t0 = clock()
        for _ in range(reps):
            x.add_(1)
        seconds = clock() - t0
    print(f"kernel launch: {seconds / reps * 1e6:.1f} us each (tiny add_, {reps} in a row)")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model_dtype).to(device).eval()
ids = torch.tensor([prompts[0]], device=device)
for reps in range(2):  # the baseline: transformers' own greedy generate at batch 1, a warm-up first
    t0 = clock()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                   pad_token_id=tok.pad_token_id)
    seconds = clock() - t0
print(f"baseline: transformers generate, batch  1: {64 / seconds:8.1f} tok/s")
thought = tok(" Thought:", add_special_tokens=False)["input_ids"]
for batch in (1, 8, 32):
    rows = (prompts * batch)[:batch]
    state = decode.encode_prompts(model, rows, tok.pad_token_id)
    branches = [{"row": i, "prefix": thought, "max_new": 64, "stop": "never"} for i in range(batch)]
    t0 = clock()
    decode.run_branches(model, tok, state, branches, max_rows=batch)
    print(f"decode batch {batch:2d}: {batch * 64 / (clock() - t0):8.1f} tok/s ({model_dtype}, prompts of ~{len(rows[0])} tokens)")
if args.profile:
    for name in ("decode.run_branches", "transformers generate"):
        state = decode.encode_prompts(model, prompts[:1], tok.pad_token_id)
        with profiled() as prof:
            if name == "decode.run_branches":
                decode.run_branches(model, tok, state, [{"row": 0, "prefix": thought, "max_new": 16, "stop": "never"}])
            else:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=tok.pad_token_id)
        print(f"profile of 16 greedy tokens at batch 1, {name}:")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=50))
finish()
