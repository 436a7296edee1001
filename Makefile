# The two commands a newcomer runs: `make demo` (the main job) and `make test`.
# Each creates .venv on first use, installing the pinned CPU torch first so that
# pip never resolves torch to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

export MLFLOW_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo paper-toy test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/scf nightly --config configs/demo.yaml

# The paper's claims at toy scale: every configs/paper-toy run (or PAPER_TOY=<some of them>), then the
# report (docs/paper-toy/REPORT.md). Finished merges and evaluations are reused from the cache.
PAPER_TOY ?= $(sort $(wildcard configs/paper-toy/*.yaml))
paper-toy: install
	for config in $(PAPER_TOY); do HF_HUB_OFFLINE=1 $(VENV)/bin/scf nightly --config $$config || exit 1; done
	$(VENV)/bin/scf report --config configs/paper-toy

lint: install
	$(PY) -m ruff check .

# Two workers, one test file each at a time: most tests wait on child processes and servers, so
# two files in parallel use both cores (a file's module fixtures stay in one worker).
test: install lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) .scf .pytest_cache
