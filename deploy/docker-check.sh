#!/usr/bin/env bash
# make docker-check: build the CPU image from this checkout, run it with the bundled model, check that it serves,
# remove everything it made, and print the figures (build time, image size, time to ready cold and warm).
#
# Runs with Docker's daemonless cousins (buildah builds, podman runs), which Debian installs with apt-get: no
# daemon and no registry are needed. Steps:
#   1. buildah / podman / mmdebstrap / runc: installed with apt-get when missing and we are root on Debian.
#   2. The base image: python:3.11-slim-bookworm pulled when a registry answers; otherwise a stand-in made
#      with mmdebstrap (Debian bookworm + python3.11, venv, headers, ca-certificates) under that name.
#   3. The build: --build-arg VLLM=cpu, docker format (OCI drops HEALTHCHECK). This machine's pip settings
#      (`pip config list`: CA bundle, wheel folders, extra indexes, constraints) go in as a generated pip.conf
#      mounted for the build's RUN steps with the local paths it names, all read-only; nothing of them is
#      written into the Dockerfile or the image.
#   4. A container with the bundled model, --shm-size 1g and a named cache volume: /ready (polled, then the image's
#      own HEALTHCHECK run; a load failure on /health stops the check at once), POST /caption, /metrics counts it.
#      Then a second container on the warm volume: /ready; then a third without --shm-size (the runtime's 64 MB
#      /dev/shm): it must serve, on vLLM's uni executor, and say so.
#
# Quirks of sandboxed machines are flags of this check, never of the image (each also an environment variable):
#   --isolation chroot     buildah's RUN isolation (DOCKER_CHECK_ISOLATION)
#   --runtime runc         OCI runtime for podman (DOCKER_CHECK_RUNTIME)
#   --cgroup-manager cgroupfs   podman's cgroup manager; cgroupfs is chosen where systemd is not running
#   --ulimits              pass this shell's own nofile/nproc limits (where podman cannot raise them: no
#                          CAP_SYS_RESOURCE; chosen automatically then)
#   --network host         host networking for the build and the containers (DOCKER_CHECK_NETWORK)
#   --keep-base            keep a stand-in base image this run made (the next run skips mmdebstrap)
#   --image TAG            skip the build and check an image already built (kept afterwards)
#   --keep-image           keep the image this run built (printed at the end)
#   --timeout S            seconds to wait for /ready (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."

ISOLATION=${DOCKER_CHECK_ISOLATION:-}
RUNTIME=${DOCKER_CHECK_RUNTIME:-}
CGROUP_MANAGER=${DOCKER_CHECK_CGROUP_MANAGER:-}
NETWORK=${DOCKER_CHECK_NETWORK:-}
ULIMITS=${DOCKER_CHECK_ULIMITS:-auto}
KEEP_BASE=${DOCKER_CHECK_KEEP_BASE:-0}
READY_TIMEOUT=${DOCKER_CHECK_TIMEOUT:-600}
GIVEN_IMAGE=
KEEP_IMAGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --isolation) ISOLATION=$2; shift ;;
    --runtime) RUNTIME=$2; shift ;;
    --cgroup-manager) CGROUP_MANAGER=$2; shift ;;
    --network) NETWORK=$2; shift ;;
    --ulimits) ULIMITS=1 ;;
    --no-ulimits) ULIMITS=0 ;;
    --keep-base) KEEP_BASE=1 ;;
    --image) GIVEN_IMAGE=$2; shift ;;
    --keep-image) KEEP_IMAGE=1 ;;
    --timeout) READY_TIMEOUT=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "docker-check: unknown flag $1 (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done

BASE=python:3.11-slim-bookworm
RUN_ID=$$
TAG=localhost/sevi-serve:check-$RUN_ID
VOLUME=sevi-check-cache-$RUN_ID
WORK=$(mktemp -d /tmp/sevi-docker-check.XXXXXX)
CONTAINERS=()
MADE_BASE=0
say() { printf '[docker-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---- 1. tools ---------------------------------------------------------------------------------------------------
need=()
for tool in buildah podman; do command -v $tool >/dev/null || need+=("$tool"); done
command -v runc >/dev/null || command -v crun >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${need[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    die "needs ${need[*]} (install them, or run as root on Debian/Ubuntu so this check can)"
  fi
fi

# ---- sandbox quirks: flags of the check ---------------------------------------------------------------------------
[ -n "$CGROUP_MANAGER" ] || { [ -d /run/systemd/system ] && CGROUP_MANAGER=systemd || CGROUP_MANAGER=cgroupfs; }
if [ "$ULIMITS" = auto ]; then
  # CAP_SYS_RESOURCE is bit 24 of the effective capabilities: without it podman cannot raise a container's limits.
  capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
  if (( (16#$capeff >> 24) & 1 )); then ULIMITS=0; else ULIMITS=1; fi
fi
PODMAN=(podman --cgroup-manager "$CGROUP_MANAGER")
[ -z "$RUNTIME" ] || PODMAN+=(--runtime "$RUNTIME")
BUILD_FLAGS=(--format docker --layers=false)
[ -z "$ISOLATION" ] || BUILD_FLAGS+=(--isolation "$ISOLATION")
[ -z "$NETWORK" ] || BUILD_FLAGS+=(--network "$NETWORK")
RUN_FLAGS=()
# This shell's own limits, nproc capped (runc could not set RLIMIT_NPROC to the shell's own 96367 in a sandbox
# without CAP_SYS_RESOURCE, while a lower value is always allowed).
nproc=$(ulimit -Su); [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
[ "$ULIMITS" = 0 ] || RUN_FLAGS+=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")
# Without systemd podman cannot time the image's HEALTHCHECK (it logs that it cannot reach systemd): the check
# runs it itself (podman healthcheck run).
say "flags: cgroup-manager=$CGROUP_MANAGER runtime=${RUNTIME:-default} isolation=${ISOLATION:-default}" \
    "network=${NETWORK:-default} ulimits=$([ "$ULIMITS" = 1 ] && echo this-shell || echo default)"

cleanup() {
  local rc=$?
  for c in "${CONTAINERS[@]}"; do "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
  "${PODMAN[@]}" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  if [ -n "$GIVEN_IMAGE" ] || [ "$KEEP_IMAGE" = 1 ]; then say "image kept: $TAG"; else "${PODMAN[@]}" rmi -f "$TAG" >/dev/null 2>&1 || true; fi
  if [ "$MADE_BASE" = 1 ] && [ "$KEEP_BASE" != 1 ]; then "${PODMAN[@]}" rmi -f "localhost/$BASE" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
  [ $rc = 0 ] && say "cleaned up" || say "cleaned up after a failure (exit $rc)"
}
trap cleanup EXIT

# ---- 2. the base image ------------------------------------------------------------------------------------------
if "${PODMAN[@]}" image exists "$BASE" 2>/dev/null; then
  say "base image $BASE: already here"
elif timeout 60 "${PODMAN[@]}" pull -q "docker.io/library/$BASE" >/dev/null 2>&1; then
  say "base image $BASE: pulled from docker.io"
else
  command -v mmdebstrap >/dev/null || {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "no registry answers and mmdebstrap is missing"
    say "installing mmdebstrap with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  }
  say "base image $BASE: no registry answers; making a stand-in with mmdebstrap (Debian bookworm, python3.11)"
  t0=$(now)
  # python3.11-venv: the real image's python has venv built in; -dev: its headers (torch.compile builds C++).
  mmdebstrap --variant=minbase --include=python3.11,python3.11-venv,python3.11-dev,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' --dpkgopt='path-exclude=/usr/share/doc/*' \
    bookworm "$WORK/base.tar" >"$WORK/mmdebstrap.log" 2>&1 || { tail -20 "$WORK/mmdebstrap.log"; die "mmdebstrap"; }
  "${PODMAN[@]}" import -q --change 'CMD ["python3.11"]' "$WORK/base.tar" "localhost/$BASE" >/dev/null
  rm -f "$WORK/base.tar"
  MADE_BASE=1
  say "stand-in base made in $(elapsed "$t0" "$(now)") s"
fi

# ---- 3. this machine's pip settings, mounted for the build only -------------------------------------------------
# `pip config list` shows every setting pip will use (its files and PIP_* variables; a variable wins). They are
# written to one pip.conf that the build reads through PIP_CONFIG_FILE; each local path they name (a CA bundle, a
# wheel folder, a file:// index with the files beside it, a constraints file) is mounted read-only inside the
# pip.conf's own folder and the setting rewritten to point there, so the image keeps one empty folder at most.
PIP_CONF_DIR=/run/sevi-docker-check-pip
PIP=(python3 -m pip)
command -v python3.11 >/dev/null && PIP=(python3.11 -m pip)
mkdir -p "$WORK/pip"
mapfile -t MOUNTS < <("${PIP[@]}" config list 2>/dev/null | python3 -c '
import os, re, sys
host_dir, inside = sys.argv[1], sys.argv[2]
settings = {}
for line in sys.stdin:
    m = re.match(r"^(:env:|[^.]+)\.([a-z0-9-]+)=(.*)$", line.strip())
    if not m:
        continue
    where, key, value = m.group(1), m.group(2), m.group(3).strip("\x27\"")
    if where == ":env:" or key not in settings:
        settings[key] = value
mounts = {}
def local(value: str) -> str:
    path = value[len("file://"):] if value.startswith("file://") else value
    if not path.startswith("/") or not os.path.exists(path):
        return value
    # a file:// index page may point beside it (../files/...): mount the folder that holds the index
    root = os.path.dirname(path.rstrip("/")) if value.startswith("file://") else path
    name = mounts.setdefault(root, f"m{len(mounts)}")
    moved = f"{inside}/{name}{path[len(root):]}"
    return "file://" + moved if value.startswith("file://") else moved
with open(os.path.join(host_dir, "pip.conf"), "w") as conf:
    conf.write("[global]\n")
    for key, value in settings.items():
        moved = " ".join(local(v) for v in value.split())
        conf.write(f"{key} = {moved}\n")
for root, name in mounts.items():
    point = os.path.join(host_dir, name)  # the mount point lies in the mounted folder, not in the image
    if os.path.isdir(root):
        os.makedirs(point, exist_ok=True)
    else:
        open(point, "a").close()
    print(f"--volume={root}:{inside}/{name}:ro")
' "$WORK/pip" "$PIP_CONF_DIR")
[ -s "$WORK/pip/pip.conf" ] || die "could not read pip's settings (pip config list)"
MOUNTS=(--volume="$WORK/pip:$PIP_CONF_DIR:ro" "${MOUNTS[@]}")
say "pip settings for the build: $(($(wc -l <"$WORK/pip/pip.conf") - 1)) from this machine, $((${#MOUNTS[@]} - 1)) local paths mounted"

# ---- build --------------------------------------------------------------------------------------------------------
if [ -n "$GIVEN_IMAGE" ]; then
  TAG=$GIVEN_IMAGE BUILD_S="(not built: --image)"
else
  say "building the CPU image (log: $WORK/build.log)"
  t0=$(now)
  buildah bud "${BUILD_FLAGS[@]}" --pull=never --build-arg VLLM=cpu --build-arg "PIP_CONFIG_FILE=$PIP_CONF_DIR/pip.conf" \
    "${MOUNTS[@]}" -t "$TAG" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "image build"; }
  BUILD_S=$(elapsed "$t0" "$(now)")
fi
SIZE_B=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
SIZE_GB=$(awk -v b="$SIZE_B" 'BEGIN { printf "%.2f", b / 1e9 }')
HEALTH=$("${PODMAN[@]}" image inspect "$TAG" | python3 -c '
import json, sys
image = json.load(sys.stdin)[0]
check = image.get("Healthcheck") or image.get("Config", {}).get("Healthcheck")
print(" ".join(check["Test"]) if check else "")')
[ -n "$HEALTH" ] || die "the image carries no HEALTHCHECK (built in OCI format?)"
say "built in $BUILD_S s: $SIZE_GB GB; healthcheck: $HEALTH"

# ---- 4. run, probe, run again on the warm cache ------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
"${PODMAN[@]}" volume create "$VOLUME" >/dev/null

# Containers get --shm-size 1g as the README and the compose file say: vLLM's mp executor keeps its worker queues
# in /dev/shm (~400 MiB). The last container is started without it (a runtime's default 64 MB) and must still serve.
start() {  # start NAME [RUN FLAGS...]: a container with the bundled model and the cache volume
  local name=$1 net=()
  shift
  if [ -n "$NETWORK" ]; then net=(--network "$NETWORK" -e "SEVI_PORT=$PORT"); else net=(-p "127.0.0.1:$PORT:8000"); fi
  CONTAINERS+=("$name")
  "${PODMAN[@]}" run -d --name "$name" "${RUN_FLAGS[@]}" "${net[@]}" "$@" \
    -v "$PWD/models/bundled:/models/model:ro" -v "$VOLUME:/root/.cache" \
    -e SEVI_VLLM_CPU_KV_CACHE_GIB=1 "$TAG" >/dev/null
}

wait_ready() {  # wait_ready NAME T0: poll /ready, then the image's own healthcheck; echoes seconds to ready
  local name=$1 t0=$2 deadline
  deadline=$(awk -v t="$t0" -v d="$READY_TIMEOUT" 'BEGIN { printf "%.0f", t + d }')
  until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/ready" 2>/dev/null; do
    if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$name")" != true ]; then
      "${PODMAN[@]}" logs --tail 40 "$name" >&2; die "container $name exited before /ready"
    fi
    if awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n > d) }'; then
      "${PODMAN[@]}" logs --tail 40 "$name" >&2; die "no /ready from $name within $READY_TIMEOUT s"
    fi
    # A model that failed to load never gets ready: /health says so at once, with the cause.
    # (Output read whole before grep: with pipefail, `grep -q` quitting at a match fails the writer with SIGPIPE.)
    health=$(curl -sS "http://127.0.0.1:$PORT/health" 2>/dev/null || true)
    if grep '"status": *"error"' <<<"$health" >/dev/null; then
      "${PODMAN[@]}" logs --tail 5 "$name" >&2
      die "container $name failed to load the model: $(curl -sS "http://127.0.0.1:$PORT/health")"
    fi
    sleep 0.25
  done
  elapsed "$t0" "$(now)"
  # The image's HEALTHCHECK, run as the engine would (podman runs it on demand without systemd's timers).
  "${PODMAN[@]}" healthcheck run "$name" >/dev/null || die "the image's HEALTHCHECK fails on a ready container"
}

say "starting a container on the empty cache volume"
t0=$(now); start sevi-check-cold-$RUN_ID --shm-size 1g
COLD_S=$(wait_ready sevi-check-cold-$RUN_ID "$t0")
say "ready in $COLD_S s (cold); image's HEALTHCHECK: healthy"

sample=server/playground/static/samples/kitchen.png
reply=$(curl -fsS "http://127.0.0.1:$PORT/caption" -F "image=@$sample" -F conservativeness=0.5 -F max_tokens=24) \
  || die "POST /caption"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["caption"].strip() and r["usage"]["completion_tokens"] > 0, r; print("caption:", r["caption"])' "$reply" \
  || die "POST /caption answered without a caption: $reply"
metrics=$(curl -fsS "http://127.0.0.1:$PORT/metrics") || die "GET /metrics"
echo "$metrics" | grep -E '^sevi_requests_total\{.*caption.*status="200".*\} [1-9]' >/dev/null \
  || { echo "$metrics" | grep '^sevi_requests' >&2; die "/metrics does not count the caption"; }
say "POST /caption answered; /metrics counts it"

"${PODMAN[@]}" stop -t 10 sevi-check-cold-$RUN_ID >/dev/null
"${PODMAN[@]}" rm sevi-check-cold-$RUN_ID >/dev/null
say "starting a new container on the warm cache volume"
t0=$(now); start sevi-check-warm-$RUN_ID --shm-size 1g
WARM_S=$(wait_ready sevi-check-warm-$RUN_ID "$t0")
CACHE=$("${PODMAN[@]}" run --rm "${RUN_FLAGS[@]}" -v "$VOLUME:/root/.cache" --entrypoint du "$TAG" -sh /root/.cache | cut -f1)
say "ready in $WARM_S s (warm cache volume: $CACHE)"
"${PODMAN[@]}" stop -t 10 sevi-check-warm-$RUN_ID >/dev/null
"${PODMAN[@]}" rm sevi-check-warm-$RUN_ID >/dev/null

say "starting a container without --shm-size (the runtime's default /dev/shm)"
t0=$(now); start sevi-check-smallshm-$RUN_ID
SMALL_S=$(wait_ready sevi-check-smallshm-$RUN_ID "$t0")
SMALL_LOG=$("${PODMAN[@]}" logs sevi-check-smallshm-$RUN_ID 2>&1)
grep 'vLLM executor: uni' <<<"$SMALL_LOG" >/dev/null \
  || die "with a small /dev/shm the server did not say it took the uni executor"
say "ready in $SMALL_S s on the uni executor (its log names --shm-size)"

echo
echo "docker-check passed: build ${BUILD_S} s, image ${SIZE_GB} GB, ready ${COLD_S} s cold / ${WARM_S} s warm /" \
     "${SMALL_S} s warm with the default /dev/shm" \
     "(cache volume ${CACHE}; base: $([ "$MADE_BASE" = 1 ] && echo stand-in made this run || echo reused or pulled))"
