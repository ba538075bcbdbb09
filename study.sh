#!/usr/bin/env bash
# The study on the embedded SmolLM2-135M-Instruct (README, Results), one agent per environment (ENV): data
# with an expert -> the expert and random policies, the base model's probes -> for each training seed, for k=0
# and then k=0.3 (same data): LoRA SFT, rollouts of the last checkpoint (both modes, in-domain and
# out-of-domain), probe and conflict probe (one pass) on the same steps -> report (<out>/report/).
#
# Configurations (every size can be overridden by its variable; the choice of sizes is in the README):
#   ENV=alfworld, generated games (default, `make study`): one seed, sized for 2 hours on 2 CPU cores; k=0's
#     4 checkpoints are probed (PROBE_LAST=1: k=0.3's last one too, about 8 min).
#   ENV=alfworld, real games (ALFWORLD_DATA=DIR, a folder holding json_2.1.1/train and json_2.1.1/valid_seen):
#     train episodes from the train games, in-domain test from valid_seen's in-domain types, out-of-domain
#     from the held-out types (valid_seen first); SEEDS="0 1 2". Every run's last checkpoint is probed; the
#     first seed's runs also at the dense early grid SAVE_STEPS (the curves move before step 33 of 130).
#     About 6.5 h on 2 cores (measured).
#   ENV=scienceworld: 2 train variations per in-domain task, 3 test variations per task (gold path up to 60 steps);
#     out of domain the last task of each topic; SEEDS="0 1 2"; the base model rolled out too (ONLINE_BASE).
#   ENV=bfcl_mt: multi-turn BFCL, in domain multi_turn_base, out of domain multi_turn_long_context (the paper's
#     BFCL setting); 48 train entries, every test entry; SEEDS="0 1 2"; the base model rolled out too.
#   ENV=bfcl: single-turn BFCL, in domain simple/multiple/parallel/parallel_multiple, out of domain the
#     live_* categories; SEEDS="0 1 2". One step per item, so online is cheap: the first seed's runs (and the
#     base model) are rolled out at every checkpoint (ONLINE_ALL), the paper's "stays flat" measured online.
# A run is finished before the next one starts, so a study cut short still has whole runs. Every stage
# resumes: rerunning the same command after a kill continues where it stopped. Each stage's wall time and
# peak RSS go to $OUT/stages.tsv. The report, the stage times and what made each number are copied to
# studies/<basename of OUT>/ (STUDY_DIR), the folder git tracks.
#   bash study.sh                                          (what `make study` runs)
#   ALFWORLD_DATA=~/alfworld_data bash study.sh            (the real-games study, 3 seeds)
#   ENV=scienceworld bash study.sh                         (make study-real ENVS=scienceworld)
#   ENV=bfcl bash study.sh                                 (make study-real ENVS=bfcl)
#   ENV=bfcl_mt bash study.sh                              (make study-real ENVS=bfcl_mt)
#   SEED=1 OUT=results/study_seed1 bash study.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
ENV=${ENV:-alfworld}
SEED=${SEED:-0}                     # data seed: which games / items, the expert's search, probe steps, conflicts
ALFWORLD_DATA=${ALFWORLD_DATA:-}
THREADS=${THREADS:-2}
KS=${KS:-"0.0 0.3"}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-8}
TRAIN_ARGS=${TRAIN_ARGS:-"--lr 1e-3 --lora-r 16 --lora-alpha 32 --share-prefix"}
STEP_FACTOR=${STEP_FACTOR:-2}       # a rollout may take 2x the expert's steps
NUM_ENVS=${NUM_ENVS:-32}            # rollouts decoded together
RECORDS=${RECORDS:-100}             # probe and conflict records per split
ONLINE_ALL=${ONLINE_ALL:-}          # the first seed's runs rolled out at every checkpoint (and the base model)
ONLINE_BASE=${ONLINE_BASE:-}        # 1: the base model rolled out (always with ONLINE_ALL)
MODEL=${MODEL:-smollm2-135m}        # the base model of every stage: the embedded default, a hub id or a local folder
case $ENV in
  alfworld)
    EPISODES=${EPISODES:-64}        # rollouts per split, mode and run (at most)
    if [ -n "$ALFWORLD_DATA" ]; then
      [ -d "$ALFWORLD_DATA" ] || { echo "error: ALFWORLD_DATA=$ALFWORLD_DATA is not a folder" >&2; exit 2; }
      DATA=${DATA:-data/study_real}
      OUT=${OUT:-results/study_real}
      DATA_ARGS=(--alfworld-data "$ALFWORLD_DATA" --alfworld-train-per-type "${TRAIN_PER_TYPE:-40}" --alfworld-test-per-type 16)
      SAVE_STEPS=${SAVE_STEPS:-8,16,33,66}
    else
      DATA=${DATA:-data/study}
      OUT=${OUT:-results/study}
      SEEDS=${SEEDS:-$SEED}
      DATA_ARGS=(--alfworld-train-per-type 40 --alfworld-test-per-type 16)
      SAVE_STEPS=${SAVE_STEPS:-}    # empty: 4 evenly spaced checkpoints
      PROBE_ALL=${PROBE_ALL:-0.0}
      PROBE_LAST=${PROBE_LAST:-0}   # 1: also probe the last checkpoint of the other runs
    fi
    DATA_ARGS+=(--alfworld-search 2 --jobs "$THREADS")
    EXPERT_ENVS=4
    LIMITS_PROBE="--max-thought-tokens 80"  # tokens generated: reasoning + action (an action line: the scripts' default)
    LIMITS_EVAL="--max-thought-tokens 96";;
  bfcl)
    EPISODES=${EPISODES:-190}       # items rolled out per split: every in-domain test item, as many out of domain
    DATA=${DATA:-data/study_bfcl}
    OUT=${OUT:-results/study_bfcl}
    DATA_ARGS=(--bfcl-train "${TRAIN_ITEMS:-400}" --bfcl-test "${TEST_ITEMS:-400}")  # 1 epoch: 50 steps
    SAVE_STEPS=${SAVE_STEPS:-10,25}
    ONLINE_ALL=${ONLINE_ALL:-"0.0 0.3"}
    EXPERT_ENVS=1
    # A call list runs long (the study's train actions: median 31 tokens, 95th percentile 105, longest 195;
    # thoughts up to 130 out of domain; bench/token_lengths.py): every action can finish, in both modes alike.
    LIMITS_PROBE="--max-action-tokens 192 --max-thought-tokens 288"
    LIMITS_EVAL=$LIMITS_PROBE;;
  scienceworld)
    # Sizes and why: studies/study_sciworld/README.md. Online the measure is the score (partial credit), success beside it.
    EPISODES=${EPISODES:-64}        # episodes per split and mode (at most; 3 per task gave 50 in domain, 21 out)
    DATA=${DATA:-data/study_sciworld}
    OUT=${OUT:-results/study_sciworld}
    DATA_ARGS=(--sciworld-train-per-task "${TRAIN_PER_TASK:-2}" --sciworld-test-per-task "${TEST_PER_TASK:-3}"
               --sciworld-tasks "${SCIWORLD_TASKS:-all}")
    SAVE_STEPS=${SAVE_STEPS:-10,30}  # and the last (about 85 steps)
    ONLINE_BASE=${ONLINE_BASE:-1}   # the base model online too: where "both rise" starts, on score
    EXPERT_ENVS=4
    # Train actions run to 15 tokens, thoughts to 57 (bench/token_lengths.py): the ALFWorld limits hold.
    LIMITS_PROBE="--max-thought-tokens 80"
    LIMITS_EVAL="--max-thought-tokens 96";;
  bfcl_mt)
    # Sizes and why: studies/study_bfcl_mt/README.md. Online the measure is the share of turns passed.
    EPISODES=${EPISODES:-64}        # entries per split and mode (at most; all 46 in domain, all 48 out)
    DATA=${DATA:-data/study_bfcl_mt}
    OUT=${OUT:-results/study_bfcl_mt}
    DATA_ARGS=(--bfcl-mt-train "${TRAIN_ITEMS:-48}" --bfcl-mt-test 0)  # about 445 steps: 56 optimizer steps
    SAVE_STEPS=${SAVE_STEPS:-10,25}
    ONLINE_BASE=${ONLINE_BASE:-1}
    EXPERT_ENVS=1
    # All the base and long-context entries' actions: median 11 tokens, longest 89 in domain (one of 1,165 out of
    # domain); thoughts up to 116 (bench/token_lengths.py).
    LIMITS_PROBE="--max-action-tokens 96 --max-thought-tokens 224"
    LIMITS_EVAL=$LIMITS_PROBE;;
  *) echo "error: ENV=$ENV: expected alfworld, scienceworld, bfcl or bfcl_mt" >&2; exit 2;;
esac
# Every study but the generated-games one (which sets its own above):
SEEDS=${SEEDS:-"0 1 2"}             # training seeds: LoRA init, masking draw, batch order (same data)
PROBE_ALL=${PROBE_ALL:-"0.0 0.3"}   # the first seed's runs whose every checkpoint is probed
PROBE_LAST=${PROBE_LAST:-1}         # 1: also probe the last checkpoint of the other runs
mkdir -p "$OUT"
stage() { printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# timed NAME CMD...: run CMD, append "NAME seconds peak_rss_kb" to stages.tsv (a resumed stage adds a line)
timed() { local name=$1; shift; /usr/bin/time -f "$name	%e	%M" -a -o "$OUT/stages.tsv" "$@"; }

T="$DATA/$ENV"  # the step files: ${T}_train.jsonl, ${T}_id_test.jsonl, ${T}_ood_test.jsonl
stage "1/7 data: $ENV episodes and expert steps -> $DATA"
if [ ! -f "$DATA/meta.json" ]; then
  timed data $PY make_data.py --env "$ENV" --seed "$SEED" --out "$DATA" "${DATA_ARGS[@]}"
fi
N=$(wc -l < "${T}_train.jsonl")
STEPS=$(( (N + BATCH - 1) / BATCH * EPOCHS ))
SAVE=$(( (STEPS + 3) / 4 ))  # 4 checkpoints per run unless SAVE_STEPS lists them
SAVE_ARGS=(--save-every "$SAVE")
[ -z "$SAVE_STEPS" ] || SAVE_ARGS=(--save-steps "$SAVE_STEPS")
EVAL_ARGS=(--data "$DATA" --env "$ENV" --max-episodes "$EPISODES" --max-steps-factor "$STEP_FACTOR" --seed "$SEED")

stage "2/7 expert and random policies (the ceiling and the floor) on the same episodes"
for POLICY in expert random; do
  timed "eval_$POLICY" $PY evaluate.py --policy "$POLICY" "${EVAL_ARGS[@]}" --num-envs "$EXPERT_ENVS" --out "$OUT/eval/$POLICY"
done

stage "3/7 conflicts: a valid different action a2 and a trace for it, on the probe's steps"
[ -f "$OUT/conflicts.jsonl" ] || timed conflicts $PY make_conflicts.py --data "${T}_id_test.jsonl" "${T}_ood_test.jsonl" \
  --pool "${T}_train.jsonl" --max-per-split "$RECORDS" --seed "$SEED" --out "$OUT/conflicts.jsonl"
# conflicts_args NAME: the conflict probe's flags, none where the environment has no valid-action lists (BFCL)
conflicts_args() { [ ! -s "$OUT/conflicts.jsonl" ] || echo "--conflicts $OUT/conflicts.jsonl --conflicts-out $OUT/conflicts/$1"; }

# The probe measures what the paper's claims are about (actions, log-likelihoods, consistency, revisions,
# attention and gradient shares). For time it skips rank-1 among all valid actions (--no-candidates) and
# keeps 3 points of the truncation curve; probe.py's defaults measure both in full.
PROBE_ARGS="--model $MODEL --max-records $RECORDS --attribution-samples 16 $LIMITS_PROBE --no-candidates --trunc-fracs 0,0.5,1 \
--batch-size 16 --max-rows 64 --seed $SEED --threads $THREADS"
# Each probe stage runs the conflict probe in the same pass: a conflict shares its step's prompt pass.
stage "4/7 probe and conflict probe of the base model on $RECORDS in-domain + $RECORDS out-of-domain steps"
# shellcheck disable=SC2086,SC2046
timed probe_base $PY probe.py --data "${T}_id_test.jsonl" "${T}_ood_test.jsonl" $PROBE_ARGS $(conflicts_args base) \
  --out "$OUT/probe/base"
# shellcheck disable=SC2206  # LIMITS_EVAL is a word list on purpose
ROLLOUT_ARGS=(--model "$MODEL" --mode both --no-log-both $LIMITS_EVAL --num-envs "$NUM_ENVS" --max-rows "$NUM_ENVS" --threads "$THREADS")
if [ -n "$ONLINE_ALL$ONLINE_BASE" ]; then  # the base model online: where "both rise" starts
  timed eval_base $PY evaluate.py "${EVAL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" --out "$OUT/eval/base"
fi

FIRST_SEED=${SEEDS%% *}
for S in $SEEDS; do
  for K in $KS; do
    NAME="k${K}_seed$S"
    RUN="$OUT/runs/$NAME"
    stage "5/7 train $NAME: LoRA SFT, $N steps x $EPOCHS epochs = $STEPS optimizer steps, checkpoints ${SAVE_STEPS:-every $SAVE} -> $RUN"
    if [ ! -f "$RUN/done" ]; then
      # shellcheck disable=SC2086  # TRAIN_ARGS is a word list on purpose
      timed "train_$NAME" $PY train.py --model "$MODEL" --data "${T}_train.jsonl" --mask-action-frac "$K" --seed "$S" \
        --epochs "$EPOCHS" --batch-size "$BATCH" "${SAVE_ARGS[@]}" --log-every 10 --threads "$THREADS" $TRAIN_ARGS \
        --out "$RUN" $( [ -d "$RUN" ] && echo --resume )
      touch "$RUN/done"
    fi
    FIRST=0
    [ "$S" != "$FIRST_SEED" ] || FIRST=1
    # The first seed's ONLINE_ALL runs are rolled out at every checkpoint (CoT minus prompt across training);
    # the others at their last.
    ALL=() WHICH="last checkpoint"
    [ "$FIRST" = 0 ] || [[ " $ONLINE_ALL " != *" $K "* ]] || { ALL=(--all-checkpoints); WHICH="every checkpoint"; }
    stage "6/7 $NAME: rollouts of the $WHICH (up to $EPISODES in-domain and out-of-domain episodes per mode; 0 = all), probes"
    timed "eval_$NAME" $PY evaluate.py --adapter "$RUN" "${ALL[@]}" "${EVAL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" \
      --out "$OUT/eval/$NAME"
    # The training dynamics come from the first seed's PROBE_ALL runs (every checkpoint); the other runs
    # are compared by their last checkpoint (PROBE_LAST=1) and online.
    if [ "$FIRST" = 1 ] && [[ " $PROBE_ALL " == *" $K "* ]]; then
      CKPTS=$RUN
    elif [ "$PROBE_LAST" = 1 ]; then
      CKPTS=$(ls -d "$RUN"/checkpoint-* | sort -V | tail -1)  # by step, zero-padded (train.py) or not
    else
      continue
    fi
    # shellcheck disable=SC2086,SC2046
    timed "probe_$NAME" $PY probe.py --no-base --checkpoints "$CKPTS" --data "${T}_id_test.jsonl" "${T}_ood_test.jsonl" \
      $PROBE_ARGS $(conflicts_args "$NAME") --out "$OUT/probe/$NAME"
  done
done

stage "7/7 report: tables and figures"
timed report $PY report.py --results "$OUT"
# The report is small (tables, the CSV behind each, figures, made_from.json): it goes where git tracks it, so a
# reader can check every number the README quotes without rerunning the study; raw records and runs stay in $OUT.
STUDY_DIR=${STUDY_DIR:-studies/$(basename "$OUT")}
mkdir -p "$STUDY_DIR"
cp "$OUT"/report/results.md "$OUT"/report/*.csv "$OUT"/report/*.png "$OUT"/report/made_from.json "$OUT"/stages.tsv "$STUDY_DIR"/
git describe --always --dirty > "$STUDY_DIR/commit.txt" 2>/dev/null || echo "not a git checkout" > "$STUDY_DIR/commit.txt"
stage "study done: results in $OUT/report, copied to $STUDY_DIR (commit it); stage times in $OUT/stages.tsv"
