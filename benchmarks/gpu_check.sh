#!/usr/bin/env bash
# The one prepared check of the CUDA patch gate for a lent GPU machine (issue 4). Fits in ~5 min.
#
#   builds medfedpure._C / _C_cuda there (one architecture, from the GPU's compute capability),
#   runs the `cuda` tests of tests/test_ops.py, the GPU part of benchmarks/kernel.py, a
#   compute-sanitizer memcheck + racecheck of a few launches, and the CPU benchmark on that
#   machine's (quiet) cores; everything lands in $OUT (at most 8 files come back).
#
# From the dev machine (device tool):  run(command="bash benchmarks/gpu_check.sh", timeout_s=420)
# Anywhere else:                        OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
PY="${PYTHON:-python3}"
step() { printf '\n=== %s (%s) ===\n' "$1" "$(date -u +%H:%M:%S)"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
nvcc --version | tail -n 2
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
lscpu | head -n 15 || true

step "build (pip editable, one architecture)"
CC_MAJ_MIN=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
export MEDFEDPURE_CUDA_ARCHS="${MEDFEDPURE_CUDA_ARCHS:-$CC_MAJ_MIN}"
echo "MEDFEDPURE_CUDA_ARCHS=$MEDFEDPURE_CUDA_ARCHS"
rm -rf build
if ! "$PY" -m pip install --no-build-isolation --no-deps -q -e . ; then
  # Fallback: plain CMake build, modules copied next to the package sources.
  echo "pip build failed; building with CMake directly"
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES="$MEDFEDPURE_CUDA_ARCHS"
  cmake --build build/gpu -j 16
  cp build/gpu/_C*.so sdk/medfedpure/
  export PYTHONPATH="$PWD/sdk${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF'
import torch
from medfedpure import ops
assert ops._C is not None and ops._C_cuda is not None, "compiled modules missing"
s = torch.cuda.current_stream().cuda_stream
print("runtime", ops._C_cuda.runtime_version(), "empty_launch ->", ops._C_cuda.empty_launch(s))
torch.cuda.synchronize()
EOF

step "tests: pytest -m cuda tests/test_ops.py (and the CPU tests of the same file)"
set +e
"$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -o addopts="" -rs --junitxml="$OUT/pytest_ops.xml"
TEST_RC=$?
set -e
echo "pytest exit code: $TEST_RC"

step "tests: pytest -m cuda on the runtime (torch CUDA engine: FP16, CUDA graphs, CUDA gate on device tensors)"
set +e
"$PY" -m pytest tests/test_engines.py tests/test_defender.py -m cuda -q -p no:cacheprovider -o addopts="" -rs \
  --junitxml="$OUT/pytest_runtime_cuda.xml"
RT_RC=$?
set -e
echo "runtime cuda pytest exit code: $RT_RC"

step "benchmark: GPU part"
"$PY" benchmarks/kernel.py --device cuda --out "$OUT/kernel_gpu.json" || echo "GPU benchmark FAILED"
"$PY" benchmarks/kernel.py --device cuda --stat topk --topk 16 --dtypes float16 --sizes 224 \
  --out "$OUT/kernel_gpu_topk.json" || echo "GPU topk benchmark FAILED"
"$PY" benchmarks/kernel.py --device cuda --stat hfratio --patch 8 --dtypes float16 float32 --sizes 128 224 \
  --batches 1 4 8 --out "$OUT/kernel_gpu_hfratio.json" || echo "GPU hfratio benchmark FAILED"

step "compute-sanitizer memcheck + racecheck (a few launches)"
cat > /tmp/mfp_sanitize.py <<'EOF'
import numpy as np, torch
from medfedpure import ops
rng = np.random.default_rng(0)
for dtype, s, p, stat, norm in (("float16", 224, 16, "topk", True), ("float32", 64, 8, "mean", False), ("float32", 36, 4, "topk", True),
                                   ("float16", 224, 8, "hfratio", False), ("float32", 35, 5, "hfratio", False)):
    x = torch.from_numpy(rng.random((3, s, s), dtype=np.float32)).to("cuda", getattr(torch, dtype))
    r = x[:, None].repeat(1, 2, 1, 1) + 0.1
    vis = np.zeros((2, (s // p) ** 2), bool); vis[0, ::2] = True
    out = ops.patch_gate(x, r, vis, patch=p, stat=stat, topk=5 if stat == "topk" else 0, norm_pix=norm,
                         tau=0.01, tau_high=0.02, t_min=1, t_max=9, return_patch_err=True)
    ref = ops.patch_gate_reference(x.cpu().numpy(), r.cpu().numpy(), vis, patch=p, stat=stat, topk=5 if stat == "topk" else 0,
                                   norm_pix=norm, tau=0.01, tau_high=0.02, t_min=1, t_max=9)
    assert np.array_equal(out.score.cpu().numpy(), ref.score), (dtype, s, p)
torch.cuda.synchronize(); print("sanitizer script ok")
EOF
for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" /tmp/mfp_sanitize.py \
    > "$OUT/sanitizer_$tool.log" 2>&1 && echo "$tool: clean" || echo "$tool: exit $? (see sanitizer_$tool.log)"
  tail -n 5 "$OUT/sanitizer_$tool.log"
done

step "benchmark: CPU part on this machine's cores"
timeout 60 "$PY" benchmarks/kernel.py --reps 10 --out "$OUT/kernel_cpu_gpuhost.json" || echo "CPU benchmark FAILED or timed out"

step "done"
ls -la "$OUT"
exit "$TEST_RC"
