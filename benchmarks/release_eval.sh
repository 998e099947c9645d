#!/usr/bin/env bash
# Step 2 of docs/release.md on the dev machine: every site's bundle of a finished candidate build, then
# `medfedpure eval` on every site, then the target table against the shipped bundle (benchmarks/targets.py).
# Resumable: a report already written is not run again, so the same command continues after an interruption.
#
#   KEY=runs/keys/candidate bash benchmarks/release_eval.sh            # KEY.pem signs, KEY.pub.pem is trusted
#   STEPS="bundles linf" SITES="1 3" bash benchmarks/release_eval.sh   # some steps, some sites
#
# Steps (STEPS, default all, in this order):
#   bundles  `bundle build --work WORK --recorded --site K --dest WORK/bundle_siteK` for every site (the build's own
#            recipe: only the per-site steps run; a missing federation would start it, so this step refuses when
#            the build has not finished);
#   linf     the ladder at ℓ∞ 2, 4, 8/255 on all test scans of the site, the bundle's policy → WORK/eval/siteK_linf;
#   l2       the ladder at ℓ2 0.5 → WORK/eval/siteK_l2;
#   floor    site SITE_POLICY's ℓ∞ ladder under `floor` (for `bundle choose-policy`, against linf's) → WORK/eval/siteK_floor;
#   cert     certification at each σ of CERT_SIGMAS, n = CERT_N, the first CERT_LIMIT test scans (0: all)
#            → WORK/eval/siteK_cert_sσ;
#   table    benchmarks/targets.py over every report, against the shipped bundle's → WORK/eval/targets.{md,json,png}.
# BUDGET=quick (default: what 2 cores allow, an upper bound, labelled in every report) or full (a GPU's job:
# DEVICE=cuda). JOBS evals run side by side, one torch thread each (default 2: the dev machine's cores). One instance
# per work folder (a lock; a second exits with status 4).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
WORK="${WORK:-runs/w2fed}"
KEY="${KEY:-runs/keys/candidate}"
SITES="${SITES:-0 1 2 3}"
STEPS="${STEPS:-bundles linf l2 floor cert table}"
BUDGET="${BUDGET:-quick}"
DEVICE="${DEVICE:-cpu}"
JOBS="${JOBS:-2}"
SITE_POLICY="${SITE_POLICY:-2}"
CERT_SIGMAS="${CERT_SIGMAS:-0.25 0.5 0.12}"  # one report per σ (the longest jobs: ≈ 30 min per σ and site at width 1)
CERT_N="${CERT_N:-1000}"
CERT_LIMIT="${CERT_LIMIT:-0}"
LIMIT="${LIMIT:-0}"  # test scans per site of the ladders (0: all; a smaller number only for a smoke run)
# The build's recipe: by default the one recorded in WORK/config.json (`bundle build --recorded`); RECIPE, when set,
# gives it instead (the build's options without --work, --site, --dest, --key and --pause-after).
RECIPE="${RECIPE:---recorded}"
BASELINE="${BASELINE:-benchmarks/results/eval/robust5}"
EVAL="$WORK/eval"
mkdir -p "$EVAL"
has() { [[ " $STEPS " == *" $1 "* ]]; }
say() { echo "[$(date +%H:%M:%S)] $*"; }
# one instance per work folder: two would start the same evaluation and move its output folder under each other
exec 9>"$EVAL/.release_eval.lock"
if ! flock -n 9; then say "another release_eval.sh is working on $WORK (it holds $EVAL/.release_eval.lock)"; exit 4; fi

if has bundles; then
  # every shared step of the build (data, the federations) must be done: otherwise `bundle build` would go on training
  # shellcheck disable=SC2086
  plan=$("$BIN/medfedpure" bundle build --work "$WORK" --dest "$WORK/bundle_site${SITES%% *}" $RECIPE \
    --site "${SITES%% *}" --key "$KEY.pem" --dry-run 2>&1 | grep -E '\] (data|fed_[a-z_]+): would run')
  if [[ -n "$plan" ]]; then
    say "the build in $WORK has not finished its shared steps (or RECIPE is not its recipe); run its build command first:"
    echo "$plan"
    exit 3
  fi
  for k in $SITES; do
    dest="$WORK/bundle_site$k"
    if [[ -f "$dest/manifest.json" ]]; then say "site $k: $dest exists"; continue; fi
    say "site $k: bundle → $dest"
    # shellcheck disable=SC2086
    "$BIN/medfedpure" bundle build --work "$WORK" --dest "$dest" $RECIPE --site "$k" --key "$KEY.pem" \
      > "$EVAL/bundle_site$k.log" 2>&1 || { say "site $k: bundle build failed (exit $?), see $EVAL/bundle_site$k.log"; exit 1; }
    tail -n 3 "$EVAL/bundle_site$k.log"
  done
fi

# one eval job: NAME then the extra arguments; skipped when its report exists
run_eval() {
  local name="$1" k="$2"; shift 2
  local out="$EVAL/$name"
  if [[ -f "$out/report.json" ]]; then say "$name: report exists"; return 0; fi
  say "$name: start"
  "$BIN/medfedpure" eval --bundle "$WORK/bundle_site$k" --trusted-key "$KEY.pub.pem" --data "$WORK/data" --site "$k" \
    --budget "$BUDGET" --threads 1 --device "$DEVICE" --no-progress --out "$out.tmp" "$@" > "$EVAL/$name.log" 2>&1
  local rc=$?
  if [[ $rc -eq 0 ]]; then rm -rf "$out"; mv "$out.tmp" "$out"; say "$name: done ($(grep -o '"wall_s": [0-9.]*' "$out/report.json" | tail -1))"
  else say "$name: failed (exit $rc), see $EVAL/$name.log"; fi
  return $rc
}

jobs_list=()  # every site's ladders first, certification last
for k in $SITES; do has linf && jobs_list+=("site${k}_linf $k --attacks ladder --eps 2,4,8 --limit $LIMIT"); done
for k in $SITES; do has l2 && jobs_list+=("site${k}_l2 $k --attacks ladder --norm l2 --eps 0.5 --limit $LIMIT"); done
for k in $SITES; do
  # the same ladder as linf's under the other policy: `bundle choose-policy` compares like with like
  has floor && [[ "$k" == "$SITE_POLICY" ]] && jobs_list+=("site${k}_floor $k --attacks ladder --eps 2,4,8 --policy floor --limit $LIMIT")
done
for sigma in $CERT_SIGMAS; do
  for k in $SITES; do
    has cert && jobs_list+=("site${k}_cert_s$sigma $k --attacks paper --eps 8 --certify-sigmas $sigma --certify-n $CERT_N --limit $CERT_LIMIT")
  done
done
failed=0
running=0
for job in "${jobs_list[@]}"; do
  # shellcheck disable=SC2086
  run_eval $job &
  running=$((running + 1))
  if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
done
while (( running > 0 )); do wait -n || failed=1; running=$((running - 1)); done

if has table; then
  reports=()
  for f in "$EVAL"/site*_linf/report.json "$EVAL"/site*_l2/report.json "$EVAL"/site*_cert_s*/report.json; do
    [[ -f "$f" ]] && reports+=(--report "$f")
  done
  if (( ${#reports[@]} )); then
    "$BIN/python" benchmarks/targets.py "${reports[@]}" \
      --baseline "$BASELINE/site?_linf/report.json" --baseline "$BASELINE/site?_l2/report.json" \
      --baseline "$BASELINE/cert_site?_s*/report.json" \
      --out "$EVAL/targets.json" --figure "$EVAL/targets.png" | tee "$EVAL/targets.md"
    table_rc=${PIPESTATUS[0]}
    (( table_rc == 1 )) && say "regressions against the shipped bundle: see $EVAL/targets.md"
    (( table_rc == 2 )) && failed=1
  else
    say "no reports yet: nothing to tabulate"
  fi
fi
exit $failed
