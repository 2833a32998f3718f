"""The compose stack, checked without a Docker engine: ``docker-compose.yml``, ``ops/Dockerfile``,
``ops/prometheus.yml``, the Grafana provisioning and ``example.env``.

Every command a service runs is re-run here with ``--help`` from the installed package, every
``TOKENRELAY_*`` variable the stack sets is one the settings read, and every health check's
executable exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.settings import ENV_PREFIX, KNOWN_VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
PROMETHEUS = ROOT / "ops" / "prometheus.yml"
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tokenrelay.json"
EXAMPLE_ENV = ROOT / "example.env"
BIN = Path(sys.executable).parent

APP_SERVICES = ("mock-upstream", "worker", "gateway")
MONITORING = ("prometheus", "grafana")

#: The metrics the workers and the gateway export (histograms also as _bucket/_count/_sum).
METRICS = frozenset(
    {
        "tokenrelay_jobs_finished_total",
        "tokenrelay_tokens_published_total",
        "tokenrelay_time_to_first_token_seconds",
        "tokenrelay_inter_token_gap_seconds",
        "tokenrelay_active_streams",
        "tokenrelay_upstream_errors_total",
        "tokenrelay_upstream_retries_total",
        "tokenrelay_restarts_total",
        "tokenrelay_takeovers_total",
        "tokenrelay_publish_seconds",
        "tokenrelay_queue_depth",
        "tokenrelay_running_jobs",
        "tokenrelay_gateway_streams",
        "tokenrelay_gateway_feed_frames",
        "tokenrelay_gateway_requests_total",
    }
)
HISTOGRAMS = (
    "tokenrelay_time_to_first_token_seconds",
    "tokenrelay_inter_token_gap_seconds",
    "tokenrelay_publish_seconds",
)

SECRET_NAME = re.compile(r"API_KEY|KEYS$|PASSWORD|SECRET|TOKEN(?!RELAY)", re.I)
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


# --- helpers -----------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = load_compose()["services"]
    assert isinstance(found, dict)
    return found


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment_of(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's ``environment``, in either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {name: value for name, value in pairs}
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """What compose makes of ``value`` with no shell variable and no ``.env`` set."""

    def replace(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        assert operator is None or "?" not in operator, f"${{{name}}} is required"
        return default if operator and "-" in operator else ""

    return INTERPOLATION.sub(replace, value)


def resolved_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(v or "") for k, v in environment_of(service).items()}


def duration_seconds(text: str) -> float:
    """Compose's duration format: ``1m30s``, ``40s``, ``500ms``, ``1h``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def env_file_lines(path: Path) -> list[tuple[str, str, bool]]:
    """``(name, value, commented)`` of every ``NAME=value`` line, commented out or not."""
    found = []
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found.append((match[2], match[3].strip(), bool(match[1])))
    return found


def run_help(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a service's command from this venv's bin with ``--help`` appended."""
    executable = BIN / argv[0]
    assert executable.exists(), f"{argv[0]} is not installed in {BIN.name}/"
    return subprocess.run(
        [str(executable), *argv[1:], "--help"],
        cwd=ROOT,
        env={"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(dashboard_panels(panel.get("panels", [])))
    return found


# --- the compose file ---------------------------------------------------------------------------


def test_compose_has_the_services_and_the_monitoring_profile() -> None:
    found = services()
    for name in ("redis", *APP_SERVICES):
        assert name in found, name
        assert not found[name].get("profiles"), f"{name} must start without a profile"
    for name in MONITORING:
        assert name in found, name
        assert found[name].get("profiles") == ["monitoring"], name


def test_redis_persists_with_append_only_and_has_a_health_check() -> None:
    redis = services()["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = command_of(redis)
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.split(":")[1] == "/data" for volume in redis["volumes"])
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_one_image_built_from_ops_dockerfile_for_every_app_service() -> None:
    found = services()
    builds = {json.dumps(found[name].get("build"), sort_keys=True) for name in APP_SERVICES}
    assert len(builds) == 1, "the app services must share one build"
    build = found["worker"]["build"]
    assert build["dockerfile"] == "ops/Dockerfile"
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert len({found[name].get("image") for name in APP_SERVICES}) == 1
    others = [name for name, service in found.items() if name not in APP_SERVICES]
    assert all("build" not in found[name] for name in others), "third-party images only"


def test_worker_scales_uses_gevent_and_outlives_the_shutdown_grace() -> None:
    worker = services()["worker"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"worker sets {key}: `--scale worker=N` would collide"
    command = command_of(worker)
    assert command[:4] == ["celery", "-A", "worker", "worker"]
    pool = command[command.index("-P") + 1] if "-P" in command else None
    assert pool == "gevent" or "--pool=gevent" in command
    grace = Settings.from_env(resolved_env(worker)).shutdown_grace
    assert duration_seconds(str(worker["stop_grace_period"])) > grace


def test_gateway_publishes_port_8000() -> None:
    gateway = services()["gateway"]
    command = command_of(gateway)
    assert command[command.index("--port") + 1] == "8000"
    published = [str(p) for p in gateway["ports"]]
    assert any(p.rsplit(":", 1)[-1] == "8000" and p.count(":") >= 1 for p in published)


def test_no_secret_is_written_in_the_compose_file() -> None:
    for name, service in services().items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key) and value:
                assert INTERPOLATION.fullmatch(value), f"{name}: {key} is set inline"
                assert not interpolate(value), f"{name}: {key} has a default value"
    worker, gateway = services()["worker"], services()["gateway"]
    # The upstream key reaches the worker only from the git-ignored .env file ...
    assert "TOKENRELAY_UPSTREAM_API_KEY" not in environment_of(worker)
    assert worker["env_file"] == [{"path": ".env", "required": False}]
    # ... and never the gateway.
    assert "env_file" not in gateway
    assert not any("UPSTREAM_API_KEY" in key for key in environment_of(gateway))


def test_env_file_is_git_ignored_and_example_env_is_not() -> None:
    def ignored(path: str) -> bool:
        done = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=ROOT, check=False, timeout=30
        )
        assert done.returncode in (0, 1), "git check-ignore failed"
        return done.returncode == 0

    assert ignored(".env")
    assert not ignored("example.env")


def test_every_tokenrelay_variable_is_one_the_settings_know() -> None:
    text = COMPOSE.read_text()
    named = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", text))
    for service in services().values():
        named |= {key for key in environment_of(service) if key.startswith(ENV_PREFIX)}
    named |= {name for name, _, _ in env_file_lines(EXAMPLE_ENV) if name.startswith(ENV_PREFIX)}
    assert named, "no TOKENRELAY_* variable found"
    assert named <= KNOWN_VARIABLES, f"unknown: {sorted(named - KNOWN_VARIABLES)}"


def test_every_app_service_environment_is_a_valid_configuration() -> None:
    for name in APP_SERVICES:
        Settings.from_env(resolved_env(services()[name]))  # raises naming the variable


def test_example_env_holds_no_secret_value() -> None:
    lines = env_file_lines(EXAMPLE_ENV)
    assert any(name == "TOKENRELAY_UPSTREAM_API_KEY" for name, _, _ in lines)
    for name, value, _ in lines:
        if SECRET_NAME.search(name):
            assert value == "", f"example.env gives {name} a value"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_service_command_runs_with_help(name: str) -> None:
    service = services()[name]
    command = command_of(service)
    done = run_help(command, resolved_env(service))
    assert done.returncode == 0, done.stderr
    # Appending --help stops parsing early: check every option the subcommand is given is one
    # its help offers (`celery -A worker worker -P gevent`: the options after `worker`).
    start = 1
    while command[start].startswith("-"):
        start += 1 if "=" in command[start] else 2
    for option in (arg.split("=", 1)[0] for arg in command[start:] if arg.startswith("-")):
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", done.stdout, re.M), (
            f"{name}: {option} is not an option of {' '.join(command[:2])}"
        )


def test_every_health_check_executable_exists() -> None:
    for name, service in services().items():
        if "healthcheck" not in service:
            continue
        test = service["healthcheck"]["test"]
        if isinstance(test, str):
            argv = shlex.split(test)
        elif test[0] == "CMD-SHELL":
            argv = shlex.split(test[1])
        else:
            assert test[0] == "CMD", f"{name}: health check test must start with CMD"
            argv = [str(a) for a in test[1:]]
        if name == "redis":
            assert shutil.which(argv[0]), f"{argv[0]} is not on PATH (Debian: redis-tools)"
        else:
            assert (BIN / argv[0]).exists(), f"{name}: {argv[0]} is not in the venv"
    for name in APP_SERVICES:
        assert "healthcheck" in services()[name], name


@pytest.mark.parametrize("name", ["worker", "gateway"])
def test_tokenrelay_health_command_exists(name: str) -> None:
    service = services()[name]
    argv = [str(a) for a in service["healthcheck"]["test"][1:]]
    assert argv[:2] == ["tokenrelay", "health"]
    done = run_help(argv, resolved_env(service))
    assert done.returncode == 0, done.stderr
    for option in (arg for arg in argv[2:] if arg.startswith("-")):
        assert option in done.stdout, f"tokenrelay health has no {option}"


def test_mock_upstream_health_check_passes_against_a_real_mock() -> None:
    service = services()["mock-upstream"]
    test = [str(a) for a in service["healthcheck"]["test"]]
    assert test[:3] == ["CMD", "python", "-c"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = command_of(service)
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    mock = subprocess.Popen(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code = test[3].replace(":8001/", f":{port}/")
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=10
            )
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert done.returncode == 0, done.stderr
    finally:
        mock.terminate()
        mock.wait(timeout=10)


def test_every_mounted_file_exists() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts a missing {source}"


def has_compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(not has_compose_plugin(), reason="no docker compose plugin")
def test_docker_compose_accepts_the_file() -> None:
    done = subprocess.run(
        ["docker", "compose", "--profile", "monitoring", "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_and_installs_the_checkout() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    bases = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", b) for b in bases), bases
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    text = "\n".join(lines)
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)
    assert not re.search(r"(API_KEY|PASSWORD|SECRET)", text, re.I), "no secret in the image"
    exposed = {port for line in lines if line.startswith("EXPOSE ") for port in line.split()[1:]}
    assert {"8000", "8001", "9808"} <= exposed


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".git", ".venv"} <= patterns


# --- Prometheus and Grafana ---------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_replica_and_the_gateway() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    worker_env = resolved_env(services()["worker"])
    worker = jobs["worker"]
    assert worker.get("metrics_path", "/metrics") == "/metrics"
    (dns,) = worker["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["type"] == "A"
    assert str(dns["port"]) == worker_env["TOKENRELAY_METRICS_PORT"] != "0"
    gateway = jobs["gateway"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    (static,) = gateway["static_configs"]
    assert static["targets"] == ["gateway:8000"]
    mounts = services()["prometheus"]["volumes"]
    assert "./ops/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/tokenrelay.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    mounts = dict(str(v).split(":")[:2] for v in services()["grafana"]["volumes"])
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard_panels(dashboard["panels"]):
        if panel.get("type") != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def test_dashboard_queries_only_exported_metrics_and_all_of_them() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    assert exprs
    used = set()
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for name in re.findall(r"\btokenrelay_\w+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            known = base in METRICS and (base == name or base in HISTOGRAMS)
            assert known or name in METRICS, f"unknown metric {name} in {expr!r}"
            used.add(base if known else name)
        if "histogram_quantile" in expr:
            assert "_bucket[" in expr and " by (le" in expr.replace("by(", "by ("), expr
    assert used == METRICS, f"no panel for {sorted(METRICS - used)}"
