#!/usr/bin/env bash
# Per-site small-config training on site 0 of a synthetic data set, timed (issue 3: the 90-minute budget).
# DATA (default data/synth128) and RUN (default runs/small_site0) pick the data set and the run folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
MF=.venv/bin/medfedpure
DATA=${DATA:-data/synth128}
RUN=${RUN:-runs/small_site0}
mkdir -p $RUN
T=$RUN/step_times.tsv; : > $T
step() { local n=$1; shift; local t0=$(date +%s); echo "== [$n] $*"; "$@"; echo -e "$n\t$(( $(date +%s) - t0 ))" >> $T; }
step classifier $MF train classifier --data $DATA --site 0 --out $RUN --config small --threads 1 --no-progress
step mae $MF train mae --data $DATA --site 0 --out $RUN --config small --threads 1 --no-progress
step teacher $MF train purifier --data $DATA --site 0 --out $RUN --config small --threads 1 --no-progress
step distill $MF train distill --data $DATA --site 0 --out $RUN --teacher $RUN --steps 1 --config small --threads 1 --no-progress
step calibrate $MF calibrate --data $DATA --site 0 --run $RUN --threads 1 --t-min 60 --t-max 200 --steps 1
step export $MF export --run $RUN --site 0 --out $RUN/bundle --data $DATA --overwrite
cat $T
