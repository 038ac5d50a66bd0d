"""workers/ deployment files, checked here without Docker or systemd: each file parses, names files that
exist, and the commands it runs start and work against the local broker (a federation runs from
workers/compose.yml's commands; the systemd unit's command starts, consumes and stops cleanly on SIGTERM)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedq import cli
from fedq.broker import Management, q
from fedq.topology import Names

ROOT = Path(__file__).parent.parent
WORKERS = ROOT / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_image_installs_fedq_and_runs_its_command() -> None:
    dockerfile = (WORKERS / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert re.search(r'^ENTRYPOINT \["fedq"\]$', dockerfile, re.M)
    assert 'fedq = "fedq.cli:main"' in (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r"torch==[\d.]+", (ROOT / "Makefile").read_text())
    assert (
        torch_pin
        and f"pip install {torch_pin[0]} --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    )
    assert subprocess.run([sys.executable, "-m", "fedq", "--help"], capture_output=True).returncode == 0


def compose() -> dict:
    return yaml.safe_load((WORKERS / "compose.yml").read_text())


def test_compose_services_build_the_image_and_parse_as_fedq_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = compose()
    base = ROOT / "monitoring"  # paths are relative to the first compose file's folder
    for name, service in spec["services"].items():
        assert (base / service["build"]["context"] / service["build"]["dockerfile"]).exists(), name
        assert service["image"] == "fedq-worker"
        if name == "init":
            continue
        secret = tmp_path / "amqp-url"
        secret.write_text("amqp://guest:guest@127.0.0.1:5672/%2F")
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, str(secret) if key == "FEDQ_AMQP_URL_FILE" else str(value))
        args = cli._parse([str(x) for x in service["command"]])
        assert args.amqp_url == "amqp://guest:guest@127.0.0.1:5672/%2F", name
    assert spec["secrets"]["fedq-amqp-url"]["file"] == "../workers/amqp-url"
    assert "/workers/amqp-url" in (ROOT / ".gitignore").read_text()  # a secret is never committed
    monitoring = yaml.safe_load((ROOT / "monitoring" / "docker-compose.yml").read_text())
    assert "rabbitmq" in monitoring["services"]  # what the workers' depends_on names
    prometheus = (ROOT / "monitoring" / "prometheus.yml").read_text()
    for service in spec["services"].values():
        for port in service.get("ports", []):
            assert f"host.docker.internal:{port.rsplit(':', 1)[1]}" in prometheus


def _run(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def _container_command(service: dict, remap: dict[str, str]) -> list[str]:
    """The service's command as the container runs it (entry point ``fedq`` unless set), paths remapped."""
    entry = service.get("entrypoint", [sys.executable, "-m", "fedq"])
    if entry[0] == "python":
        entry = [sys.executable, *entry[1:]]
    command = [*entry, *(str(x) for x in service["command"])]
    for inside, outside in remap.items():
        command = [c.replace(inside, outside) for c in command]
    return command


@pytest.mark.broker
@pytest.mark.slow
def test_a_federation_runs_from_the_compose_services_commands(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    spec = compose()["services"]
    secret = tmp_path / "amqp-url"
    secret.write_text(amqp_url)
    remap = {"/models": str(tmp_path / "models")}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        init = subprocess.run(_container_command(spec["init"], remap), capture_output=True, text=True)
        assert init.returncode == 0, init.stderr
        assert (tmp_path / "models" / "init.safetensors").exists()
        for name in ("aggregator-0", "aggregator-1", "client"):
            service = spec[name]
            env = os.environ | {k: str(v) for k, v in service["environment"].items()}
            env |= {"FEDQ_AMQP_URL_FILE": str(secret), "FEDQ_NAMESPACE": names.namespace,
                    "PYTHONPATH": str(ROOT)}  # fmt: skip
            command = _container_command(service, remap | {"/var/lib/fedq": str(tmp_path / name)})
            port = command.index("--metrics-port") + 1
            command[port] = str(free_port())  # the host's ports may be taken; the container's are its own
            processes[name] = _run(command, env, tmp_path / f"{name}.log")
        log = tmp_path / "aggregator-0.log"
        deadline = time.monotonic() + 240
        while "version 1 announced" not in log.read_text() and time.monotonic() < deadline:
            exited = [n for n, p in processes.items() if p.poll() is not None]
            assert not exited, [(tmp_path / f"{n}.log").read_text()[-2000:] for n in exited]
            time.sleep(1)
        assert "version 1 announced (2 shards)" in log.read_text()
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)  # what `docker compose stop` sends (stop_signal)
        codes = {name: p.wait(60) for name, p in processes.items()}
    assert codes == dict.fromkeys(processes, 0), {
        n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in codes
    }
    for shard in ("aggregator-0", "aggregator-1"):
        assert "SIGTERM received, stopping" in (tmp_path / f"{shard}.log").read_text()


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(WORKERS / "systemd" / name)
    return parser


def env_file(name: str) -> dict[str, str]:
    lines = (WORKERS / "systemd" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.mark.broker
def test_the_systemd_unit_starts_an_aggregator_that_stops_cleanly_on_its_kill_signal(
    amqp_url: str, management: Management, vhost: str, names: Names, tmp_path: Path
) -> None:
    aggregator = unit("fedq-aggregator@.service")
    service = aggregator["Service"]
    assert service["KillSignal"] == "SIGTERM" and service["User"] == "fedq"
    assert unit("fedq-client.service")["Service"]["ExecStart"].split()[1:3] == ["client", "--name"]
    assert {"fedq.env", "aggregator-0.env"} <= {p.name for p in (WORKERS / "systemd").iterdir()}
    secret = tmp_path / "amqp-url"
    secret.write_text(amqp_url)
    init = tmp_path / "init.safetensors"
    assert subprocess.run([sys.executable, "-m", "workers.demo_init", str(init)], cwd=ROOT).returncode == 0
    env = os.environ | env_file("fedq.env") | env_file("aggregator-0.env")
    env |= {"FEDQ_AMQP_URL_FILE": str(secret), "FEDQ_INIT": str(init), "FEDQ_NAMESPACE": names.namespace,
            "FEDQ_METRICS_PORT": str(free_port()), "FEDQ_SHARDS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    command = shlex.split(service["ExecStart"].replace("%i", "0").replace("/var/lib/fedq", str(tmp_path)))
    assert command[0] == "/opt/fedq/.venv/bin/fedq"
    process = _run([sys.executable, "-m", "fedq", *command[1:]], env, tmp_path / "unit.log")
    try:
        deadline = time.monotonic() + 120
        queue = names.updates_queue(0)
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "unit.log").read_text()
            if queue in str(management.get(f"/consumers/{q(vhost)}")):
                break
            time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "unit.log").read_text())
    finally:
        process.send_signal(signal.Signals[service["KillSignal"]])
        code = process.wait(int(service["TimeoutStopSec"]))
    text = (tmp_path / "unit.log").read_text()
    assert code == 0 and "shard 0: SIGTERM received, stopping" in text and "shard 0 stopped" in text, text
