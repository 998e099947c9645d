# One-command entry points. `make demo` and `make test` work on a fresh machine: they create the
# virtual environment in .venv, install the package (building the C++ and, with nvcc, CUDA modules)
# and then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
TORCH_STAMP := $(VENV)/.installed-torch
# Index of the torch wheel, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu where pip's configured
# indexes hold no CPU build (on the public PyPI, Linux torch==2.13.0 is the CUDA build).
TORCH_INDEX ?=
export ORT_DISABLE_TELEMETRY := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test lint lint-imports bundle clean

# The venv and torch first, pinned: the pin is satisfied by the CPU wheel 2.13.0+cpu where pip's indexes
# or find-links offer it (or TORCH_INDEX points at one); a wider spec would pull a multi-GB CUDA build.
$(TORCH_STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

# `make demo`: only what `medfedpure demo` needs (the [demo] extra).
$(DEMO_STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/*) | $(TORCH_STAMP)
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

# Everything else (`make test`, lint, bundle): the [dev] extra.
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/*) | $(TORCH_STAMP)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# torchattacks pins an old requests and pulls torchvision, neither of which it imports.
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

setup: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/medfedpure demo

# A test that hit the 15-min timeout (a hang, not a wrong answer) runs once more; any other failure fails
# at once. The slowest tests are listed at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 --reruns 1 --only-rerun "Timeout"

lint: $(STAMP)
	$(BIN)/ruff check sdk export benchmarks tests

# The import contracts of .importlinter: imports point down (the runtime never imports training,
# federation, evaluation or export; models import nothing above them).
lint-imports: $(STAMP)
	$(BIN)/lint-imports

# The embedded default bundle: synthetic data → federated training → calibration → export → install,
# resumable (`medfedpure bundle build --help`; more options through BUNDLE_ARGS, e.g. BUNDLE_ARGS="--dry-run").
# BUNDLE_RECIPE is the shipped bundle's recipe (four scanner profiles × 1200 scans, PGD-5 adversarial training
# at 8/255 from epoch 20 with robust model selection and denoised-smoothing batches, site 2; about 57 min on
# 2 cores); BUNDLE_RECIPE= gives the CLI defaults. Its gate is hfratio, calibrated on site 2's val scans: pooling
# every site's val scans (--calibrate-on pooled) pays off only with the learned gate (--detector-rounds N), see
# benchmarks/RESULTS.md, "Gate and detector".
BUNDLE_RECIPE ?= --work runs/robust5 --sites 4 --per-site 1200 --adv pgd --adv-eps 8 --adv-steps 5 --adv-start-epoch 20 \
	--robust-val 64 --select robust --smoothing-sigmas 0.12,0.25,0.5 --purifier-rounds 5 --purifier-max-train 420 \
	--timeout 14000 --site 2
bundle: $(STAMP)
	$(BIN)/medfedpure bundle build $(BUNDLE_RECIPE) $(BUNDLE_ARGS)

clean:
	rm -rf build $(VENV)
