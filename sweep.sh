#!/usr/bin/env bash
# Sweep --mask-action-frac over seeds: train, probe every checkpoint, roll out the last one, then one report.
# Resumable: a finished stage leaves a marker (train) or its records (probe/evaluate skip ids already
# written), so rerunning the same command continues where it stopped. Override any knob by environment:
#   KS="0 0.3" SEEDS="0" DATA=data/generated OUT=results/sweep bash sweep.sh
#   TRAIN_ARGS="--model Qwen/Qwen2.5-0.5B-Instruct --epochs 3" EVAL_ARGS="--num-envs 32" bash sweep.sh  (GPU)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
KS=${KS:-"0 0.1 0.3 0.5 0.7"}
SEEDS=${SEEDS:-"0 1 2"}
DATA=${DATA:-data/generated}
OUT=${OUT:-results/sweep}
MODEL=${MODEL:-smollm2-135m}
TRAIN_ARGS=${TRAIN_ARGS:-"--epochs 2 --save-every 20"}
PROBE_ARGS=${PROBE_ARGS:-"--max-records 50"}
EVAL_ARGS=${EVAL_ARGS:-"--num-envs 8"}

[ -f "$DATA/meta.json" ] || { echo "no step data in $DATA: run 'make data' (or set DATA)" >&2; exit 1; }
# shellcheck disable=SC2086  # *_ARGS are word lists on purpose
$PY probe.py --model "$MODEL" --data "$DATA/*_id_test.jsonl" "$DATA/*_ood_test.jsonl" $PROBE_ARGS --out "$OUT/probe/base"
[ -f "$OUT/conflicts.jsonl" ] || $PY make_conflicts.py --data "$DATA/*_id_test.jsonl" "$DATA/*_ood_test.jsonl" \
  --pool "$DATA/*_train.jsonl" --max-per-split 50 --out "$OUT/conflicts.jsonl"
$PY probe.py --model "$MODEL" --conflicts "$OUT/conflicts.jsonl" --out "$OUT/conflicts/base"
for SEED in $SEEDS; do
  for K in $KS; do
    RUN="$OUT/runs/k${K}_seed$SEED"
    echo "== k=$K seed=$SEED -> $RUN"
    if [ ! -f "$RUN/done" ]; then
      $PY train.py --model "$MODEL" --data "$DATA/*_train.jsonl" --mask-action-frac "$K" --seed "$SEED" $TRAIN_ARGS \
        --out "$RUN" $( [ -d "$RUN" ] && echo --resume )
      touch "$RUN/done"
    fi
    $PY probe.py --model "$MODEL" --no-base --checkpoints "$RUN" --data "$DATA/*_id_test.jsonl" "$DATA/*_ood_test.jsonl" \
      $PROBE_ARGS --out "$OUT/probe/k${K}_seed$SEED"
    $PY probe.py --model "$MODEL" --no-base --checkpoints "$RUN" --conflicts "$OUT/conflicts.jsonl" \
      --out "$OUT/conflicts/k${K}_seed$SEED"
    $PY evaluate.py --model "$MODEL" --adapter "$RUN" --data "$DATA" --env all --mode both $EVAL_ARGS \
      --out "$OUT/eval/k${K}_seed$SEED"
  done
done
$PY report.py --results "$OUT"
