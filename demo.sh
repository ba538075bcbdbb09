#!/usr/bin/env bash
# The whole study, small, on the embedded SmolLM2-135M-Instruct: data -> train k=0 and k=0.3 -> probe,
# conflicts, rollouts -> tables and figures in results/demo/report/. 18 minutes on 2 CPU cores from a fresh
# clone (2026-11-26, model conversion included: data 0.6, training 5.7, probes 8.1, rollouts 4.4 min).
# Every stage resumes, so a rerun after a kill continues; SEED=1 bash demo.sh gives another seed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
SEED=${SEED:-0}
DATA=${DATA:-data/demo}
OUT=${OUT:-results/demo}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
stage() { printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

stage "1/5 data: expert trajectories of ALFWorld, ScienceWorld (find-* tasks), BFCL and multi-turn BFCL -> $DATA"
if [ ! -f "$DATA/meta.json" ]; then
  $PY make_data.py --env all --seed "$SEED" --out "$DATA" --alfworld-train-per-type 6 --alfworld-test-per-type 2 \
    --sciworld-tasks find-living-thing,find-non-living-thing,find-plant,find-animal --bfcl-train 60 --bfcl-test 6 \
    --bfcl-mt-train 6 --bfcl-mt-test 1 --jobs "$THREADS"
fi

for K in 0.0 0.3; do
  stage "2/5 train: LoRA SFT of SmolLM2-135M with --mask-action-frac $K -> $OUT/runs/k${K}_seed$SEED"
  RUN="$OUT/runs/k${K}_seed$SEED"
  if [ ! -f "$RUN/done" ]; then
    $PY train.py --data "$DATA/*_train.jsonl" --mask-action-frac "$K" --seed "$SEED" --max-examples 48 --epochs 1 \
      --batch-size 4 --lr 5e-4 --save-every 8 --log-every 4 --threads "$THREADS" --out "$RUN" \
      $( [ -d "$RUN" ] && echo --resume )
    touch "$RUN/done"
  fi
done

stage "3/5 conflicts: a valid different action a2 and a trace arguing for it, per test step"
$PY make_conflicts.py --data "$DATA/*_id_test.jsonl" "$DATA/*_ood_test.jsonl" --pool "$DATA/*_train.jsonl" \
  --max-per-split 2 --seed "$SEED" --out "$OUT/conflicts.jsonl"

# The conflict probe (follow the trace's a2, or anchor on the prompt's a1?) runs in the step probe's pass.
stage "4/5 probe and conflict probe: prompt action vs CoT action at every checkpoint (base = step 0)"
$PY probe.py --data "$DATA/*_id_test.jsonl" "$DATA/*_ood_test.jsonl" --max-records 1 --attribution-samples 1 \
  --max-thought-tokens 64 --seed "$SEED" --threads "$THREADS" --conflicts "$OUT/conflicts.jsonl" \
  --conflicts-out "$OUT/conflicts/base" --out "$OUT/probe/base"
for K in 0.0 0.3; do
  $PY probe.py --no-base --checkpoints "$OUT/runs/k${K}_seed$SEED" --data "$DATA/*_id_test.jsonl" "$DATA/*_ood_test.jsonl" \
    --max-records 1 --attribution-samples 1 --max-thought-tokens 64 --seed "$SEED" --threads "$THREADS" \
    --conflicts "$OUT/conflicts.jsonl" --conflicts-out "$OUT/conflicts/k${K}_seed$SEED" --out "$OUT/probe/k${K}_seed$SEED"
done

stage "5/5 rollouts: prompt mode and CoT mode, in-domain and out-of-domain, 8 environments in lockstep"
for K in 0.0 0.3; do
  $PY evaluate.py --adapter "$OUT/runs/k${K}_seed$SEED" --data "$DATA" --env all --mode both --max-episodes 1 \
    --max-steps 6 --max-thought-tokens 64 --num-envs 8 --seed "$SEED" --threads "$THREADS" --out "$OUT/eval/k${K}_seed$SEED"
done

stage "report: tables and figures"
$PY report.py --results "$OUT"
stage "demo done: results in $OUT/report (results.md, *.png, *.csv)"
