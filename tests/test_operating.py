"""Operating fedq on the real broker: failures end in one line with their cause, the fix and an exit code;
settings come from the environment, secret files and TOML; a shard has one writer; signals stop cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import torch

from fedq import cli
from fedq.aggregation import checkpoint
from fedq.aggregation.service import Aggregator
from fedq.broker import Management, q
from fedq.errors import ConfigError
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect
from tests.aggregation_helpers import every_update, memory_broker, settings, small_model, write_init

ROOT = Path(__file__).parent.parent


def with_parts(url: str, *, password: str | None = None, vhost: str | None = None, port: int | None = None,
               host: str | None = None) -> str:  # fmt: skip
    parts = urlsplit(url)
    user = parts.username or "guest"
    netloc = (
        f"{quote(user)}:{quote(password if password is not None else parts.password or 'guest')}"
        f"@{host or parts.hostname}:{port or parts.port or 5672}"
    )
    path = "/" + quote(vhost, safe="") if vhost is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run a command that must fail; return its exit code and its one line of error."""
    started = time.monotonic()
    code = cli.main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if "WARNING" not in line]
    assert len(err) == 1, err
    assert time.monotonic() - started < 15, "a first connection must fail fast"
    return code, err[0]


@pytest.mark.broker
def test_a_first_connection_fails_fast_with_its_cause(
    amqp_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = str(tmp_path / "m.safetensors")
    budget = ("--memory-budget", "64GiB")  # this test process holds the test suite's memory already
    code, line = fails(capsys, "receive", out, *budget, "--amqp-url", with_parts(amqp_url, password="wrong"))
    assert code == 3 and "refused the login of user" in line and "wrong user or password" in line, line
    code, line = fails(
        capsys, "receive", out, *budget, "--amqp-url", with_parts(amqp_url, vhost="fedq-no-such-vhost")
    )
    assert code == 3 and "vhost 'fedq-no-such-vhost'" in line and "rabbitmqctl add_vhost" in line, line
    code, line = fails(
        capsys, "receive", out, *budget, "--amqp-url", with_parts(amqp_url, host="no-such-host.invalid")
    )
    assert code == 3 and "cannot resolve the broker host 'no-such-host.invalid'" in line, line
    code, line = fails(capsys, "receive", out, *budget, "--amqp-url", with_parts(amqp_url, port=9))
    assert code == 3 and "connection refused" in line and "is RabbitMQ running" in line, line
    assert not Path(out).exists()


@pytest.mark.broker
def test_broker_commands_name_the_management_plugin(
    amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = fails(capsys, "broker", "apply", "--management-url", "http://guest:guest@127.0.0.1:9")
    assert code == 3 and "rabbitmq-plugins enable rabbitmq_management" in line, line
    parts = urlsplit(amqp_url)
    wrong = f"http://{parts.username or 'guest'}:wrong@{parts.hostname}:15672"
    code, line = fails(capsys, "broker", "apply", "--management-url", wrong)
    assert code == 3 and "HTTP 401" in line and "administrator" in line, line


def test_options_come_from_the_environment_secret_files_and_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "amqp-url"
    secret.write_text("amqp://alice:from-a-file@broker:5672/%2F\n")
    config = tmp_path / "fedq.toml"
    config.write_text(
        'namespace = "from-toml"\n'
        f'amqp-url-file = "{secret}"\n'
        '[aggregator]\nshards = 3\nquorum = true\nmemory-budget = "32MiB"\n'
        '[broker.add-client]\nnamespace = "clients"\n'
    )
    monkeypatch.setenv("FEDQ_CONFIG_FILE", str(config))
    monkeypatch.delenv("FEDQ_AMQP_URL", raising=False)
    monkeypatch.setenv("FEDQ_SHARD", "2")
    args = cli._parse(["aggregator", "--init", "m.safetensors"])
    assert (args.namespace, args.shards, args.shard, args.quorum) == ("from-toml", 3, 2, True)
    assert args.amqp_url == "amqp://alice:from-a-file@broker:5672/%2F"
    assert args.memory_budget == 32 << 20
    assert cli._parse(["broker", "add-client", "bob"]).namespace == "clients"
    assert cli._parse(["aggregator", "--init", "m", "--shards", "4"]).shards == 4  # the command line wins
    assert cli._parse(["aggregator", "--init", "m", "--config", "local_steps=2"]).config == ["local_steps=2"]
    monkeypatch.setenv("FEDQ_NAMESPACE", "from-env")  # the environment wins over the file
    assert cli._parse(["status"]).namespace == "from-env"

    config.write_text("[aggregator]\nstate-dri = 'x'\n")
    assert cli.main(["status"]) == 2
    monkeypatch.setenv("FEDQ_QUORUM", "maybe")
    config.write_text("")
    assert cli.main(["aggregator", "--init", "m"]) == 2


def _start_aggregator(amqp_url: str, namespace: str, init: Path | None, state: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fedq", "aggregator", "--namespace", namespace,
               *(["--init", str(init)] if init else []), "--state-dir", str(state), "--device", "cpu",
               "--chunk-bytes", "64KiB", "--memory-budget", "1MiB"]  # fmt: skip
    env = os.environ | {"FEDQ_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def _wait_for_consumer(management: Management, vhost: str, queue: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = management.get(f"/queues/{q(vhost)}?columns=name,consumers")
        if any(r["name"] == queue and r.get("consumers") for r in rows):
            return
        time.sleep(0.5)
    raise AssertionError(f"no consumer on {queue}")


@pytest.mark.broker
def test_one_aggregator_per_shard_and_a_clean_stop_on_sigterm(
    amqp_url: str, management: Management, vhost: str, names: Names, tmp_path: Path
) -> None:
    init = tmp_path / "init.safetensors"
    save_file({"w": torch.zeros(64, 64), "b": torch.zeros(64)}, init)
    first = _start_aggregator(amqp_url, names.namespace, init, tmp_path / "state")
    try:
        _wait_for_consumer(management, vhost, names.updates_queue(0))
        same_dir = _start_aggregator(amqp_url, names.namespace, init, tmp_path / "state")
        _, err = same_dir.communicate(timeout=60)
        assert same_dir.returncode == 2, err
        assert err.strip().endswith("one process per shard state directory"), err
        assert f"in use by another aggregator (pid {first.pid})" in err
        elsewhere = _start_aggregator(amqp_url, names.namespace, init, tmp_path / "state-elsewhere")
        _, err = elsewhere.communicate(timeout=60)
        assert elsewhere.returncode == 3, err
        assert f"queue {names.updates_queue(0)} is already consumed by another worker" in err.splitlines()[-1]
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "shard 0: SIGTERM received, stopping" in err and "shard 0 stopped" in err, err
    assert "Traceback" not in err

    # A resumed shard needs no --init (it reads the model's tensors from its checkpoint); a fresh one does.
    fresh = _start_aggregator(amqp_url, names.namespace, None, tmp_path / "state-fresh")
    _, err = fresh.communicate(timeout=60)
    assert fresh.returncode == 2 and err.strip().endswith("holds no checkpoint to resume from"), err
    resumed = _start_aggregator(amqp_url, names.namespace, None, tmp_path / "state")
    assert resumed.stderr is not None
    lines: list[str] = []
    try:
        for line in resumed.stderr:  # until it has resumed (its SIGTERM handler is in place by then)
            lines.append(line)
            if "resumed at version" in line:
                break
    finally:
        resumed.send_signal(signal.SIGTERM)
        _, err = resumed.communicate(timeout=60)
    err = "".join(lines) + err
    assert resumed.returncode == 0 and "shard 0: resumed at version 0" in err, err


def _shard(broker: str, names: Names, init: Path | None, state: Path, shard: int, shards: int) -> None:
    """Construct (and so load or create) one in-memory shard; the constructor is where a shard is refused."""
    options = {"shard": shard, "shards": shards}
    with connect(f"memory://aggregator@{broker}") as transport:
        Aggregator(transport, settings(names, every_update(), init, state, **options))  # type: ignore[arg-type]


def test_a_shard_started_with_another_shard_count_than_its_topology_is_refused(tmp_path: Path) -> None:
    # The walk of 2026-11-29: `--shard 2 --shards 3` beside a running two-shard federation ran silently,
    # published a version 0 of a shard no one announces and left two queues behind; and a checkpoint written
    # under --shards 3 resumed under --shards 4.
    init, state = write_init(tmp_path, small_model()), tmp_path / "state"
    broker, names = memory_broker(shards=2)
    with connect(f"memory://shard0@{broker}") as running:
        running.consume(names.updates_queue(0), prefetch=1)  # shard 0 of the federation
        for shard, shards, declared in (
            (2, 3, "fewer than 3 shards, and runs"),
            (0, 1, "more than 1 shards"),
        ):
            with pytest.raises(ConfigError) as refused:
                _shard(broker, names, init, state, shard, shards)
            assert f"--shards {shards}: namespace {names.namespace} was declared with {declared}" in str(
                refused.value
            )
            assert not (state / f"shard-{shard}" / checkpoint.STATE).exists()  # nothing written
    # the last refusal (a queue beyond the worker's shards): what to delete where a stray worker left it
    assert f"rabbitmqctl delete_queue {names.updates_queue(1)}" in str(refused.value)
    assert names.control_queue(1) in str(refused.value)
    _shard(broker, names, init, state, 0, 2)  # writes version 0 of shard 0 of 2
    wider, wider_names = memory_broker(shards=3)
    with pytest.raises(ConfigError) as refused:
        _shard(wider, wider_names, None, state, 0, 3)
    assert "shard-0 holds shard 0 of 2 shards, not of --shards 3: start it with --shards 2" in str(
        refused.value
    )
    # a topology nobody runs yet grows to the worker's shards, as broker_config/definitions.json (one shard)
    # under workers/compose.yml (two) needs
    fresh, fresh_names = memory_broker(shards=1)
    _shard(fresh, fresh_names, init, tmp_path / "fresh", 1, 2)


@pytest.mark.broker
def test_a_shard_count_that_differs_from_broker_apply_is_one_line_and_exit_2(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    init = tmp_path / "init.safetensors"
    save_file({"w": torch.zeros(64, 64), "b": torch.zeros(64)}, init)
    shard = ["--init", str(init), "--state-dir", str(tmp_path / "s"), "--shard", "2", "--shards", "3"]
    command = [sys.executable, "-m", "fedq", "aggregator", "--namespace", names.namespace, *shard]
    env = os.environ | {"FEDQ_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    with connect(amqp_url) as operator:
        operator.declare(names, 2)  # what `fedq broker apply --shards 2` declares
        assert operator.queue_consumers(names.updates_queue(2)) is None
        operator.consume(names.updates_queue(0), prefetch=1)  # shard 0 runs
        assert operator.queue_consumers(names.updates_queue(0)) == 1
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and "error: --shards 3: namespace" in last and "no queue" in last, (
            done.stderr
        )
        assert "Traceback" not in done.stderr
        assert operator.queue_consumers(names.updates_queue(2)) is None  # it declared nothing


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_worker_waiting_for_its_broker_stops_at_once_on_a_signal(signum: int, tmp_path: Path) -> None:
    """A supervisor stopping a worker whose broker is down must not wait out its minute of retries."""
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = tmp_path / "init.safetensors"
    save_file({"w": torch.zeros(4)}, init)
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    worker = _start_aggregator(url, "waiting", init, tmp_path / "state")
    assert worker.stderr is not None
    lines = []
    for line in worker.stderr:  # until its first attempt failed: it is retrying now
        lines.append(line)
        if "(attempt 1;" in line:
            break
    worker.send_signal(signum)
    started = time.monotonic()
    _, err = worker.communicate(timeout=60)
    err = "".join(lines) + err
    assert time.monotonic() - started < 10, err
    assert worker.returncode == 0, err
    name = signal.Signals(signum).name
    assert f"shard 0: {name} received, stopping" in err, err
    assert "shard 0 stopped before its broker answered" in err, err
    assert "Traceback" not in err


@pytest.mark.broker
def test_a_namespace_without_its_topology_names_the_command_that_applies_it(
    amqp_url: str, namespace: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(4)}, model)
    absent = f"{namespace}-never-applied"
    common = ("--namespace", absent, "--amqp-url", amqp_url, "--memory-budget", "64GiB")
    for argv in (("send", str(model)), ("receive", str(tmp_path / "out.safetensors"), "--timeout", "5")):
        code, line = fails(capsys, *argv, *common)
        assert code == 3, line
        assert f"no exchange '{absent}." in line or f"no queue '{absent}." in line, line
        assert "`fedq broker apply --namespace NS`" in line, line


@pytest.mark.broker
@pytest.mark.parametrize(
    ("sent", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_or_sigterm_on_a_command_is_one_line_and_its_exit_code(
    amqp_url: str,
    management: Management,
    vhost: str,
    names: Names,
    tmp_path: Path,
    sent: signal.Signals,
    code: int,
    word: str,
) -> None:
    with connect(amqp_url) as operator:
        operator.declare(names, 1)
    command = [sys.executable, "-m", "fedq", "receive", str(tmp_path / "m.safetensors"), "--offset", "next",
               "--namespace", names.namespace, "--amqp-url", amqp_url, "--timeout", "120"]  # fmt: skip
    receiver = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}
    )
    try:
        _wait_for_consumer(management, vhost, names.models_stream)  # it waits for a model now
    finally:
        receiver.send_signal(sent)
        _, err = receiver.communicate(timeout=60)
    assert receiver.returncode == code and err.strip() == f"fedq receive: {word}", err
    assert not list(tmp_path.iterdir())
