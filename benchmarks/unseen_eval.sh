#!/usr/bin/env bash
# The gate on scanners no model saw: a bundle recalibrated on 100 clean scans of each of four synthetic scanner
# profiles drawn by another seed, then its false flags on the profile's other clean scans and its AUROC against
# PGD at 4 and 8/255 (`medfedpure eval --attacks 1,3`, rung 3 the evasion that knows the gate), and the spread of the
# false-flag rate over 2000 calibration draws (benchmarks/calibration_draws.py).
#
#   BUNDLE=runs/w2fed/bundle_site2 KEY=runs/keys/candidate OUT=runs/w2fed/unseen bash benchmarks/unseen_eval.sh
#
# KEY.pub.pem is trusted for BUNDLE and KEY.pem signs each recalibrated bundle. The calibration set of profile K is
# 50 no-tumour + 50 tumour scans drawn (seed K) from its train split, unlabelled to the bundle; the rule is the
# unseen-scanner target's: τ so that the rate on new clean scans is ≤ TARGET_FFR with probability CONFIDENCE.
# Resumable: a profile whose report exists is skipped. Data: DATA (generated when missing; seed 7, 300 scans per
# profile, 210 / 45 / 45).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
BUNDLE="${BUNDLE:?set BUNDLE to the bundle folder}"
KEY="${KEY:?set KEY to the key pair path without .pem}"
OUT="${OUT:?set OUT to a folder for the results}"
DATA="${DATA:-runs/unseen7/data}"
PROFILES="${PROFILES:-0 1 2 3}"
TARGET_FFR="${TARGET_FFR:-0.07}"
CONFIDENCE="${CONFIDENCE:-0.9}"
THREADS="${THREADS:-1}"
say() { echo "[$(date +%H:%M:%S)] $*"; }
mkdir -p "$OUT"
if [[ ! -f "$DATA/splits.json" ]]; then
  say "data → $DATA"
  "$BIN/medfedpure" data synth --out "$DATA" --sites 4 --per-site 300 --seed 7 --split-seed 0 > "$OUT/data.log" 2>&1 \
    || { say "data synth failed, see $OUT/data.log"; exit 1; }
fi
failed=0
for k in $PROFILES; do
  rep="$OUT/profile$k/report.json"
  if [[ -f "$rep" ]]; then say "profile $k: report exists"; continue; fi
  cal="$OUT/cal$k"
  rm -rf "$cal" && mkdir -p "$cal"
  # 50 + 50 train scans of the profile, by class (the bundle never sees the labels)
  "$BIN/python" - "$DATA" "$k" "$cal" <<'EOF' || { failed=1; continue; }
import json, random, shutil, sys
from pathlib import Path
data, k, cal = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
train = json.loads((data / "splits.json").read_text())["sites"][f"site_{k}"]["train"]
rng = random.Random(k)
for cls in ("no", "yes"):
    for rel in rng.sample(sorted(f for f in train if f.split("/")[1] == cls), 50):
        shutil.copy(data / rel, cal / Path(rel).name)
EOF
  b="$OUT/bundle$k"
  say "profile $k: calibrate → $b"
  "$BIN/medfedpure" calibrate --bundle "$BUNDLE" --trusted-key "$KEY.pub.pem" --scans "$cal" --out "$b" \
    --key "$KEY.pem" --target-ffr "$TARGET_FFR" --confidence "$CONFIDENCE" --overwrite \
    --description "unseen scanner profile $k (seed 7), 100 clean train scans" > "$OUT/calibrate$k.log" 2>&1 \
    || { say "profile $k: calibrate failed, see $OUT/calibrate$k.log"; failed=1; continue; }
  tail -n 2 "$OUT/calibrate$k.log"
  say "profile $k: eval"
  "$BIN/medfedpure" eval --bundle "$b" --trusted-key "$KEY.pub.pem" --data "$DATA" --site "$k" --attacks 1,3 \
    --eps 4,8 --budget quick --limit 0 --threads "$THREADS" --no-progress --out "$OUT/profile$k.tmp" \
    > "$OUT/eval$k.log" 2>&1 || { say "profile $k: eval failed, see $OUT/eval$k.log"; failed=1; continue; }
  rm -rf "$OUT/profile$k" && mv "$OUT/profile$k.tmp" "$OUT/profile$k"
  say "profile $k: draws"
  "$BIN/python" benchmarks/calibration_draws.py --bundle "$b" --trusted-key "$KEY.pub.pem" --data "$DATA" \
    --site "$k" --draws 2000 --target-ffr "$TARGET_FFR" --confidence "$CONFIDENCE" --cal-dir "$cal" \
    --threads "$THREADS" --out "$OUT/draws$k.json" > "$OUT/draws$k.log" 2>&1 \
    || { say "profile $k: draws failed, see $OUT/draws$k.log"; failed=1; }
done
# one line per profile: false flags on the clean test scans and the AUROC of rungs 1 and 3 at 4 and 8/255
"$BIN/python" - "$OUT" $PROFILES <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| profile | clean acc | flagged, clean test | rung 1 AUROC 4 · 8 /255 | rung 3 (evasion, lowest variant) AUROC 4 · 8 | "
      "draws above the target: plain · confidence | given set: rate on the other scans |")
print("|---|---|---|---|---|---|---|")
for k in sys.argv[2:]:
    p = out / f"profile{k}" / "report.json"
    if not p.is_file():
        print(f"| {k} | – | – | – | – | – | – |")
        continue
    block = json.loads(p.read_text())["per_site"][k]
    au = {}  # the lowest AUROC of each rung's attacks at each radius (rung 3: the evasion's variants)
    for r in block["rows"]:
        if r.get("auroc") is not None and not r.get("paper_point"):
            key = (r["rung"], r.get("eps_label"))
            au[key] = min(au.get(key, 1.0), r["auroc"])
    def f(rung):
        return " · ".join("–" if au.get((rung, e)) is None else f"{au[(rung, e)]:.3f}" for e in ("4/255", "8/255"))
    above = given = "–"
    d = out / f"draws{k}.json"
    if d.is_file():
        rules = json.loads(d.read_text())["rules"]
        conf = next(n for n in rules if n.startswith("confidence"))
        above = f"{rules['plain']['share_above_target']:.1%} · {rules[conf]['share_above_target']:.1%}"
        given = f"{rules['given_calibration_set'][conf]['on_the_rest']:.1%}"
    print(f"| {k} | {block['clean']['defended_acc']:.1%} | {block['clean']['flag_rate']:.1%} | {f(1)} | {f(3)} | "
          f"{above} | {given} |")
EOF
exit $failed
