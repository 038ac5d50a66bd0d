"""``fedq bench scale``: how the aggregator's loop holds up as the number of clients grows.

For each client count N, a fresh aggregator process (``fedq aggregator``: FedBuff with K = ``--buffer-size``,
every other setting at its default) runs on the demo model (the demo's GPT, ~1.2 M parameters), and N clients
send it updates as fast as it takes them. Clients are lightweight: a client is a name, its streams and the
version its last update was based on; ``--processes`` processes hold them all, with a few sender threads
each, and a sender thread's connection carries the updates of whichever client it serves. (One connection
per client would measure the broker's connection handling rather than the aggregator: 500 connections took
the shared broker of the machine this was written on past its file descriptor limit.) A client works like an
asynchronous FL client: it sends an update based on the newest version announced, waits for a newer version
(its receive), and sends again; so up to N updates are in flight and staleness grows with N / K as it does
in a real federation.
The update is a real one (``send_container``, the client's codec policy, nf4 by default, deltas of a fixed
random step) with the metadata ``fedq.Client.send`` writes; what a client does not do here is download the
model (a receive is the concern of ``fedq bench round``): the bench measures the update path.

The clients share one broker user (the bench's connection's), so the aggregator gives that user the staging
quota N users of their own would hold in all (``--max-streams-per-user``, ``--max-user-bytes``).

``--queue-bytes`` bounds the update queue's backlog with a broker policy. With hundreds of clients sending
without pause on the broker's machine, a backlog as deep as the declared bound (512 MiB: ~800 updates of the
demo model) starves the one consumer: the broker shares its CPU among its connections' processes, and two
dozen publishing connections outweigh the aggregator's one (measured: 20 updates/s going in, 2 coming out,
the aggregator idle 68% of its time with 409 deliveries granted). A bound of a few versions' worth makes the
clients wait for room (reject-publish, retried with backoff) instead.

After a warm-up, a window of ``--seconds`` is measured from the aggregator's log (every folded update and
dropped one is named there, with a timestamp), its /proc entries and the broker's management API. Every
aggregator setting is its default but K (and ``--memory-budget`` when given):

- ``updates_per_s``: updates folded per second;
- ``aggregator_cpu_s_per_update``: the aggregator process's CPU seconds per folded update;
- ``p99_commit_to_fold_s``: from a client's commit being confirmed to the fold that contains the update,
  over the updates folded in the window;
- ``aggregator_peak_rss``: the aggregator's high-water RSS; ``broker_peak_memory``: the broker node's highest
  ``mem_used`` in the window (a shared broker counts everything it holds);
- ``rejected_fraction``: updates dropped or dead-lettered / updates committed in the window.

In the same run the raw broker rate of the same messages is measured: the bodies of one update, published
persistently with confirms by ``--processes`` pika connections and consumed by one, in updates' worth/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from base64 import b64encode
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import torch

from fedq import wire
from fedq.bench import broker_url
from fedq.bench.aggregate import _PeakRss, _wait_for, _write_model
from fedq.bench.stream import delete_namespace
from fedq.broker import Management, management_url_for, q, vhost_of
from fedq.client import codec_policy
from fedq.errors import BenchError
from fedq.protocol import UpdateMeta
from fedq.streaming import send_container
from fedq.topology import Names, versions_names
from fedq.transport import Delivery, Transport, connect

log = logging.getLogger(__name__)

_STAMP = r"^(\S+ \S+) "
_FOLDED = re.compile(_STAMP + r"INFO \S+: shard 0: version (\d+): folded \d+ updates \(([^)]*)\)")
_DROPPED = re.compile(_STAMP + r"WARNING \S+: shard 0: update (\S+) dropped: (\S+)")
_REFUSED = re.compile(_STAMP + r"WARNING \S+: shard 0: refused a message from")
SENDERS_PER_PROCESS = 8  # threads of a client process that send; each takes the client that waited longest


def demo_shapes() -> dict[str, tuple[int, ...]]:
    """The demo's GPT at its default size (tinyshakespeare's 65 characters)."""
    from workers import gpt

    model = gpt.GPT(gpt.GPTConfig(65))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def run(args: argparse.Namespace) -> int:
    url = broker_url(args.amqp_url)
    logging.getLogger("pika").setLevel(logging.WARNING)
    shapes = demo_shapes()
    params = sum(math.prod(s) for s in shapes.values())
    work = Path(args.dir or tempfile.mkdtemp(prefix="fedq-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    init = work / "init.safetensors"
    _write_model(init, shapes, scale=0.02, seed=0)
    bodies = update_bodies(shapes, args.codec)
    update_bytes = sum(len(b) for b in bodies)
    print(
        f"demo model: {params / 1e6:.2f} M parameters; one {args.codec} update: {len(bodies)} messages, "
        f"{update_bytes / 1e6:.2f} MB; FedBuff K = {args.buffer_size}; {args.processes} client processes; "
        f"window {args.seconds:g} s; update queue bound "
        f"{f'{args.queue_bytes / 2**20:g} MiB (policy)' if args.queue_bytes else 'as declared'}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    raw = raw_rate(url, bodies, args.processes, args.seconds)
    print(f"raw broker: {raw:.1f} updates' worth/s ({raw * update_bytes / 1e6:.0f} MB/s)", flush=True)
    rows = []
    for clients in args.clients:
        row = one_run(url, work, init, shapes, clients, args)
        row |= {"raw_updates_per_s": raw, "update_wire_bytes": update_bytes, "params": params}
        row |= {"queue_bytes": args.queue_bytes, "load_average": os.getloadavg()[0]}
        rows.append(row)
        print(describe(row), flush=True)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def describe(row: dict[str, Any]) -> str:
    return (
        f"{row['clients']:4d} clients: {row['updates_per_s']:6.1f} updates/s "
        f"({row['updates_per_s'] / row['raw_updates_per_s']:.0%} of raw), aggregator "
        f"{1e3 * row['aggregator_cpu_s_per_update']:.1f} ms CPU/update, p99 commit->fold "
        f"{row['p99_commit_to_fold_s']:.2f} s, rejected {row['rejected_fraction']:.1%} "
        f"(median staleness {row['median_staleness']}), aggregator peak RSS "
        f"{row['aggregator_peak_rss'] / 2**20:.0f} MiB, "
        f"broker peak {row['broker_peak_memory'] / 2**20:.0f} MiB"
    )


# the update -------------------------------------------------------------------------------------------------
def _delta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in shapes.items()}


def _meta(client: str, update_id: str, base_version: int) -> dict[str, Any]:
    """What ``fedq.Client.send`` writes for a delta update (``protocol.UpdateMeta``: built in one place)."""
    return UpdateMeta(update_id, base_version, client=client).to_meta()


def update_bodies(shapes: dict[str, tuple[int, ...]], codec: str) -> list[bytes]:
    """The messages of one update, as the broker carries them (sent through an in-memory broker)."""
    names = Names(f"bench{uuid.uuid4().hex[:10]}")
    with connect(f"memory://{names.namespace}") as t:
        t.declare(names, 1)
        send_container(
            t,
            names.updates_exchange,
            names.shard_key(0),
            _delta(shapes),
            stream="c/u/s0",
            meta=_meta("c", "u", 0),
            codec_for=codec_policy(codec),
            pack=True,
        )
        t.consume(names.updates_queue(0), prefetch=1 << 20)
        out: list[bytes] = []
        while (d := t.get(0)) is not None:
            out.append(bytes(d.body))
            t.ack(d)
    return out


# the clients ------------------------------------------------------------------------------------------------
def client_process(job: dict[str, Any], ready: Any, go: Any, stop: Any, results: Any) -> None:
    """``job["clients"]`` clients sending updates until ``stop`` is set, over one connection per sender
    thread; puts (client process index, [(update id, base version, commit time)]) on ``results``."""
    torch.set_num_threads(1)
    logging.getLogger("pika").setLevel(logging.WARNING)
    names = Names(job["namespace"])
    delta = _delta(job["shapes"])
    codec_for = codec_policy(job["codec"])
    version = _VersionWatch(connect(job["url"]), names)
    idle: queue.Queue[tuple[str, int]] = queue.Queue()  # (client, the version its last update was based on)
    for i in range(job["clients"]):
        idle.put((f"bench-{job['index']}-{i}", -1))
    committed: list[tuple[str, int, float]] = []
    lock = threading.Lock()

    def sender(transport: Transport) -> None:
        while not stop.is_set():
            try:
                name, base = idle.get(timeout=0.5)
            except queue.Empty:
                continue
            if base >= 0 and not version.wait_newer(base, 0.5):
                idle.put((name, base))  # its last update is not folded yet: it waits
                continue
            base = version.current
            update_id = uuid.uuid4().hex
            send_container(
                transport,
                names.updates_exchange,
                names.shard_key(0),
                delta,
                stream=f"{name}/{update_id}/s0",
                meta=_meta(name, update_id, base),
                codec_for=codec_for,
                role="client",
                pack=True,  # as fedq.Client.send
            )
            with lock:
                committed.append((update_id, base, time.time()))
            idle.put((name, base))

    transports = [connect(job["url"]) for _ in range(SENDERS_PER_PROCESS)]
    ready.set()
    go.wait()
    threads = [threading.Thread(target=sender, args=(t,), daemon=True) for t in transports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    version.close()
    for transport in transports:
        transport.close()
    results.put((job["index"], committed))


class _VersionWatch:
    """The newest version announced, followed on the versions stream by a background thread."""

    def __init__(self, transport: Transport, names: Names) -> None:
        self.t, self.current = transport, 0
        self._newer = threading.Condition()
        self._stream = versions_names(names)[1]
        self.t.consume(self._stream, prefetch=64, arguments={"x-stream-offset": "last"})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            d: Delivery | None = self.t.get(0.2)
            if d is None:
                continue
            with self._newer:
                self.current = max(self.current, int(wire.decode(d.body).meta["version"]))
                self._newer.notify_all()
            self.t.ack(d)

    def wait_newer(self, version: int, timeout: float) -> bool:
        """Whether a version newer than ``version`` is announced, waiting up to ``timeout`` for one."""
        with self._newer:
            return self._newer.wait_for(lambda: self.current > version, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.t.close()


# one client count -------------------------------------------------------------------------------------------
def one_run(
    url: str,
    work: Path,
    init: Path,
    shapes: dict[str, tuple[int, ...]],
    clients: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    names = Names(f"bench{uuid.uuid4().hex[:10]}")
    log_path = work / f"aggregator-{clients}.log"
    cmd = [sys.executable, "-m", "fedq", "aggregator", "--amqp-url", url, "--namespace", names.namespace]
    cmd += ["--strategy", "fedbuff", "--buffer-size", str(args.buffer_size), "--init", str(init)]
    cmd += ["--state-dir", str(work / f"state-{names.namespace}"), "--device", "cpu"]
    cmd += ["--memory-budget", args.memory_budget] if args.memory_budget else []
    # The bench's clients share one broker user; a federation's N clients have N users, each with its own
    # staging quota: the shared user gets what N users would hold in all.
    user_bytes = 4 * sum(math.prod(s) for s in shapes.values()) * 4 + (64 << 20)
    cmd += ["--max-streams-per-user", str(16 * clients), "--max-user-bytes", str(clients * user_bytes)]
    ctx = mp.get_context("spawn")
    stop, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs: list[Any] = []
    agg: subprocess.Popen[bytes] | None = None
    bound = _QueueBound(url, names, args.queue_bytes) if args.queue_bytes else None
    try:
        with open(log_path, "wb") as out:
            agg = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak = _PeakRss(agg.pid)
        _wait_for(log_path, "version 0 announced", agg)
        readies = []
        for i in range(args.processes):
            n = clients // args.processes + (i < clients % args.processes)
            job = {"index": i, "clients": n, "url": url, "namespace": names.namespace}
            job |= {"shapes": shapes, "codec": args.codec}
            ready = ctx.Event()
            readies.append(ready)
            procs.append(ctx.Process(target=client_process, args=(job, ready, go, stop, results)))
            procs[-1].start()
        for ready in readies:
            while not ready.wait(1.0):
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise BenchError("a client process failed to start")
        go.set()
        time.sleep(args.warmup)
        broker = _BrokerMemory(url)
        t0, cpu0 = time.time(), _cpu_seconds(agg.pid)
        time.sleep(args.seconds)
        t1, cpu1 = time.time(), _cpu_seconds(agg.pid)
        broker.stop()
        stop.set()
        committed: list[tuple[str, int, float]] = []
        for _ in procs:
            committed += results.get(timeout=120)[1]
        for p in procs:
            p.join(timeout=30)
        peak.stop()
        folds, dropped, refused = _read_log(log_path)
        in_window = {u: fold for u, fold in folds.items() if t0 <= fold[0] < t1}
        committed_in = [(u, b, t) for u, b, t in committed if t0 <= t < t1]
        delays = sorted(in_window[u][0] - t for u, _, t in committed if u in in_window)
        staleness = sorted(in_window[u][1] - b for u, b, _ in committed if u in in_window)
        lost = sum(1 for u, _, t in committed_in if u in dropped) + sum(t0 <= t < t1 for t in refused)
        return {
            "clients": clients,
            "updates_per_s": len(in_window) / (t1 - t0),
            "aggregator_cpu_s_per_update": (cpu1 - cpu0) / max(1, len(in_window)),
            "p99_commit_to_fold_s": _p99(delays),
            "aggregator_peak_rss": peak.bytes,
            "broker_peak_memory": broker.peak,
            "rejected_fraction": lost / max(1, len(committed_in)),
            "median_staleness": staleness[len(staleness) // 2] if staleness else None,
            "committed_in_window": len(committed_in),
        }
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.terminate()
        if agg is not None:
            agg.terminate()
            agg.wait(30)
        if bound is not None:
            bound.remove()
        delete_namespace(url, names)


class _QueueBound:
    """A RabbitMQ policy bounding one namespace's update queues to ``nbytes`` (the lower of a policy's
    ``max-length-bytes`` and the queue's own argument applies; overflow stays reject-publish): how an operator
    bounds the backlog of an existing federation's queue, whose declared arguments cannot change."""

    def __init__(self, url: str, names: Names, nbytes: int) -> None:
        self._api = Management(management_url_for(url))
        self._path = f"/policies/{q(vhost_of(url))}/{q('fedq-bench-' + names.namespace)}"
        pattern = f"^{re.escape(names.namespace)}\\.updates\\."
        body = {
            "pattern": pattern,
            "apply-to": "queues",
            "priority": 1,
            "definition": {"max-length-bytes": nbytes},
        }
        self._api.put(self._path, body)

    def remove(self) -> None:
        self._api.delete(self._path)


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else math.nan


def _read_log(path: Path) -> tuple[dict[str, tuple[float, int]], set[str], list[float]]:
    """(update id -> (fold time, version folded into), dropped update ids, times of refused messages)."""
    folds: dict[str, tuple[float, int]] = {}
    dropped: set[str] = set()
    refused: list[float] = []
    for line in path.read_text(errors="replace").splitlines():
        if m := _FOLDED.match(line):
            for entry in filter(None, m.group(3).split(", ")):
                folds[_update_id(entry.split("@")[0])] = (_stamp(m.group(1)), int(m.group(2)) - 1)
        elif m := _DROPPED.match(line):
            dropped.add(_update_id(m.group(2)))
        elif m := _REFUSED.match(line):
            refused.append(_stamp(m.group(1)))
    return folds, dropped, refused


def _update_id(logged: str) -> str:
    """The update id in the aggregator's log, where updates are keyed by their sender (``5:guest/ID``)."""
    return logged.rsplit("/", 1)[-1]


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _BrokerMemory:
    """Polls the broker node's ``mem_used`` through the management API (port 15672 of the AMQP host)."""

    def __init__(self, url: str, interval: float = 0.5) -> None:
        parts = urlsplit(url)
        self._url = f"http://{parts.hostname}:15672/api/nodes"
        auth = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        self._auth = "Basic " + b64encode(auth.encode()).decode()
        self.peak, self.interval = 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            request = urllib.request.Request(self._url, headers={"Authorization": self._auth})
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    self.peak = max([self.peak, *(int(n.get("mem_used", 0)) for n in json.load(r))])
            except OSError as exc:
                log.debug("management API: %s", exc)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# the raw broker ---------------------------------------------------------------------------------------------
def raw_rate(url: str, bodies: list[bytes], publishers: int, seconds: float) -> float:
    """Updates' worth of ``bodies`` per second that pika moves through a fedq update queue: ``publishers``
    connections publish them persistently with confirms, one consumes and acks."""
    names = Names(f"bench{uuid.uuid4().hex[:10]}")
    with connect(url) as t:
        t.declare(names, 1)
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    job = {"url": url, "namespace": names.namespace, "bodies": bodies}
    procs = [ctx.Process(target=_raw_publish, args=(job, stop)) for _ in range(publishers)]
    procs.append(ctx.Process(target=_raw_consume, args=(job, stop, results, seconds, len(bodies))))
    try:
        for p in procs:
            p.start()
        rate: float = results.get(timeout=seconds + 120)
        return rate
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        delete_namespace(url, names)


def _raw_publish(job: dict[str, Any], stop: Any) -> None:
    import pika

    names = Names(job["namespace"])
    conn = pika.BlockingConnection(pika.URLParameters(job["url"]))
    channel = conn.channel()
    channel.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2)
    while not stop.is_set():
        for body in job["bodies"]:
            while True:
                try:
                    channel.basic_publish(names.updates_exchange, names.shard_key(0), body, props)
                    break
                except pika.exceptions.NackError:  # the queue is full: let the consumer catch up
                    time.sleep(0.05)
    conn.close()


def _raw_consume(job: dict[str, Any], stop: Any, results: Any, seconds: float, per_update: int) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(job["url"]))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=256)
    got, t0 = 0, 0.0
    for method, _props, _body in channel.consume(Names(job["namespace"]).updates_queue(0)):
        channel.basic_ack(method.delivery_tag)
        got += 1
        if not t0 and got == 2 * per_update:  # warmed up: count from here
            t0, got = time.monotonic(), 0
        if t0 and time.monotonic() - t0 >= seconds:
            break
    results.put(got / per_update / (time.monotonic() - t0))
    stop.set()
    channel.cancel()
    conn.close()
