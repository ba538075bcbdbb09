"""cost_model.py: what the paper's whole study would cost with this toolkit, stage by stage, on 1 and on N GPUs.

An estimate from measured rates, not a measurement: every rate below defaults to a figure measured on one
NVIDIA H200 with bench/gpu_check.py on a random-weight 0.49B Qwen3-shaped model (bench/README.md, "On a
GPU", 2026-11-26), and is scaled to each model size by its parameter count:
  - training: train.py tokens/s (LoRA r16, bf16), 14,152 tok/s at 0.49B; time scales with params x tokens,
    i.e. the measured MFU (0.04, launch-bound) is kept: an upper bound, as larger models fill the GPU better;
  - decoding: 1,151 generated tok/s at batch 32 (KV-cached, bf16); memory-bound, so time scales with params;
  - prefill (prompts, scored continuations): not measured alone; taken as 3x the training rate (a forward
    pass is a third of a training step's FLOPs, in the same launch-bound regime): an assumption;
  - N GPUs: data-parallel training (train.py under torchrun), probes and rollouts (probe.py and evaluate.py
    under torchrun) divide each stage by N; the scaling itself is not measured.
Workload defaults: the paper's setup as PAPER.md reports it (SFT 5 epochs; Qwen3 4B/8B/14B and Llama-3.1-8B;
k in {0, 0.1, 0.3, 0.5, 0.7}) and this toolkit's probe and rollout shapes; every size is a flag, so a user
reruns it with their own.

    python bench/cost_model.py
    python bench/cost_model.py --params 8 --seeds 3 --gpus 8 --train-tok-s 20000 --train-params 0.49
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# measured rates (one H200, bench/README.md) and the model size they were measured on
parser.add_argument("--device-name", default="NVIDIA H200", help="the GPU the rates were measured on")
parser.add_argument("--train-tok-s", type=float, default=14152.0, help="train.py tokens/s measured at --train-params")
parser.add_argument("--decode-tok-s", type=float, default=1151.0, help="generated tokens/s at batch 32, measured at --train-params")
parser.add_argument("--prefill-factor", type=float, default=3.0, help="prefill tokens/s as a multiple of the training rate (assumed)")
parser.add_argument("--train-params", type=float, default=0.49, help="parameters (billions) of the model the rates were measured on")
# the study
parser.add_argument("--params", default="4,8,14,8", help="comma list of model sizes in billions (Qwen3 4B/8B/14B, Llama-3.1-8B)")
parser.add_argument("--ks", type=int, default=5, help="k values trained per model (0, 0.1, 0.3, 0.5, 0.7)")
parser.add_argument("--seeds", type=int, default=1, help="training seeds per k")
parser.add_argument("--train-examples", type=int, default=60000, help="agent steps trained on (ALFWorld, ScienceWorld and BFCL sets)")
parser.add_argument("--tokens-per-example", type=int, default=800, help="prompt + response tokens per step")
parser.add_argument("--epochs", type=float, default=5.0, help="SFT epochs")
parser.add_argument("--checkpoints", type=int, default=10, help="checkpoints probed per run")
parser.add_argument("--probe-records", type=int, default=1000, help="steps probed per checkpoint (in- and out-of-domain, all envs)")
parser.add_argument("--prompt-tokens", type=int, default=800, help="tokens of a probed step's prompt")
parser.add_argument("--probe-generated", type=int, default=230, help="greedy tokens per probed step (prompt and CoT actions, truncations)")
parser.add_argument("--probe-scored", type=int, default=360, help="scored tokens per probed step (log-likelihood branches)")
parser.add_argument("--conflicts", type=int, default=2, help="conflict probes per step (a trace of ~100 tokens + a 20-token action)")
parser.add_argument("--rollout-checkpoints", type=int, default=10, help="checkpoints rolled out per run (the paper's curve is per checkpoint)")
parser.add_argument("--episodes", type=int, default=1000, help="test episodes per mode and checkpoint (ALFWorld 274, ScienceWorld, BFCL)")
parser.add_argument("--steps-per-episode", type=float, default=15.0, help="agent steps per episode")
parser.add_argument("--generated-per-step", type=float, default=70.0, help="generated tokens per step, the two modes' mean")
parser.add_argument("--new-prompt-per-step", type=float, default=150.0, help="new prompt tokens per step (the rest is a reused KV cache)")
parser.add_argument("--gpus", type=int, default=8, help="GPUs of the multi-GPU column")
args = parser.parse_args()


def hours(tokens, rate_at_measured, params):
    """Hours to process `tokens` at a rate measured on --train-params, scaled to a model of `params` billion."""
    return tokens / (rate_at_measured * args.train_params / params) / 3600


rows = []
for p in [float(x) for x in args.params.split(",")]:
    runs = args.ks * args.seeds
    prefill = args.train_tok_s * args.prefill_factor
    train = runs * hours(args.train_examples * args.tokens_per_example * args.epochs, args.train_tok_s, p)
    per_record_prefill = args.prompt_tokens + args.probe_scored + args.conflicts * 100
    per_record_decode = args.probe_generated + args.conflicts * 20
    n = runs * args.checkpoints * args.probe_records
    probe = hours(n * per_record_prefill, prefill, p) + hours(n * per_record_decode, args.decode_tok_s, p)
    steps_ = runs * args.rollout_checkpoints * 2 * args.episodes * args.steps_per_episode
    rollout = hours(steps_ * args.new_prompt_per_step, prefill, p) + hours(steps_ * args.generated_per_step, args.decode_tok_s, p)
    rows.append((f"{p:g}B", {"train": train, "probe": probe, "rollouts": rollout}))

print(f"Estimated from rates measured on one {args.device_name} at {args.train_params:g}B parameters "
      f"(train {args.train_tok_s:.0f} tok/s, decode {args.decode_tok_s:.0f} tok/s at batch 32, prefill "
      f"{args.prefill_factor:g}x train, assumed), scaled by parameter count; {args.ks} k x {args.seeds} seed(s) per model.\n")
print(f"| model | stage | 1 GPU (h) | {args.gpus} GPUs (h) |")
print("|---|---|---|---|")
total = {}
for model, stages in rows:
    for stage, h in stages.items():
        print(f"| {model} | {stage} | {h:,.1f} | {h / args.gpus:,.1f} |")
        total[stage] = total.get(stage, 0.0) + h
all_h = sum(total.values())
print(f"| all | all | {all_h:,.1f} | {all_h / args.gpus:,.1f} |")
top = max(total, key=total.get)
print(f"\ncost_model done: {all_h:,.0f} GPU-hours in all ({all_h / args.gpus / 24:,.1f} days on {args.gpus} GPUs); "
      f"the largest stage is {top} ({total[top] / all_h:.0%})")
