"""Run one shard worker of the federation's aggregator (see fedq.aggregation.service).

The process entry point of ``fedq aggregator`` and of ``python -m workers.aggregator``.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import signal
import threading
import types
from pathlib import Path
from typing import TYPE_CHECKING

from fedq.cli import aggregation_rules
from fedq.cli.options import add_amqp_url, add_chunk_bytes, add_namespace, size
from fedq.errors import ConfigError
from fedq.topology import DEFAULT_SNAPSHOT_EVERY

# fp32, bf16 and fp16 carry whole versions; int8 and nf4 carry quantized version-to-version deltas with error
# feedback on the aggregator (fedq.reconstruction): a 4- or 8-bit copy of the weights would replace them by
# their rounding.
MODEL_CODECS = ("fp32", "bf16", "fp16", "int8", "nf4")

if TYPE_CHECKING:
    import torch

    from fedq.aggregation.service import Settings

log = logging.getLogger("fedq.aggregator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    add_amqp_url(parser)
    add_namespace(parser)
    a("--shard", type=int, default=0, help="this worker's shard (0 is the leader)")
    a("--shards", type=int, default=1, help="number of shard workers")
    a("--strategy", choices=("fedavg", "fedbuff", "fedasync"), default="fedbuff", help="aggregation strategy")
    a("--buffer-size", type=int, default=4, help="fedbuff: updates per version (K)")
    a("--server-lr", type=float, default=1.0, help="fedavg/fedbuff: server learning rate (eta)")
    a("--alpha", type=float, default=0.6, help="fedasync: mixing weight alpha")
    a(
        "--staleness-fn",
        default="polynomial:0.5",
        help="staleness weight s(tau): constant | polynomial:A ((tau+1)^-A) | hinge:A:B",
    )
    a(
        "--max-staleness",
        type=int,
        default=None,
        help="refuse updates more than this many versions old (default: fedavg 10; fedbuff and fedasync no "
        "bound: --staleness-fn down-weights old updates, as FedBuff does, and with many clients staleness is "
        "about clients / buffer size)",
    )
    a("--min-clients", type=int, default=2, help="fedavg: updates per round")
    a("--round-timeout", type=float, default=300.0, help="fedavg: step with fewer updates after this (s)")
    a(
        "--update-timeout",
        type=float,
        default=600.0,
        help="drop an incomplete update after this long without a message of it (s); its late messages are "
        "dead-lettered (reason expired)",
    )
    a("--norm-bound", type=float, default=0.0, help="L2 bound on an update's delta (0 = off)")
    a(
        "--max-samples",
        type=int,
        default=1_000_000,
        help="refuse updates claiming more samples than this (FedAvg weighs updates by their claim)",
    )
    a(
        "--max-share",
        type=float,
        default=1.0,
        help="fedavg: no client above this share of a version's weight, e.g. 0.5 (1 = off)",
    )
    a(
        "--distinct-clients",
        action="store_true",
        help="fedbuff: the K updates of a version come from K different clients",
    )
    a(
        "--norm-reject",
        action="store_true",
        help="reject updates over the norm bound instead of clipping them",
    )
    a(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="fold device (auto: CUDA when present)",
    )
    a(
        "--quorum",
        action="store_true",
        help="declare the update/control/dead-letter queues as quorum queues, for a RabbitMQ cluster; must "
        "match how the broker was set up",
    )
    a("--state-dir", type=Path, default=Path("fedq-state"), help="checkpoints and staging files")
    a(
        "--init",
        type=Path,
        default=None,
        help="initial model, version 0: a safetensors file, a torch state dict (.pt), a save_pretrained "
        "directory (sharded too) or a PEFT adapter directory; needed at the first start only (a resumed "
        "shard reads the model's tensors from its checkpoint)",
    )
    a("--max-versions", type=int, default=0, help="stop after this many versions (0 = run until stopped)")
    a(
        "--keep-versions",
        type=int,
        default=3,
        help="model versions kept in the state dir, each with its contributors (fedq export --version N)",
    )
    a(
        "--memory-budget",
        type=size,
        default="64MiB",
        help="intake's memory, e.g. 64MiB: deliveries in flight (prefetch x the largest message) plus "
        "small staged chunks held for the fold (up to a quarter of it, 16 MiB at most); a quarter of it "
        "also bounds the publish window of the model stream",
    )
    a(
        "--max-streams-per-user",
        type=int,
        default=16,
        help="update streams one broker user may have staged (incomplete or waiting for a plan); raise it "
        "where many clients share one broker user",
    )
    a(
        "--max-user-bytes",
        type=size,
        default=0,
        help="bytes one broker user may have staged (default 0: 4x this shard's model in fp32 + 64 MiB)",
    )
    a(
        "--max-user-messages",
        type=int,
        default=0,
        help="messages one broker user may have staged, each an entry of the staging index in memory "
        "(default 0: --max-user-bytes / 64 KiB, at least --max-streams-per-user x (shard tensors + 2))",
    )
    a(
        "--disk-reserve",
        type=size,
        default=0,
        help="free space staging leaves in the state directory, for the next version's files: a message "
        "that would take it below is refused (no_room), and no user may stage more than half of the room "
        "above it (quota_room) (default 0: the next checkpoint's size + 64 MiB)",
    )
    a(
        "--process-budget",
        type=size,
        default=None,
        help="memory this whole process may use, e.g. 8GiB, exported as fedq_process_memory_budget_bytes for "
        "the near-budget alert (default: the container's limit, else physical memory)",
    )
    add_chunk_bytes(parser, "chunk size of published models")
    a(
        "--model-codec",
        choices=MODEL_CODECS,
        default="fp32",
        help="codec of the published model versions: fp32, bf16, fp16 send whole versions (bf16 halves every "
        "client's download, and bf16 clients receive exactly their dtype); int8, nf4 send quantized deltas "
        "against what clients hold, with error feedback, and leave unchanged tensors out; 1-D tensors stay "
        "fp32",
    )
    a(
        "--snapshot-every",
        type=int,
        default=DEFAULT_SNAPSHOT_EVERY,
        help="with --model-codec int8/nf4: publish an fp32 snapshot of what clients hold every K versions "
        "(late joiners read the newest snapshot and at most K-1 deltas)",
    )
    a("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0 = off)")
    a(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per op (decode and fold); the cores these leave idle (up to 4) fold plan "
        "windows in parallel, one thread each",
    )
    a(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setting sent to clients with each version (e.g. local_steps=50); repeatable",
    )
    aggregation_rules.add_arguments(parser)


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this torch build sees no CUDA device")
    return torch.device(name)


def _client_config(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config {pair!r}: expected KEY=VALUE")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _max_staleness(given: int | None, strategy: str) -> int | None:
    """A synchronous round weights updates by their samples alone, so FedAvg refuses old ones by default;
    the asynchronous strategies weight them by staleness and take them all (FedBuff's default)."""
    if given is not None:
        return given
    return 10 if strategy == "fedavg" else None


def max_message_bytes(chunk_bytes: int) -> int:
    """The largest update message: a chunk's payload plus its header, with room to spare (1 MiB)."""
    return chunk_bytes + (1 << 20)


def intake(memory_budget: int, chunk_bytes: int) -> tuple[int, int]:
    """(prefetch, bytes of small staged chunks held for the fold) within ``memory_budget``. Intake holds at
    most prefetch x the largest message the broker accepts (``max_message_size``, matched to the chunk size
    in broker_config/rabbitmq.conf) plus the held chunks: the hold takes up to a quarter of the budget
    (``HOLD_BYTES`` at most, 16 MiB) and prefetch the rest, so bytes, not counts, stay in the budget. The
    floor of two deliveries comes first: with a budget below it, nothing is held."""
    from fedq.aggregation.staging import HOLD_BYTES

    message = max_message_bytes(chunk_bytes)
    hold = min(HOLD_BYTES, memory_budget // 4)
    prefetch = max(2, (memory_budget - hold) // message)
    return prefetch, max(0, min(hold, memory_budget - prefetch * message))


def settings_from(args: argparse.Namespace) -> Settings:
    from fedq.aggregation.service import Settings
    from fedq.aggregation.strategies import NormBound, make_strategy
    from fedq.topology import Names

    if args.snapshot_every < 1:
        raise ConfigError(f"--snapshot-every {args.snapshot_every}: must be at least 1 (1: every version)")
    if not 0 <= args.shard < args.shards:
        raise ConfigError(f"--shard {args.shard} outside 0..{args.shards - 1}")
    if args.max_streams_per_user < 1:
        raise ConfigError(f"--max-streams-per-user {args.max_streams_per_user}: at least 1 (a user's update)")
    strategy = make_strategy(
        args.strategy,
        buffer_size=args.buffer_size,
        server_lr=args.server_lr,
        alpha=args.alpha,
        staleness=args.staleness_fn,
        min_clients=args.min_clients,
        round_timeout=args.round_timeout,
        distinct_clients=args.distinct_clients,
    )
    prefetch, hold_bytes = intake(args.memory_budget, args.chunk_bytes)
    return Settings(
        names=Names(args.namespace),
        strategy=strategy,
        init=args.init,
        state_dir=args.state_dir,
        shard=args.shard,
        shards=args.shards,
        max_staleness=_max_staleness(args.max_staleness, strategy.name),
        update_timeout=args.update_timeout,
        norm_bound=NormBound(args.norm_bound, clip=not args.norm_reject),
        device=_device(args.device),
        max_versions=args.max_versions,
        keep_versions=max(1, args.keep_versions),
        prefetch=prefetch,
        max_message_bytes=max_message_bytes(args.chunk_bytes),
        hold_bytes=hold_bytes,
        client_config=_client_config(args.config),
        chunk_bytes=args.chunk_bytes,
        model_codec=args.model_codec,
        snapshot_every=args.snapshot_every,
        quorum=args.quorum,
        **aggregation_rules.settings_from(args),
        max_samples=args.max_samples,
        max_share=args.max_share,
        max_streams_per_user=args.max_streams_per_user,
        max_user_bytes=args.max_user_bytes,
        max_user_messages=args.max_user_messages,
        disk_reserve=args.disk_reserve,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from fedq import metrics
    from fedq.aggregation.lock import StateLock
    from fedq.aggregation.service import Aggregator
    from fedq.fileio import room_in
    from fedq.transport import connect

    settings = settings_from(args)
    # Everything that can be refused locally is checked before the broker is touched.
    _check_init(settings.init, settings.state_dir / f"shard-{settings.shard}")
    lock = StateLock(settings.state_dir / f"shard-{settings.shard}")
    # One thread by default: on a shared machine torch's intra-op threads spin against each other and the
    # transport's I/O thread (measured at load ~6: an nf4 chunk decodes 1.4x faster on 1 thread than on 2).
    torch.set_num_threads(max(1, args.threads))
    _serve_metrics(args.metrics_port, settings.names.namespace)
    metrics.record_process("aggregator", args.process_budget)
    stop = _Stop(settings.shard)
    log.info(
        "shard %d/%d, %s on %s, state in %s",
        settings.shard,
        settings.shards,
        settings.strategy.name,
        settings.device,
        settings.state_dir,
    )
    # The model stream is published from the model tensors chunk by chunk; what is in flight meanwhile (the
    # unconfirmed bodies, and pika's copies of them) is bounded by the window, not by the model size.
    window_bytes = max(2 * settings.chunk_bytes, args.memory_budget // 4)
    try:
        transport = connect(
            args.amqp_url,
            role="aggregator",
            window_bytes=window_bytes,
            window_messages=max(2, window_bytes // max(1, settings.chunk_bytes) * 4),
        )
        stop.connected()
    except KeyboardInterrupt:
        lock.release()
        log.info("shard %d stopped before its broker answered", settings.shard)
        return 0
    # A full state directory stops the shard (it cannot stage, checkpoint or journal): its last checkpoint and
    # journal stay whole, and a restart once there is room resumes from them (walked: docs/reliability.md).
    resume = "The shard stopped; make room there and start it again: it resumes from its last checkpoint"
    with transport, room_in(settings.state_dir, lambda: resume):
        Aggregator(transport, settings).run(stop.event)
    lock.release()
    log.info("shard %d stopped; peak RSS %d bytes", settings.shard, _peak_rss())
    if settings.device.type == "cuda":
        log.info("shard %d: peak GPU memory %d bytes", settings.shard, torch.cuda.max_memory_allocated())
    return 0


def _check_init(path: Path | None, shard_dir: Path) -> None:
    """The initial model must be readable (or the shard must resume) before anything is connected or
    written."""
    from fedq.aggregation import checkpoint, initial

    if path is None:
        if checkpoint.read_state(shard_dir) is None:
            raise ConfigError(f"--init is required: {shard_dir} holds no checkpoint to resume from")
        return
    if not path.exists():
        raise ConfigError(f"--init {path}: no such file or directory (the initial model, version 0)")
    try:
        initial.read_shapes(path)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"--init {path}: not a model fedq can read ({exc})") from exc


def _serve_metrics(port: int, namespace: str) -> None:
    from fedq import metrics

    try:
        metrics.serve(port, namespace)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, f"--metrics-port {port}") from exc


class _Stop:
    """SIGTERM and SIGINT stop the worker with a log line. Once it is connected, it stops between two
    batches (what it staged is durable, what it folded is checkpointed); while it still waits for its broker
    (the first connection is retried for a minute), at once: nothing is staged yet, and a supervisor stopping
    a worker whose broker is down must not wait out the retries. A second signal interrupts at once."""

    def __init__(self, shard: int) -> None:
        self.event = threading.Event()
        self._shard = shard
        self._connecting = True
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def connected(self) -> None:
        self._connecting = False

    def _handler(self, signum: int, frame: types.FrameType | None) -> None:
        again = self.event.is_set()
        if not again:
            log.info("shard %d: %s received, stopping", self._shard, signal.Signals(signum).name)
            self.event.set()
        if again or self._connecting:
            raise KeyboardInterrupt


def _peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: that one starts from the parent's RSS at
    fork (Linux keeps it across exec), so a worker started by a large launcher would report the launcher's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    from fedq import metrics

    return metrics.peak_rss_bytes()
