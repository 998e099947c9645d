# One-command entry points. `make demo` and `make test` work on a fresh machine: they create the
# virtual environment in .venv, install the package (building the C++ and, with nvcc, CUDA modules)
# and then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export ORT_DISABLE_TELEMETRY := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test lint lint-imports bundle clean

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 (a wider spec pulls a multi-GB CUDA build).
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# torchattacks pins an old requests and pulls torchvision, neither of which it imports.
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/medfedpure demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check sdk export benchmarks tests

# The import contracts of .importlinter: imports point down (the runtime never imports training,
# federation, evaluation or export; models import nothing above them).
lint-imports: $(STAMP)
	$(BIN)/lint-imports

# The embedded default bundle: synthetic data → federated training → calibration → export → install,
# resumable (`medfedpure bundle build --help`; options through BUNDLE_ARGS, e.g. BUNDLE_ARGS="--dry-run").
bundle: $(STAMP)
	$(BIN)/medfedpure bundle build $(BUNDLE_ARGS)

clean:
	rm -rf build $(VENV)
