#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (issues 4 and 6). Runs in ~10 min (~6 without the eval
# step); every step has its own time limit so that the script always ends by itself and its files come back.
#
#   1. builds medfedpure._C / _C_cuda there (one architecture, from the GPU's compute capability);
#   2. tests: tests/test_ops.py and tests/test_gate_reduce.py (the CUDA gate kernels against the numpy reference), the `cuda` tests of
#      the runtime (torch backend in FP16 with CUDA graphs and the CUDA gate kernel, through the
#      Defender, against onnxruntime FP32 on the CPU) and the engine/Defender/export tests with a GPU
#      visible (the "auto" device paths);
#   3. `medfedpure bench` on the GPU (torch FP16 + CUDA graphs, torch FP16 eager, torch FP32 eager,
#      onnxruntime's CUDA provider when present; the bundle at 128 px and its architectures at 224 px)
#      beside onnxruntime and torch on 2 of the host's CPU cores, and benchmarks/kernel.py (GPU part);
#   4. compute-sanitizer memcheck + racecheck of a few gate launches;
#   5. `medfedpure eval --device cuda` (step `eval`, ~4 min): the full budget (100 steps, EOT 10 / APGD 20,
#      R = 5), the bundle's own site (its personalised classifier and gate), ℓ∞ 2 and 8/255, and certification at σ 0.12, 0.25, 0.5 with n = 1000, on the
#      default bundle's own synthetic data set regenerated there (`medfedpure data synth` with the manifest's
#      dataset provenance), the first EVAL_LIMIT test scans per site; prints its wall time.
#
# From the dev machine (device tool): run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   .whl holds the pure-Python wheels the GPU image lacks (pydicom, nilearn, nibabel).
# Anywhere else:                      OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# Only some steps:                    STEPS="build runtime latency" bash benchmarks/gpu_check.sh
# The eval alone (needs build: the CUDA gate kernel): STEPS="machine build eval" (~6 min; EVAL_LIMIT=N
#   scans per site; torchattacks must be installed there, e.g. its wheel in .whl)
# Training on the GPU (opt-in, not in the default STEPS): STEPS="machine build train" (~4-8 min; step `train`
#   below: the CUDA training test, one site's adversarial epochs, two federated rounds sharing the GPU; flwr and
#   ray must be importable there for the federated part)
#
# What comes back (at most 8 files): gpu_check.log, bench.json, bench.png, eval_report.md, eval_report.json,
# train_site1.json (step train), gpu_check_files.tgz (junit XML of every pytest run, kernel benchmark JSON, sanitizer logs, the eval folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
WORK="${WORK:-/tmp/medfedpure_gpu_check}"
STEPS="${STEPS:-machine build runtime ops latency sanitizer kernel eval}"
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
PY="${PYTHON:-python3}"
FAILED=()
step() { printf '\n=== %s (%s) ===\n' "$1" "$(date -u +%H:%M:%S)"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# run LIMIT_S NAME CMD...: one bounded step; a failure is recorded and the script goes on
run() {
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$@"; local rc=$?
  if [ "$rc" -ne 0 ]; then FAILED+=("$name (exit $rc)"); echo "!!! $name: exit $rc"; fi
  return 0
}
pack() {
  tar czf "$OUT/gpu_check_files.tgz" -C "$WORK" . 2>/dev/null
  step "done"
  if [ "${#FAILED[@]}" -eq 0 ]; then echo "ALL STEPS PASSED"; else printf 'FAILED: %s\n' "${FAILED[@]}"; fi
  ls -la "$OUT"
}
trap pack EXIT

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if want machine; then
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -n 2
  "$PY" - <<'EOF'
import importlib.util, os, torch, numpy, onnxruntime
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "numpy", numpy.__version__)
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability(), "cpus", os.cpu_count())
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
for m in ("tensorrt", "pydicom", "nilearn", "flwr", "torchattacks"):
    print(f"{m}: {'present' if importlib.util.find_spec(m) else 'absent'}")
EOF
  lscpu | grep -E "Model name|^CPU\(s\)" || true
fi

if want build; then
  step "build (pip editable, one architecture)"
  CC_MAJ_MIN=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
  export MEDFEDPURE_CUDA_ARCHS="${MEDFEDPURE_CUDA_ARCHS:-$CC_MAJ_MIN}"
  echo "MEDFEDPURE_CUDA_ARCHS=$MEDFEDPURE_CUDA_ARCHS"
  rm -rf build
  if ! timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -q -e . ; then
    echo "pip build failed; building with CMake directly"
    cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES="$MEDFEDPURE_CUDA_ARCHS" \
      && cmake --build build/gpu -j 16
    # the package as the wheel lays it out: sdk/medfedpure + export/ as medfedpure.export + the modules
    rm -rf /tmp/mfp_pkg && mkdir -p /tmp/mfp_pkg && cp -r sdk/medfedpure /tmp/mfp_pkg/ \
      && cp -r export /tmp/mfp_pkg/medfedpure/export && cp build/gpu/_C*.so /tmp/mfp_pkg/medfedpure/
    export PYTHONPATH="/tmp/mfp_pkg${PYTHONPATH:+:$PYTHONPATH}"
  fi
  run 60 "compiled modules" "$PY" - <<'EOF'
import torch
from medfedpure.gate import dispatch as ops
assert ops._C is not None and ops._C_cuda is not None, "compiled modules missing"
s = torch.cuda.current_stream().cuda_stream
print("runtime", ops._C_cuda.runtime_version(), "empty_launch ->", ops._C_cuda.empty_launch(s))
torch.cuda.synchronize()
EOF
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs)
if want runtime; then
  step "tests: the runtime on the GPU (torch FP16 + CUDA graphs + CUDA gate, via the Defender)"
  run 240 "pytest runtime cuda" "${PYTEST[@]}" tests/test_runtime_cuda.py tests/test_engines.py -m cuda \
    --junitxml="$WORK/pytest_runtime_cuda.xml"
  step "tests: engines, Defender, bundle and export with a GPU visible (device='auto' paths)"
  run 240 "pytest runtime all" "${PYTEST[@]}" -n 8 --dist loadfile tests/test_engines.py tests/test_defender.py \
    tests/test_bundle.py tests/test_export.py tests/test_scan.py tests/test_scan_dicom.py \
    --junitxml="$WORK/pytest_runtime_all.xml"
fi

if want ops; then
  step "tests: tests/test_ops.py (CUDA gate kernel vs numpy reference, and the CPU tests)"
  run 240 "pytest ops" "${PYTEST[@]}" -n 8 tests/test_ops.py tests/test_ops_cuda_emulated.py tests/test_gate_reduce.py --junitxml="$WORK/pytest_ops.xml"
fi

if want latency; then
  step "benchmark: Defender latency on the GPU, beside the host CPU (2 threads)"
  run 240 "latency" "$PY" -m medfedpure bench --backends \
    "torch:fp16@cuda,torch:fp16@cuda/eager,torch:fp32@cuda/eager,onnxruntime@cuda,onnxruntime@cpu,torch@cpu" \
    --batches 1,8 --sizes 128,224 --iters 40 --warmup 5 --threads 2 --out "$WORK/latency"
  cp "$WORK/latency/bench.json" "$WORK/latency/bench.png" "$OUT/" 2>/dev/null
fi

if want sanitizer; then
  step "compute-sanitizer memcheck + racecheck (a few launches)"
  cat > "$WORK/mfp_sanitize.py" <<'EOF'
import sys
import numpy as np, torch
from medfedpure import gate as ops
CASES = (("float16", 224, 16, "topk", True), ("float32", 64, 8, "mean", False), ("float32", 36, 4, "topk", True),
         ("float32", 36, 4, "mean", True), ("float16", 224, 8, "hfratio", False), ("float32", 35, 5, "hfratio", False),
         ("float32", 64, 2, "topk", False))  # the last: Np = 1024 > 256 threads (several ranked per thread)
rng = np.random.default_rng(0)
for dtype, s, p, stat, norm in (CASES[int(a)] for a in sys.argv[1:]) if sys.argv[1:] else CASES:
    x = torch.from_numpy(rng.random((3, s, s), dtype=np.float32)).to("cuda", getattr(torch, dtype))
    r = x[:, None].repeat(1, 2, 1, 1) + 0.1
    vis = np.zeros((2, (s // p) ** 2), bool); vis[0, ::2] = True
    kw = dict(patch=p, stat=stat, topk=5 if stat == "topk" else 0, norm_pix=norm, tau=0.01, tau_high=0.02, t_min=1, t_max=9)
    out = ops.patch_gate(x, r, vis, return_patch_err=True, **kw)
    ref = ops.patch_gate_reference(x.cpu().numpy(), r.cpu().numpy(), vis, **kw)
    assert np.array_equal(out.score.cpu().numpy(), ref.score), (dtype, s, p)
    print("case", dtype, s, p, stat, norm, "ok")
torch.cuda.synchronize(); print("sanitizer script ok")
EOF
  run 90 "sanitizer memcheck" compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" "$WORK/mfp_sanitize.py" \
    > "$WORK/sanitizer_memcheck.log" 2>&1
  tail -n 3 "$WORK/sanitizer_memcheck.log"
  for c in 0 1 2 3 4 5 6; do  # one process per case: a hazard names its case
    run 60 "sanitizer racecheck case $c" compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 6 \
      --error-exitcode 3 "$PY" "$WORK/mfp_sanitize.py" "$c" > "$WORK/sanitizer_racecheck_$c.log" 2>&1
    grep -E "^case|SUMMARY" "$WORK/sanitizer_racecheck_$c.log"
  done
  grep -h -A4 "Error\|Warning" "$WORK"/sanitizer_racecheck_*.log | head -n 60
fi

if want kernel; then
  step "benchmark: CUDA gate kernel"
  run 60 "kernel bench" "$PY" benchmarks/kernel.py --device cuda --out "$WORK/kernel_gpu.json"
  run 60 "kernel bench hfratio" "$PY" benchmarks/kernel.py --device cuda --stat hfratio --patch 8 \
    --dtypes float16 float32 --sizes 128 224 --batches 1 4 8 --out "$WORK/kernel_gpu_hfratio.json"
fi

if want eval; then
  # Sizing (EVAL_LIMIT scans per site): CPU costs measured on the dev machine with the default bundle (1
  # thread): one EOT draw through purifier + classifier, forward and backward, ~64 ms per scan; one gate
  # call ~12 ms per scan; one certification draw ~13 ms (its keyed noise ~0.5 ms on the host). Per site
  # and ε the ladder makes ~6000 such draws (rung 2: 2 losses × 100 steps × EOT 10; rung 3: 2 × 101 × 10;
  # rung 4: 100 × 20) plus ~4800 gate calls (APGD calls the gate per EOT draw); the sanity checks add
  # 400 steps × EOT 10 on 32 scans of the first site. On the GPU the tiny networks are launch-bound: take
  # ~5 ms per launch sequence (rungs 2–3 batch their EOT draws: one per step; APGD's 20 draws are 20) and
  # ~300× the CPU thread on the arithmetic, ~3 ms per gate call. One site at ε 2 and 8 (the estimate was made for two: an upper bound): ~50 s of launches
  # + ~60 s of gate calls + ~30 s of sanity arithmetic + ~30 s of surrogate training (host CPU, 10 epochs)
  # + ~30 s of data generation, then ~8 s per scan and site (attacks ~5, certification noise ~3).
  # EVAL_LIMIT=6 → ~4 min. report.json's per-row attack_s then size the run over every scan.
  step "eval: medfedpure eval --device cuda --budget full --site BUNDLE_SITE --eps 2,8, certify n = 1000"
  EVAL_LIMIT="${EVAL_LIMIT:-6}"
  EVAL_DATA="${EVAL_DATA:-/tmp/medfedpure_eval_data}"  # outside WORK: not packed
  t_eval=$(date +%s)
  run 120 "pytest eval cuda" "${PYTEST[@]}" tests/test_eval_device.py -m cuda --junitxml="$WORK/pytest_eval_cuda.xml"
  run 120 "eval data" "$PY" - "$EVAL_DATA" <<'EOF'
import json, subprocess, sys
from pathlib import Path
from medfedpure import Defender
out = Path(sys.argv[1])
prov = Defender.default(backend="onnxruntime", device="cpu").bundle.manifest["provenance"]
ds, cfg = prov["dataset"], prov["dataset"]["config"]
cmd = [sys.executable, "-m", "medfedpure", "data", "synth", "--out", str(out), "--overwrite", "--workers", "8",
       "--sites", str(cfg["sites"]), "--per-site", str(cfg["per_site"]), "--size", str(cfg["size"]),
       "--seed", str(cfg["seed"]), "--subtle", str(cfg["subtle_fraction"]),
       "--generator-version", str(ds["generator_version"])]
print(" ".join(cmd), flush=True)
subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
got = json.loads((out / "dataset.json").read_text()).get("fingerprint")
want = prov.get("dataset_fingerprint")
print("dataset fingerprint", got, "==" if got == want else "!= (NOT the bundle's data set:)", want)
(out / "bundle_site").write_text(str(int(prov.get("site", 0))))  # the site whose personalised model the bundle is
EOF
  run 420 "eval cuda" "$PY" -m medfedpure eval --device cuda --backend torch --budget full --site "$(cat "$EVAL_DATA/bundle_site" 2>/dev/null || echo 0)" --eps 2,8 \
    --limit "$EVAL_LIMIT" --certify-sigmas 0.12,0.25,0.5 --certify-n 1000 --surrogate-epochs 10 --threads 8 \
    --no-progress --data "$EVAL_DATA" --out "$WORK/eval"
  echo "eval step wall time: $(( $(date +%s) - t_eval )) s (EVAL_LIMIT=$EVAL_LIMIT scans per site)"
  cp "$WORK/eval/report.md" "$OUT/eval_report.md" 2>/dev/null
  cp "$WORK/eval/report.json" "$OUT/eval_report.json" 2>/dev/null
fi

if want train; then
  # Opt-in (not in the default STEPS): `STEPS="machine build train"`, ~4-8 min. Training on the GPU, to size a
  # robust bundle build there: the CPU/CUDA agreement test of train_classifier; one site's clean base (30 epochs)
  # and 10 PGD-5 8/255 epochs, attacked with PGD-20 (benchmarks/adv_lesion_study.py; the dev box's one-thread
  # figures for the same recipe on site 1 are in benchmarks/RESULTS.md, "Robustness"); then two federated rounds
  # of the classifier phase with the four sites sharing the GPU (`fed sim --device cuda`).
  step "train: train_classifier on CUDA, one site's adversarial epochs, two federated rounds sharing the GPU"
  TRAIN_DATA="${TRAIN_DATA:-/tmp/medfedpure_train_data}"  # outside WORK: not packed
  run 120 "pytest train cuda" "${PYTEST[@]}" tests/test_adv_train.py -m cuda --junitxml="$WORK/pytest_train_cuda.xml"
  run 120 "train data" "$PY" -m medfedpure data synth --out "$TRAIN_DATA" --overwrite --workers 8 --sites 4 \
    --per-site 1200 --seed 0 --split-seed 0
  t_train=$(date +%s)
  run 300 "train one site" "$PY" benchmarks/adv_lesion_study.py --data "$TRAIN_DATA" --site 1 --name gpu_site1 \
    --epochs 10 --eps 8 --eval-splits test --device cuda --threads 8 --out "$WORK/train"
  echo "one-site study wall time: $(( $(date +%s) - t_train )) s"
  cp "$WORK/train/gpu_site1.json" "$OUT/train_site1.json" 2>/dev/null
  t_fed=$(date +%s)
  run 300 "train federated" "$PY" -m medfedpure fed sim --data "$TRAIN_DATA" --out "$WORK/fed_gpu" --config small \
    --rounds 2 --local-epochs 1 --phases classifier --no-calibrate --adv pgd --adv-eps 8 --adv-steps 5 \
    --adv-start-epoch 0 --robust-val 64 --device cuda --timeout 280
  echo "federated classifier, 2 rounds x 1 epoch, 4 sites on one GPU: $(( $(date +%s) - t_fed )) s"
fi

[ "${#FAILED[@]}" -eq 0 ]
