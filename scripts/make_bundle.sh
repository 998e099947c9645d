#!/usr/bin/env bash
# Build the embedded default bundle with the project's own pipeline:
#   synthetic data → federated training (or per-site training) → calibration → export → verify → copy.
#
# Usage: scripts/make_bundle.sh            (or `make bundle`)
# Knobs (environment): WORK (runs/default_bundle), SITES, PER_SITE, SIZE, SITE (the bundle's site),
#   CONFIG (model preset: small), EPOCHS_* (per-job epoch overrides; empty = the preset's),
#   ROUNDS / LOCAL_EPOCHS / MAX_TRAIN / FED_TIMEOUT / FED_ARGS (federated training, `medfedpure fed sim`),
#   ROUNDS_PUR / LOCAL_EPOCHS_PUR / MAX_TRAIN_PUR (a separate federation budget for teacher + student),
#   STEPS (student K), THREADS, TRAINING (auto | fed | sites), DEST (sdk/medfedpure/bundles/default),
#   REUSE_RUN=1 (skip training when the run folder already holds the models).
# Everything is logged to $WORK/make_bundle.log; step timings and the export's verification report go
# to $WORK/bundle_metrics.json. Fails (non-zero) if any step fails or the bundle exceeds 25 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

MF=${MF:-.venv/bin/medfedpure}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/default_bundle}
SITES=${SITES:-2}
PER_SITE=${PER_SITE:-600}
SIZE=${SIZE:-128}
SITE=${SITE:-1}                  # the bundle's site (benchmarks/RESULTS.md: why 1)
CONFIG=${CONFIG:-small}
SEED=${SEED:-0}
STEPS=${STEPS:-1}
T_MIN=${T_MIN:-60}                    # purification range t* ∈ [T_MIN, T_MAX] (of T = 1000) when the
T_MAX=${T_MAX:-200}                   # student checkpoint does not name one
THREADS=${THREADS:-2}
TRAINING=${TRAINING:-auto}
EPOCHS_CLS=${EPOCHS_CLS:-}
EPOCHS_MAE=${EPOCHS_MAE:-}
EPOCHS_PUR=${EPOCHS_PUR:-}
EPOCHS_DIS=${EPOCHS_DIS:-}
ROUNDS=${ROUNDS:-30}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-2}
MAX_TRAIN=${MAX_TRAIN:-0}
FED_TIMEOUT=${FED_TIMEOUT:-5400}
FED_ARGS=${FED_ARGS:-}
ROUNDS_PUR=${ROUNDS_PUR:-10}          # set: train the purifier in a second federation with these budgets
LOCAL_EPOCHS_PUR=${LOCAL_EPOCHS_PUR:-2}
MAX_TRAIN_PUR=${MAX_TRAIN_PUR:-0}
PURIFIER_PHASES=${PURIFIER_PHASES:-teacher,student}   # "teacher": skip distillation (student := teacher)
DEST=${DEST:-sdk/medfedpure/bundles/default}
MAX_BYTES=$((25 * 1024 * 1024))

export ORT_DISABLE_TELEMETRY=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

mkdir -p "$WORK"
LOG="$WORK/make_bundle.log"
TIMES="$WORK/step_times.tsv"
[ "${REUSE_RUN:-0}" = 1 ] || : > "$TIMES"   # a resumed run keeps the timings of the steps it reuses
exec > >(tee -a "$LOG") 2>&1
echo "== make_bundle $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
echo "   sites=$SITES per_site=$PER_SITE size=$SIZE config=$CONFIG steps=$STEPS site=$SITE training=$TRAINING"

step() {  # step NAME CMD... : run, time and log one pipeline step
  local name=$1; shift
  echo "== [$name] $*"
  local t0; t0=$(date +%s)
  "$@"
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\n' "$name" "$dt" >> "$TIMES"
  echo "== [$name] done in ${dt}s"
}

ep() { [ -n "$1" ] && echo "--epochs $1" || true; }

DATA="$WORK/data"
RUN="$WORK/run"
if [ ! -f "$DATA/dataset.json" ]; then
  step data "$MF" data synth --out "$DATA" --sites "$SITES" --per-site "$PER_SITE" --size "$SIZE" --seed "$SEED"
else
  # Reuse existing data only if it is what this invocation asks for.
  "$PY" - "$DATA/dataset.json" "$SITES" "$PER_SITE" "$SIZE" "$SEED" <<'EOF_PY'
import json, sys
c = json.load(open(sys.argv[1]))["config"]
want = dict(zip(("sites", "per_site", "size", "seed"), map(int, sys.argv[2:6])))
have = {k: c.get(k) for k in want}
if have != want:
    sys.exit(f"!! {sys.argv[1]} was made with {have}, this run asks for {want}: remove that folder or set WORK")
print(f"== reusing data {sys.argv[1]} ({have})")
EOF_PY
fi

if [ "$TRAINING" = auto ]; then
  if "$MF" fed sim --help > /dev/null 2>&1; then TRAINING=fed; else TRAINING=sites; fi
fi
echo "== training mode: $TRAINING"
if [ "${REUSE_RUN:-0}" = 1 ] && [ -f "$RUN/student.safetensors" ] && [ -f "$RUN/site_$SITE/classifier.safetensors" ]; then
  echo "== REUSE_RUN=1: keeping the trained models in $RUN"
elif [ "$TRAINING" = fed ]; then
  # Federated (Flower simulation): MAE + purifier FedAvg over all sites, classifier's global expert
  # federated and local experts per site (DESIGN.md §8); writes the run folder of docs/interfaces.md.
  if [ -z "$ROUNDS_PUR" ]; then
    # shellcheck disable=SC2086
    step fed "$MF" fed sim --data "$DATA" --out "$RUN" --config "$CONFIG" --rounds "$ROUNDS" \
      --local-epochs "$LOCAL_EPOCHS" --max-train "$MAX_TRAIN" --seed "$SEED" --timeout "$FED_TIMEOUT" --no-calibrate \
      --student-steps "$STEPS" --purify-range "$T_MIN" "$T_MAX" $FED_ARGS
  else
    # Two federations with their own budgets — the purifier, then classifier + MAE — merged into one
    # run folder (fed sim runs every phase with the same rounds and local epochs). With REUSE_RUN=1 a
    # federation whose outputs already exist is not rerun.
    # The purifier federation first: it does not depend on the classifier, so a long classifier
    # federation can be re-tuned and rerun (REUSE_RUN=1) without retraining the purifier.
    if [ "${REUSE_RUN:-0}" = 1 ] && [ -f "$RUN.purifier/teacher.safetensors" ] && [ -f "$RUN.purifier/student.safetensors" ]; then
      echo "== REUSE_RUN=1: keeping the federated purifier in $RUN.purifier"
    else
      # shellcheck disable=SC2086
      step fed_purifier "$MF" fed sim --data "$DATA" --out "$RUN.purifier" --config "$CONFIG" --phases "$PURIFIER_PHASES" \
        --rounds "$ROUNDS_PUR" --local-epochs "$LOCAL_EPOCHS_PUR" --max-train "$MAX_TRAIN_PUR" --seed "$SEED" \
        --student-steps "$STEPS" --purify-range "$T_MIN" "$T_MAX" \
        --timeout "$FED_TIMEOUT" --no-calibrate $FED_ARGS
    fi
    if [ "${REUSE_RUN:-0}" = 1 ] && [ -f "$RUN/mae.safetensors" ] && [ -f "$RUN/site_$SITE/classifier.safetensors" ]; then
      echo "== REUSE_RUN=1: keeping the federated classifier + MAE in $RUN"
    else
      # shellcheck disable=SC2086
      step fed_cls_mae "$MF" fed sim --data "$DATA" --out "$RUN" --config "$CONFIG" --phases classifier,mae \
        --rounds "$ROUNDS" --local-epochs "$LOCAL_EPOCHS" --max-train "$MAX_TRAIN" --seed "$SEED" \
        --timeout "$FED_TIMEOUT" --no-calibrate $FED_ARGS
    fi
    cp "$RUN.purifier/teacher.safetensors" "$RUN/"
    if [ -f "$RUN.purifier/student.safetensors" ]; then
      cp "$RUN.purifier/student.safetensors" "$RUN/"
    else
      # Distillation did not fit the budget: the purifier is the federated teacher itself, sampled with
      # the same K-step DDIM (an x0-predictor is a valid few-step sampler, just a less accurate one).
      echo "== no distilled student: using the federated teacher as the K-step purifier (recorded)"
      cp "$RUN.purifier/teacher.safetensors" "$RUN/student.safetensors"
      echo '{"student_is_teacher": true}' > "$RUN/purifier_note.json"
    fi
    for d in "$RUN.purifier"/site_*/; do
      k=$(basename "$d"); mkdir -p "$RUN/$k/global"; cp -r "$d"global/. "$RUN/$k/global/" 2>/dev/null || true
    done
    cp "$RUN.purifier/metrics.json" "$RUN/metrics_purifier.json" 2>/dev/null || true
  fi
else
  # No federated command available: train on the bundle's site alone (recorded in the metrics).
  # shellcheck disable=SC2046
  step mae "$MF" train mae --data "$DATA" --site "$SITE" --out "$RUN" --config "$CONFIG" --threads "$THREADS" $(ep "$EPOCHS_MAE") --no-progress
  # shellcheck disable=SC2046
  step teacher "$MF" train purifier --data "$DATA" --site "$SITE" --out "$RUN" --config "$CONFIG" --threads "$THREADS" $(ep "$EPOCHS_PUR") --no-progress
  # shellcheck disable=SC2046
  step distill "$MF" train distill --data "$DATA" --site "$SITE" --out "$RUN" --teacher "$RUN" --steps "$STEPS" --config "$CONFIG" --threads "$THREADS" $(ep "$EPOCHS_DIS") --no-progress
  # shellcheck disable=SC2046
  step classifier "$MF" train classifier --data "$DATA" --site "$SITE" --out "$RUN" --config "$CONFIG" --threads "$THREADS" $(ep "$EPOCHS_CLS") --no-progress
fi
if [ ! -f "$RUN/config.json" ]; then
  printf '{"data": "%s", "note": "written by scripts/make_bundle.sh"}\n' "$(realpath "$DATA")" > "$RUN/config.json"
fi
step calibrate "$MF" calibrate --data "$DATA" --site "$SITE" --run "$RUN" --threads "$THREADS" \
  --t-min "$T_MIN" --t-max "$T_MAX" --steps "$STEPS"

STAGE="$WORK/bundle"
step export "$MF" export --run "$RUN" --site "$SITE" --out "$STAGE" --data "$DATA" --overwrite
step verify "$MF" verify-bundle "$STAGE"

BYTES=$(du -sb "$STAGE" | cut -f1)
echo "== bundle size: $BYTES bytes"
if [ "$BYTES" -gt "$MAX_BYTES" ]; then
  echo "!! bundle is larger than 25 MB ($BYTES bytes): use a smaller config"; exit 1
fi

"$PY" - "$WORK" "$STAGE" "$TRAINING" "$BYTES" <<'EOF'
import json, sys
from pathlib import Path
work, stage, training, nbytes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
m = json.loads((stage / "manifest.json").read_text())
times = dict(l.split("\t") for l in (work / "step_times.tsv").read_text().splitlines() if l)
note = work / "run" / "purifier_note.json"
out = {"training_mode": training, "student_is_teacher": note.is_file(), "step_seconds": {k: int(v) for k, v in times.items()}, "bundle_bytes": nbytes,
       "gate": m["gate"], "purifier_steps": m["purifier"]["steps"],
       "verification": m["provenance"]["verification"], "training_metrics": m["provenance"].get("metrics")}
(work / "bundle_metrics.json").write_text(json.dumps(out, indent=2))
print(json.dumps({k: out[k] for k in ("training_mode", "step_seconds", "bundle_bytes")}))
EOF

rm -rf "$DEST"
mkdir -p "$DEST"
cp -r "$STAGE"/. "$DEST"/
"$MF" verify-bundle "$DEST"
echo "== default bundle installed in $DEST ($(date -u +%FT%TZ))"
