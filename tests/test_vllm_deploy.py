"""What can be checked of the Docker deployment without Docker: files parse and use CI's own install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compose_parses_with_healthcheck_and_prometheus() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("sevi-gpu", "sevi-cpu"):
        svc = services[name]
        assert svc["healthcheck"]["test"][-1].endswith("/ready")
        assert "sevi" in svc["networks"]["default"]["aliases"]
        assert svc["environment"]["SEVI_ENGINE"] == "vllm"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["sevi:8000"]
    mount = services["prometheus"]["volumes"][0].split(":")[0]
    assert (ROOT / mount).resolve() == (ROOT / "deploy" / "prometheus.yml").resolve()


def test_dockerfile_installs_with_the_makefile_recipe_ci_runs() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN make install VLLM=\$VLLM", docker, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[dev,$(VLLM)]'" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make install" in ci
    for path in re.findall(r"^COPY (\S+) ", docker, re.M):
        for part in path.split():
            assert (ROOT / part).exists(), part


def test_dockerfile_run_commands_parse_as_shell() -> None:
    """Docker cannot run here: at least each RUN command (continuation lines joined) is valid sh."""
    import subprocess

    docker = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    commands = re.findall(r"^RUN (.+)$", docker, re.M)
    assert len(commands) >= 2
    for command in commands:
        subprocess.run(["sh", "-n", "-c", command], check=True)
