"""Fault tests (issue 7, "Faults") against throwaway RabbitMQ nodes started by ``tests/brokers.py``.

Never the machine's main broker: every test here starts (once per module) its own node or three-node cluster
on free loopback ports and kills it afterwards. Every fault is injected a fixed number of times, every wait is
bounded.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import torch

from fedq.topology import Names
from fedq.transport import connect
from tests import brokers
from tests.aggregation_helpers import delta_for, model_of, small_model, state, write_init

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _skip_if_unavailable() -> None:
    reason = brokers.available()
    if reason:
        pytest.skip(f"cannot start throwaway RabbitMQ nodes: {reason}")


# ------------------------------------------------------------------------------------------------------------
# fixtures: one node and one cluster per module, started lazily


@pytest.fixture(scope="module")
def cluster() -> Iterator[brokers.Cluster]:
    _skip_if_unavailable()
    with brokers.Cluster("fc", 3) as c:
        print(f"three-node cluster started in {c.start_seconds:.1f}s")
        yield c


@pytest.fixture
def full_cluster(cluster: brokers.Cluster) -> brokers.Cluster:
    """The module's cluster with every member running (a previous test may have killed one)."""
    for n in cluster.nodes:
        if n.proc is None or n.proc.poll() is not None or not brokers.port_open(n.amqp_port):
            n.kill()
            n.start()
    cluster.wait_members(len(cluster.nodes))
    return cluster


def _queue_leader(node: brokers.Node, queue: str) -> str:
    rows = json.loads(node.ctl("list_queues", "name", "leader", "--formatter", "json"))
    for row in rows:
        if row["name"] == queue:
            return row["leader"]
    raise AssertionError(f"queue {queue} not found: {rows}")


def _pika(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 3
    params.retry_delay = 1
    params.blocked_connection_timeout = 60
    return pika.BlockingConnection(params)


# ------------------------------------------------------------------------------------------------------------
# federation runs: the real aggregator worker process and real fedq.client.Client processes
#
# Determinism. FedBuff with K = CLIENTS, constant staleness weight, server learning rate ETA, max staleness
# above the run's length, every update weighted 1 (num_samples = 1). Whatever the grouping of updates into
# versions, the final model is x0 + ETA / K * (sum of every update's delta) up to float rounding (~1e-8 here),
# so one update lost or counted twice moves it by a whole delta (~1e-2 relative), far above the 1e-6 bound.
# "wait" clients receive version r before sending their round-r delta (one update per client per version,
# staleness 0); "flood" clients receive version 0 once and then send every round at once (deltas against
# version 0).

CLIENTS = 3
VERSIONS = 3
ETA = 0.8
CHUNK_BYTES = 16 << 10
SCALE = 40  # ~165 k parameters, ~660 KB fp32 per update, ~42 chunks
RUN_TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parent.parent


def _x0() -> dict[str, torch.Tensor]:
    return small_model(seed=0, scale=SCALE)


def _delta(client: int, rnd: int, x0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return delta_for(100 * client + rnd, x0)


def expected_model(versions: int = VERSIONS) -> dict[str, torch.Tensor]:
    x0 = _x0()
    out = {n: t.double() for n, t in x0.items()}
    for c in range(CLIENTS):
        for r in range(versions):
            d = _delta(c, r, x0)
            for n in out:
                out[n] += ETA / CLIENTS * d[n].double()
    return out


def max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    return max(
        float((got[n].double() - want[n].double()).abs().max() / want[n].double().abs().max()) for n in want
    )


class FedRun:
    """One scripted federation on a throwaway broker: an aggregator process and CLIENTS client processes."""

    def __init__(
        self,
        tmp: Path,
        url: str,
        *,
        versions: int = VERSIONS,
        update_timeout: float = 5.0,
        quorum: bool = False,
    ) -> None:
        self.tmp = tmp
        self.url = url
        self.names = Names(f"f{uuid.uuid4().hex[:10]}")
        self.versions = versions
        self.update_timeout = update_timeout
        self.quorum = quorum
        self.init = write_init(tmp, _x0())
        self.state_dir = tmp / "state"
        self.markers = tmp / "markers"
        self.markers.mkdir()
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.clients: dict[int, subprocess.Popen[bytes]] = {}
        self._all: list[subprocess.Popen[bytes]] = []
        self.events: list[str] = []

    # processes
    # ------------------------------------------------------------------------------------------------
    def _popen(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self._all.append(proc)
        return proc

    def start_aggregator(self) -> subprocess.Popen[bytes]:
        args = [
            "--amqp-url",
            self.url,
            "--namespace",
            self.names.namespace,
            "--strategy",
            "fedbuff",
            "--buffer-size",
            str(CLIENTS),
            "--server-lr",
            str(ETA),
            "--staleness-fn",
            "constant",
            "--max-staleness",
            "100",
            "--max-versions",
            str(self.versions),
            "--init",
            str(self.init),
            "--state-dir",
            str(self.state_dir),
            "--device",
            "cpu",
            "--chunk-bytes",
            str(CHUNK_BYTES),
            "--memory-budget",
            str(1 << 20),
            "--update-timeout",
            str(self.update_timeout),
        ]
        if self.quorum:  # the worker re-declares the topology: as the cluster's quorum queues, or refused
            args.append("--quorum")
        self.aggregator = self._popen(
            [sys.executable, "-m", "workers.aggregator", *args], self.tmp / "aggregator.log"
        )
        return self.aggregator

    def declare(self, url: str | None = None) -> None:
        """Declare the topology from the test (the aggregator declares the same at start-up), so clients can
        start at once: ``Client.receive`` waits for the first announcement but needs the stream to exist."""
        with connect(url or self.url) as t:
            t.declare(self.names, 1, quorum=self.quorum)

    def start(self, **client_options: Any) -> None:
        """The topology, then the aggregator and every client together."""
        self.declare()
        self.start_aggregator()
        for i in range(CLIENTS):
            self.start_client(i, **client_options)

    def start_client(
        self, i: int, *, first_round: int = 0, mode: str = "wait", slow: float = 0.0, slow_round: int = -1
    ) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable,
            "-m",
            "tests.test_faults",
            "client",
            "--url",
            self.url,
            "--namespace",
            self.names.namespace,
            "--index",
            str(i),
            "--first-round",
            str(first_round),
            "--rounds",
            str(self.versions),
            "--mode",
            mode,
            "--markers",
            str(self.markers),
            "--slow",
            str(slow),
            "--slow-round",
            str(slow_round),
        ]
        self.clients[i] = self._popen(cmd, self.tmp / f"client{i}.log")
        return self.clients[i]

    def kill(self, proc: subprocess.Popen[bytes], what: str) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.events.append(f"SIGKILL {what}")
        self.clients = {i: p for i, p in self.clients.items() if p is not proc}
        if proc is self.aggregator:
            self.aggregator = None

    def kill_all(self) -> None:
        for proc in self._all:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                proc.wait(timeout=30)

    # progress
    # -------------------------------------------------------------------------------------------------
    def marker(self, name: str) -> bool:
        return (self.markers / name).exists()

    def wait_markers(self, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.marker(n) for n in names):
                return
            self._check_alive()
            time.sleep(0.05)
        raise AssertionError(f"markers {names} not all seen in {timeout}s\n{self.logs()}")

    def wait_announced(self, version: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state(self.state_dir).get("announced", -1) >= version:
                return
            self._check_alive()
            time.sleep(0.05)
        raise AssertionError(f"version {version} not announced in {timeout}s\n{self.logs()}")

    def wait_log(self, log: str, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (self.tmp / log).read_text(errors="replace"):
                return
            self._check_alive()
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in {log} after {timeout}s\n{self.logs()}")

    def _check_alive(self) -> None:
        procs = {"aggregator": self.aggregator, **{f"client{i}": p for i, p in self.clients.items()}}
        for what, p in procs.items():
            if p is not None and p.poll() not in (None, 0):
                raise AssertionError(f"{what} exited with {p.returncode}\n{self.logs()}")

    def finish(self, timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for what, p in [
            *((f"client{i}", p) for i, p in self.clients.items()),
            ("aggregator", self.aggregator),
        ]:
            assert p is not None
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.dump_stacks()
                raise AssertionError(f"{what} still running after {timeout}s\n{self.logs()}") from None
            assert rc == 0, f"{what} exited with {rc}\n{self.logs()}"

    def dump_stacks(self) -> None:
        """Ask every client still running to print its threads' stacks into its log (``faulthandler``), so a
        run that stalls says where."""
        for p in self.clients.values():
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)
        time.sleep(1.0)

    def logs(self, tail: int = 2500) -> str:
        markers = sorted(m.name for m in self.markers.iterdir())
        out = [f"events: {self.events}", f"markers: {markers}"]
        for f in sorted(self.tmp.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # checks
    # ---------------------------------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        final = state(self.state_dir)
        assert final.get("version") == self.versions, f"{final}\n{self.logs()}"
        assert final.get("announced") == self.versions, final
        assert len(final["finished_updates"]) == CLIENTS * self.versions, final["finished_updates"]
        got = model_of(self.state_dir)
        rel = max_rel_diff(got, expected_model(self.versions))
        assert rel <= 1e-6, f"max relative difference {rel}\n{self.logs()}"
        if _baseline:
            rel_baseline = max_rel_diff(got, _baseline)
            assert rel_baseline <= 1e-6, f"differs from the fault-free run by {rel_baseline}"
        return {"rel": rel, "final": final, "model": got}


def dead_letters(url: str, names: Names) -> int:
    conn = _pika(url)
    try:
        ok = conn.channel().queue_declare(names.dead_letter_queue, passive=True)
        return int(ok.method.message_count)
    finally:
        conn.close()


_baseline: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def node() -> Iterator[brokers.Node]:
    """One throwaway node for the single-node fault tests, its memory watermark set to 1 GiB."""
    _skip_if_unavailable()
    with brokers.single_node("fn", memory_watermark_bytes=1 << 30) as n:
        yield n


@pytest.fixture
def run(tmp_path: Path, node: brokers.Node) -> Iterator[FedRun]:
    if not brokers.port_open(node.amqp_port):  # a previous test left the app stopped
        node.start_app()
    r = FedRun(tmp_path, node.url)
    try:
        yield r
    finally:
        r.kill_all()


def test_fault_free_baseline(run: FedRun) -> None:
    """The reference run: no fault; also pins the closed form the fault runs are compared with."""
    run.start()
    run.finish()
    result = run.check()
    _baseline.update(result["model"])
    assert dead_letters(run.url, run.names) == 0


def test_broker_restart_mid_transfer(run: FedRun, node: brokers.Node) -> None:
    """rabbitmqctl stop_app / start_app while every client streams its round-1 update and the aggregator
    folds. The update timeout (8 s) is well below a round-1 update's span (~13 s plus the outage) and well
    above the outage (~3 s without a message): updates are timed out on inactivity, not on age."""
    run.update_timeout = 8.0
    run.start(slow=0.3, slow_round=1)  # ~13 s per update in round 1
    run.wait_markers([f"c{i}.r1.sending" for i in range(CLIENTS)])
    time.sleep(0.3)
    node.stop_app()  # the CLI takes ~2 s to act
    run.events.append("broker stop_app")
    assert not all(run.marker(f"c{i}.r1.sent") for i in range(CLIENTS)), "the restart came after the transfer"
    time.sleep(2.0)
    node.start_app()
    run.events.append("broker start_app")
    run.finish()
    run.check()
    assert dead_letters(run.url, run.names) == 0


def test_client_sigkill_mid_stream(run: FedRun) -> None:
    """A client killed while streaming its round-1 update: the partial update is dropped, the restarted
    client's update counts once."""
    run.start(slow=0.05, slow_round=1)  # ~2 s per round-1 update
    run.wait_markers(["c0.r1.sending"])
    time.sleep(0.7)  # ~14 of ~44 messages out
    assert not run.marker("c0.r1.sent")
    run.kill(run.clients[0], "client 0 mid-stream")
    run.wait_log(
        "aggregator.log", "dropping incomplete stream 5:guest/c0/"
    )  # the partial reached it, is gone
    run.start_client(0, first_round=1)
    run.finish()
    run.check()


def test_client_and_aggregator_sigkill_together(run: FedRun) -> None:
    """A client mid-stream and the aggregator SIGKILLed at the same moment, both restarted."""
    run.start(slow=0.05, slow_round=1)  # ~2 s per round-1 update
    run.wait_markers(["c0.r1.sending"])
    time.sleep(0.7)
    assert not run.marker("c0.r1.sent")
    assert run.aggregator is not None
    run.kill(run.clients[0], "client 0 mid-stream")
    run.kill(run.aggregator, "aggregator")
    run.start_aggregator()
    # the restarted aggregator finds the partial in its staging area and drops it after the update timeout
    run.wait_log("aggregator.log", "dropping incomplete stream 5:guest/c0/")
    run.start_client(0, first_round=1)
    run.finish()
    run.check()


def test_overload_publishers_slow_down_nothing_dropped(run: FedRun, node: brokers.Node) -> None:
    """Clients flood the update queue (capped at 256 KiB by a policy) while the aggregator is stopped
    (SIGSTOP): publishes are refused by the full queue and retried, the clients wait, the broker stays under
    its memory watermark without alarms, and once the aggregator runs again every update is folded exactly
    once."""
    limit = 256 << 10
    node.ctl(
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "10",
        f"{run.names.namespace}-cap",
        f"^{run.names.namespace}\\.updates\\.",
        json.dumps({"max-length-bytes": limit, "overflow": "reject-publish"}),
    )
    run.declare()
    agg = run.start_aggregator()
    run.wait_announced(0)
    agg.send_signal(signal.SIGSTOP)
    run.events.append("aggregator SIGSTOP")
    t0 = time.monotonic()
    for i in range(CLIENTS):
        run.start_client(i, mode="flood")
    # the clients have ~6 MB to send, 256 KiB fit in the queue (plus the stopped consumer's prefetch)
    peak_queue = 0
    peak_memory = 0
    watermark = 0
    while time.monotonic() - t0 < 12:
        rows = json.loads(node.ctl("list_queues", "name", "message_bytes_ready", "--formatter", "json"))
        for row in rows:
            if row["name"] == run.names.updates_queue(0):
                peak_queue = max(peak_queue, int(row["message_bytes_ready"]))
        used, watermark = node.memory()
        peak_memory = max(peak_memory, used)
        time.sleep(1.0)
    still_publishing = [i for i, p in run.clients.items() if p.poll() is None]
    alarms = node.alarms()
    agg.send_signal(signal.SIGCONT)
    run.events.append("aggregator SIGCONT")
    run.finish()
    elapsed = time.monotonic() - t0
    run.check()
    print(
        f"overload: queue peak {peak_queue} B (cap {limit}), "
        f"broker memory peak {peak_memory / 2**20:.0f} MiB (watermark {watermark / 2**20:.0f} MiB), "
        f"clients blocked: {still_publishing}, total {elapsed:.1f}s"
    )
    assert still_publishing == list(range(CLIENTS)), "publishers were not held back by the full queue"
    assert 0 < peak_queue <= limit
    assert peak_memory < watermark
    assert alarms == []
    assert dead_letters(run.url, run.names) == 0


# ------------------------------------------------------------------------------------------------------------
# cluster


def test_harness_cluster_quorum_queue_survives_node_loss(full_cluster: brokers.Cluster) -> None:
    c = full_cluster
    queue = f"harness.{uuid.uuid4().hex[:8]}"
    # declare through node 2, so the queue's leader is there (leader locator client-local), then take node 2
    # down (rabbitmqctl stop_app: cheaper to undo than SIGKILL, which the federation test below uses) while a
    # client connected to another node keeps publishing and consuming
    declarer = _pika(c.nodes[1].url)
    declarer.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    declarer.close()
    leader = _queue_leader(c.nodes[0], queue)
    victim = next(n for n in c.nodes if n.nodename == leader)
    survivor = next(n for n in c.nodes if n is not victim)

    conn = _pika(survivor.url)
    ch = conn.channel()
    ch.confirm_delivery()
    sent = set()
    for i in range(200):
        if i == 100:
            victim.stop_app()
        body = f"m{i}".encode()
        ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
        sent.add(body)
    got = set()
    deadline = time.monotonic() + 60
    while len(got) < len(sent) and time.monotonic() < deadline:
        method, _props, body = ch.basic_get(queue)
        if method is None:
            time.sleep(0.05)
            continue
        got.add(body)
        ch.basic_ack(method.delivery_tag)
    new_leader = _queue_leader(survivor, queue)
    members = c.running_members(survivor)
    ch.queue_delete(queue)
    conn.close()
    victim.start_app()
    assert got == sent
    assert new_leader != leader
    assert len(members) == len(c.nodes) - 1


def test_cluster_node_killed_mid_run(tmp_path: Path, full_cluster: brokers.Cluster) -> None:
    """Quorum update queues on a three-node cluster; the node holding their leaders is SIGKILLed while the
    clients stream round 1; clients and aggregator (connected to another node) finish with nothing lost."""
    c = full_cluster
    n1, n2 = c.nodes[0], c.nodes[1]
    r = FedRun(tmp_path, n1.url, quorum=True, update_timeout=60.0)
    try:
        r.declare(n2.url)  # declared through node 2: the quorum queues' leaders start there
        leader = _queue_leader(n1, r.names.updates_queue(0))
        assert leader == n2.nodename
        r.start(slow=0.1, slow_round=1)
        r.wait_markers([f"c{i}.r1.sending" for i in range(CLIENTS)])
        time.sleep(0.4)
        n2.kill()
        r.events.append(f"SIGKILL {n2.nodename}")
        assert not all(r.marker(f"c{i}.r1.sent") for i in range(CLIENTS)), "the kill came after the transfer"
        r.finish()
        r.check()
        new_leader = _queue_leader(n1, r.names.updates_queue(0))
        assert new_leader != n2.nodename
        assert dead_letters(n1.url, r.names) == 0
    finally:
        r.kill_all()


# ------------------------------------------------------------------------------------------------------------
# the client process used above: python -m tests.test_faults client ...


class _SlowTransport:
    """Delegates to a transport; sleeps before each publish while ``delay`` is set (to widen a fault
    window)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.delay = 0.0

    def publish(self, *args: Any, **kwargs: Any) -> None:
        if self.delay:
            time.sleep(self.delay)
        self._inner.publish(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _client_main(argv: list[str]) -> int:
    import argparse

    from fedq.client import Client

    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--first-round", type=int, default=0)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--mode", choices=("wait", "flood"), default="wait")
    p.add_argument("--markers", type=Path, required=True)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--slow-round", type=int, default=-1)
    a = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def mark(name: str) -> None:
        (a.markers / f"c{a.index}.{name}").write_text(f"{time.time()}\n")

    mark("started")
    x0 = _x0()
    transport = _SlowTransport(connect(a.url))
    client = Client(
        f"c{a.index}", namespace=a.namespace, codec="fp32", chunk_bytes=CHUNK_BYTES, transport=transport
    )  # type: ignore[arg-type]

    model: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    with client:
        for r in range(a.first_round, a.rounds):
            if a.mode == "wait" or r == a.first_round:
                mark(f"r{r}.receiving")
                got = client.receive(model, timeout=RUN_TIMEOUT)
                expect = r if a.mode == "wait" else 0
                if got.version != expect:
                    print(f"round {r}: received version {got.version}, expected {expect}", flush=True)
                    return 3
                base = {n: t.clone() for n, t in model.items()}
            d = _delta(a.index, r, x0)
            for n in model:
                model[n] = base[n] + d[n]
            transport.delay = a.slow if r == a.slow_round else 0.0
            mark(f"r{r}.sending")
            sent = client.send(model, num_samples=1)
            mark(f"r{r}.sent")
            print(
                f"round {r}: sent {sent.update_id} ({sent.chunks} chunks) on version {sent.base_version}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        sys.exit(_client_main(sys.argv[2:]))
    sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'tests.test_faults'} client ...")
