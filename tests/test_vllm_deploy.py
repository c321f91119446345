"""What can be checked of the Docker deployment without Docker: files parse and use CI's own install."""

from __future__ import annotations

import functools
import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.repo import REPO


def test_compose_parses_with_healthcheck_and_prometheus() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("sevi-gpu", "sevi-cpu"):
        svc = services[name]
        assert svc["healthcheck"]["test"][-1].endswith("/ready")
        assert "sevi" in svc["networks"]["default"]["aliases"]
        assert svc["environment"]["SEVI_ENGINE"] == "vllm"
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["sevi:8000"]
    mount = services["prometheus"]["volumes"][0].split(":")[0]
    assert (REPO / mount).resolve() == (REPO / "deploy" / "prometheus.yml").resolve()
    # The compile cache outlives containers: a named volume on ~/.cache, which TORCHINDUCTOR_CACHE_DIR is under.
    for name in ("sevi-gpu", "sevi-cpu"):
        (cache,) = [v for v in services[name]["volumes"] if v.endswith(":/root/.cache")]
        assert cache.split(":")[0] in compose["volumes"], name
    assert re.search(r"TORCHINDUCTOR_CACHE_DIR=/root/\.cache/", (REPO / "Dockerfile").read_text())
    # vLLM's mp executor needs ~400 MiB of /dev/shm (the engine falls back to uni below that): both services have it.
    assert services["sevi-gpu"]["ipc"] == "host"
    shm = services["sevi-cpu"]["shm_size"]
    assert shm.endswith("g") and float(shm[:-1]) >= 1


def _make_installs(vllm: str) -> set[str]:
    """The extras that `make install VLLM=<vllm>` installs the project with, read from what it would run (make -n)
    into a venv that does not exist yet (so every step of the recipe is listed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = Path("/nonexistent-sevi-venv")
    dry = subprocess.run(
        ["make", "-n", "install", f"VLLM={vllm}", f"VENV={venv}"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    extras: set[str] = set()
    for line in dry.splitlines():
        argv = shlex.split(line) if line.strip() else []
        if argv[:2] == [str(venv / "bin" / "pip"), "install"] and "-e" in argv:
            target = argv[argv.index("-e") + 1]
            assert target.startswith(".["), target  # this checkout, editable
            extras |= set(target[2:].rstrip("]").split(","))
    return extras


def test_dockerfile_installs_with_the_makefile_recipe_ci_runs() -> None:
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"^RUN make install VLLM=\$VLLM", docker, re.M)
    for extra in ("cpu", "gpu"):
        assert _make_installs(extra) == {"dev", "ray", extra}, extra  # ray: the batch command's Ray tests
    ci = (REPO / ".ci" / "run").read_text()
    assert "make install" in ci
    for path in re.findall(r"^COPY (\S+) ", docker, re.M):
        for part in path.split():
            assert (REPO / part).exists(), part


def test_dockerfile_installs_the_runtime_alone_and_copies_what_bench_imports() -> None:
    """The image's `make install` line, run through make -n: the VLLM extra alone (no dev/test tools) and, on CPU,
    no triton unless the TRITON build argument asks for it."""
    docker = (REPO / "Dockerfile").read_text()
    (line,) = re.findall(r"^RUN (make install .*)$", docker, re.M)
    args = [a for a in shlex.split(line)[2:] if not a.startswith(("VLLM=", "PY="))]
    assert "EXTRAS=" in args
    triton_arg = [a for a in args if a.startswith("TRITON=")]
    assert triton_arg == ["TRITON=$TRITON"] and re.search(r"^ARG TRITON=$", docker, re.M)
    for vllm in ("cpu", "gpu"):
        make_args = [a for a in args if not a.startswith("TRITON=")] + [f"VLLM={vllm}", "TRITON="]
        dry = _make_pip_install_line(*make_args)
        assert dry.rstrip().endswith(f"-e '.[{vllm}]'"), dry
    if shutil.which("make") is not None:
        cpu_steps = subprocess.run(
            ["make", "-n", "install", "VENV=/nonexistent-sevi-venv", "VLLM=cpu", "EXTRAS=", "TRITON="],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (step,) = [x for x in cpu_steps.splitlines() if "triton" in x]
        assert re.search(r"pip uninstall -q -y [\w ]*\btriton\b", step) and "install -q triton" not in step, step
    # bench's CHAIR / object-logit tools import training at run time.
    assert re.search(r"^COPY training ", docker, re.M)
    assert re.search(r"^from training import", (REPO / "bench" / "object_logits.py").read_text(), re.M)


def test_docker_check_is_a_make_target_running_the_deploy_script() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        # --no-print-directory: under `make test` this make is a sub-make, which would print its directory
        ["make", "-n", "--no-print-directory", "docker-check", "DOCKER_CHECK_ARGS=--isolation chroot"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert dry.strip() == "deploy/docker-check.sh --isolation chroot"
    subprocess.run(["bash", "-n", str(REPO / "deploy" / "docker-check.sh")], check=True)


def test_dockerfile_run_commands_parse_as_shell() -> None:
    """Docker cannot run here: at least each RUN command (continuation lines joined) is valid sh."""
    docker = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    commands = re.findall(r"^RUN (.+)$", docker, re.M)
    assert len(commands) >= 2
    for command in commands:
        subprocess.run(["sh", "-n", "-c", command], check=True)


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _make_pip_install_line(*make_args: str) -> str:
    """The `pip install ... -e .[...]` line `make install` would run into a venv that does not exist yet."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        ["make", "-n", "install", "VENV=/nonexistent-sevi-venv", *make_args],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (line,) = [x for x in dry.splitlines() if "pip install" in x and " -e " in x]
    return line


def test_cpu_install_carries_pytorchs_cpu_index_and_gpu_install_does_not() -> None:
    cpu = _make_pip_install_line("VLLM=cpu")
    assert f"deploy/extra_index.py {TORCH_CPU_INDEX})" in cpu  # its output is spliced into pip's arguments
    assert cpu.index("extra_index.py") < cpu.index(" -e ")
    assert "extra_index" not in _make_pip_install_line("VLLM=gpu")
    assert "extra_index" not in _make_pip_install_line("VLLM=cpu", "TORCH_CPU_INDEX=")


def _extra_index(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "deploy" / "extra_index.py"), url], check=True, capture_output=True, text=True
    )


def test_extra_index_is_passed_when_the_index_answers_and_dropped_with_a_note_when_not(tmp_path: Path) -> None:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            answered = _extra_index(url)
        finally:
            httpd.shutdown()
    assert shlex.split(answered.stdout) == ["--extra-index-url", url + "/"]
    # The same port once nothing listens on it: refused at once, so the probe costs no retries.
    silent = _extra_index(url)
    assert silent.stdout == ""
    assert url in silent.stderr and "configured indexes only" in silent.stderr
