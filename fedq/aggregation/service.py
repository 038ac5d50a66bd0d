"""The aggregator worker of one shard: consume, validate, stage, plan, fold, step, checkpoint, ack, publish.

Life of an update on shard i (one container stream per shard, see fedq/docs/architecture.md):

1. Every delivery of the stream (manifest, chunks, commit) is validated (wire format, sender, tensor names and
   shapes), appended to the stream's staging file, fsynced, and only then acked (``staging``). A chunk is
   also checked right away (a delivery's chunks together, ``_check_arrived``), while the rest of the update
   is still on the network: NaN/Inf (or a payload the codec refuses) is noted against the stream, and, when
   a norm bound is set, the chunk's squared norm is kept in the staging index. A delta's norm comes from the
   codec's ``sq_norm`` (quantized codecs compute it from their codes and block scales, without a full
   decode); a full update's needs the decoded values (x_client − x_global). Without a norm bound, quantized
   chunks are checked by their scales alone.
2. When the stream is complete (manifest + every chunk + commit), it is checked as a whole (staleness, the
   commit's chunk count, each chunk's slice, dtype and codec against the manifest, the chunks' noted
   errors), its squared norm is the sum of its chunks', and the shard reports "committed" to the leader
   (shard 0; a local call when this is the leader). Only chunks without a current note are measured here:
   after a restart (notes are not persisted; the staged bytes are, so they are recomputed), or for a "full"
   update whose global moved since the chunk arrived.
3. The leader's ``Planner`` decides the next version: which updates, with which fold factors, and the step's
   scale. It journals the plan (fsync), sends it to every other shard on the control exchange, and folds it
   itself.
4. Folding a plan: each tensor is folded one window (one chunk of the planned update with the largest
   chunks) at a time: the planned updates' staged chunks over the window are decoded (the only decode at
   plan time; a delta chunk straight into the sum, without a decoded copy) and folded into a window-sized
   ``Accumulator``, then x[window] += scale · Σ fᵢ Δᵢ[window] (a lone delta goes into x directly). So
   memory is the global model + a chunk or two, however many clients and however large a tensor. The fold
   stays uncommitted (``Prepared``) and the shard answers "folded" to the leader: its fold holds, or it
   failed (``fold.FoldError``: the model and server-optimizer state are restored from the checkpoint, and
   the answer names the updates that caused it). At the first failed fold the leader aborts the plan on every
   shard, refuses those updates (the next plan drops them everywhere) and plans again; once every fold held
   it commits. Committing: the checkpoint (model + state: version, finished streams, leader state) is
   written atomically, the covered
   staging files are deleted, this shard's part of the model is published on the models exchange (streamed
   from the model tensors, no copy), "stepped" is reported to the leader, and only then is the plan delivery
   acked.
5. The leader announces version v on the versions exchange once every shard has stepped to v.

Exactly once: the accumulator is never persisted. A version is folded entirely from staging files inside one
plan application, and the plan is acked (or, on the leader, dropped from the journal) only after the
checkpoint that contains its result. Killed at any point, a shard restarts from its checkpoint, re-reads its
staging files, re-reports what is complete, and gets unacked deliveries (and the unacked plan) back from the
broker. Streams already folded or refused are remembered ("finished") in the checkpoint, so their redelivered
or duplicate messages are acked without effect; duplicate chunks of a staged stream are recognised by (stream,
chunk index). An incomplete stream is dropped after ``update_timeout`` seconds without a message of it (see
``_expire``); it is remembered too, and its late messages are dead-lettered ("expired"), not acked silently.

Full updates are turned into deltas against the global they are folded into (Δ = x_client − x_v): FedAsync's
mixing formula is then exact, and FedAvg of full updates is the exact weighted average. Their norm (for the
norm bound) is measured against the global at the time they complete.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedq import initial_digest, metrics, protocol, wire
from fedq.aggregation import admission, checkpoint, initial
from fedq.aggregation.admission import Admitted
from fedq.aggregation.coordination import Announce, Leader, Recommit, Verdict, check_route, follow
from fedq.aggregation.fold import Folder, FoldError
from fedq.aggregation.planner import Plan, Planner
from fedq.aggregation.privacy import DpConfig, Privacy
from fedq.aggregation.robust import Rule
from fedq.aggregation.server_opt import STATE_PREFIX, ServerOptConfig, ServerOptimizer
from fedq.aggregation.staging import HOLD_BYTES, ChunkRef, Staged, StagingArea, stream_key
from fedq.aggregation.state import ShardState, load
from fedq.aggregation.strategies import NormBound, Strategy
from fedq.codecs import ErrorFeedback, choose_codec
from fedq.errors import ConfigError, RejectedUpdate, StreamError, WireError
from fedq.protocol import (
    MAX_CLIENT_METRICS,
    Abort,
    Commit,
    Committed,
    Folded,
    GramPart,
    Measure,
    PlanEntry,
    Stepped,
)
from fedq.reconstruction import SNAPSHOT_CODEC, Reconstruction, is_delta_codec, retention_bytes
from fedq.safetensors import SafetensorsReader
from fedq.streaming import send_container, shard_of
from fedq.threads import cpu_workers
from fedq.topology import DEFAULT_SNAPSHOT_EVERY, Names, versions_names
from fedq.transport import Delivery, Transport

log = logging.getLogger(__name__)
ROLE = "aggregator"
MAX_BATCH = 64
POLL_SECONDS = 0.25  # the longest the loop takes deliveries before it completes, expires and plans
# Beyond the next version's files, the state directory's reserve keeps room for what else it writes:
# state.json and records (bounded), staging's record headers and a batch's unsynced writes.
DISK_MARGIN = 64 << 20
__all__ = ["MAX_CLIENT_METRICS", "Aggregator", "Settings"]


@dataclass
class Settings:
    """Everything one shard worker needs besides its transport."""

    names: Names
    strategy: Strategy
    init: Path | None  # the initial model; None when resuming from a checkpoint that lists the model's shapes
    state_dir: Path
    shard: int = 0
    shards: int = 1
    max_staleness: int | None = None  # None: no bound, the strategy's staleness weight down-weights
    update_timeout: float = 600.0
    norm_bound: NormBound = field(default_factory=NormBound)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_versions: int = 0  # 0 = run until stopped
    prefetch: int = 16
    client_config: dict[str, Any] = field(default_factory=dict)
    chunk_bytes: int = 4 << 20
    model_codec: str = "fp32"  # of published versions: whole in fp32/bf16/fp16, as deltas below 16 bits
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY  # versions as deltas: a snapshot of x̂ every this many
    quorum: bool = (
        False  # quorum update/control/dead-letter queues (a cluster); must match the broker's setup
    )
    fold_threads: int | None = None  # plan-time fold threads; None: cpu_workers() (CPU) or 1
    rule: Rule | None = None  # a robust rule instead of the strategy's mean (fedq.aggregation.robust)
    keep_versions: int = 3  # model versions kept on disk (fedq export --version N)
    robust_memory: int = 256 << 20  # bytes of decoded update rows per fold thread (window and Gram rules)
    server_opt: ServerOptConfig | None = None  # a server optimizer over each version's step
    privacy: DpConfig | None = None  # central differential privacy
    dp_seed: int | None = None  # the noise's seed; None: drawn at the first start, kept in the checkpoint
    max_samples: int = admission.MAX_SAMPLES  # refuse updates claiming more samples (FedAvg's weight)
    max_share: float = 1.0  # FedAvg: no client above this share of a version's weight (1 = off)
    stream_deadline: float = 0.0  # drop an incomplete stream this long after its first message; 0: 3 timeouts
    # The largest update message accepted (the broker's max_message_size should match): prefetch x this is
    # what intake can hold in memory, besides the small staged chunks held for the fold (``hold_bytes``).
    max_message_bytes: int = (4 << 20) + (1 << 20)
    hold_bytes: int = HOLD_BYTES
    max_streams_per_user: int = 16  # incomplete or waiting streams one user may have staged
    max_user_bytes: int = 0  # bytes one user may have staged; 0: 4 x this shard's model in fp32 + 64 MiB
    max_user_messages: int = 0  # messages one user may have staged; 0: admission.message_quota
    # Free space staging leaves in the state directory (admission.Room); 0: what the next checkpoint writes
    # (``checkpoint_bytes``) + DISK_MARGIN.
    disk_reserve: int = 0


@dataclass
class Prepared:
    """A plan folded into the model, not committed yet: it becomes the version at the leader's ``Commit``."""

    plan: Plan
    plan_id: str
    entries: list[tuple[PlanEntry, Admitted]]
    folded: int  # update elements folded
    fold_seconds: float
    started: float  # monotonic time the step began


@dataclass
class Arrivals:
    """What one delivery brought: the chunks it staged (with their update's kind), checked together once its
    parts are staged, and per codec the chunks received and their wire and float32 bytes, counted in the
    metrics together (a packed update is 28 chunks: a metric update for each cost more than their check)."""

    chunks: list[tuple[ChunkRef, wire.Message, str]] = field(default_factory=list)
    received: dict[str, list[int]] = field(default_factory=dict)

    def count(self) -> None:
        for codec, (chunks, wire_bytes, fp32_bytes) in self.received.items():
            metrics.CHUNKS.labels(ROLE, "received").inc(chunks)
            metrics.WIRE_BYTES.labels(ROLE, "received", codec).inc(wire_bytes)
            metrics.FP32_BYTES.labels(ROLE, "received", codec).inc(fp32_bytes)
        if self.chunks:
            metrics.CHUNKS.labels(ROLE, "staged").inc(len(self.chunks))


class Aggregator:
    """One shard worker: the loop and all its I/O. ``run`` loops until ``max_versions`` is reached or ``stop``
    is set. What to accept is ``admission``'s call, what to fold ``fold``'s, what the leader does next
    ``coordination``'s; what survives a restart is ``state``."""

    def __init__(self, transport: Transport, settings: Settings) -> None:
        self.t = transport
        if getattr(transport, "role", ROLE) != ROLE:
            # The transport counts the dead letters; an aggregator's connection is the aggregator's alone, so
            # they are counted as the aggregator's even where the caller connected without role="aggregator".
            transport.role = ROLE  # type: ignore[attr-defined]
        self.s = settings
        self.dir = settings.state_dir / f"shard-{settings.shard}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_label = str(settings.shard)
        self.all_shapes = self._model_shapes()
        self.shapes = _shard_shapes(self.all_shapes, settings.shard, settings.shards)
        self.staging = StagingArea(self.dir / "staging", settings.hold_bytes)
        shard_bytes = 4 * sum(math.prod(shape) for shape in self.shapes.values())
        user_bytes = settings.max_user_bytes or 4 * shard_bytes + (64 << 20)
        self.quota = admission.Quota(
            settings.max_streams_per_user,
            user_bytes,
            settings.max_user_messages
            or admission.message_quota(user_bytes, settings.max_streams_per_user, len(self.shapes)),
        )
        self.complete: dict[str, Admitted] = {}  # update id -> complete stream
        self.client_metrics: dict[str, set[str]] = {}  # client -> metric names exported for it
        # Deliveries are acked a batch at a time (one fsync per batch), half the prefetch at most: the broker
        # always has credit to keep sending while a batch is decoded, so the network overlaps the decoding.
        # While deliveries keep coming, a full batch's fsync runs in the background as the next one is staged
        # (``_syncing``: the future, the deliveries to ack and the streams it completes, once it is durable).
        self.batch = max(1, min(MAX_BATCH, settings.prefetch // 2))
        self._syncing: tuple[Future[None], list[Delivery], list[tuple[Staged, Delivery | None]]] | None = None
        # Plan-time fold windows in parallel, one torch thread each (fedq.threads); a GPU runs them in one
        # stream.
        # Measured on 2 shared cores, llama-3.2-1b, one nf4 update: plan-time fold 2.6 s with one thread,
        # 1.8-2.0 s with two; 1.1 s with four on a 16-core machine.
        self.fold_threads = settings.fold_threads or (cpu_workers() if settings.device.type == "cpu" else 1)
        self.version_time = time.monotonic()
        self.codec_stats: dict[str, Any] = {}  # of the updates folded into the current version (its record)
        # updates' norms are measured for the norm bound and central DP's clip (the leader plans with them)
        self.wants_norm = settings.norm_bound.bound > 0 or settings.privacy is not None
        self.leader: Leader | None = None
        # versions as deltas: x̂, the clients' reconstruction, on disk (fedq.reconstruction)
        delta = is_delta_codec(settings.model_codec)
        self.recon = Reconstruction(self.dir, self.shapes) if delta else None
        self.prepared: Prepared | None = None  # a fold waiting for the leader's commit
        self._check_topology()  # before _load writes a fresh shard's version 0
        self._load()
        self.reserve = settings.disk_reserve or self._checkpoint_bytes() + DISK_MARGIN
        self._free_seen = (-math.inf, 0, 0)  # (when, the state directory's free bytes, staged bytes then)
        self._say_room(shard_bytes)
        self.folder = Folder(
            self.model,
            self.staging,
            settings.device,
            self.fold_threads,
            server_opt=self.server_opt,
            rows_budget=settings.robust_memory,
            limits=self.state.dtype_limits,
        )

    # start-up -----------------------------------------------------------------------------------------------
    def _model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the global model (all shards'): from the checkpoint when resuming, so that
        ``--init`` is needed only at the first start, else from ``--init``."""
        saved = checkpoint.read_state(self.dir)
        if saved is not None and saved.get("all_shapes"):
            return {name: tuple(shape) for name, shape in saved["all_shapes"]}
        if self.s.init is None:
            raise ConfigError(f"--init is required: {self.dir} holds no checkpoint to resume from")
        return initial.read_shapes(self.s.init)

    def _load(self) -> None:
        if any(name.startswith(STATE_PREFIX) for name in self.shapes):
            raise ConfigError(f"the model has a tensor named {STATE_PREFIX}...: that prefix is fedq's own")
        opt = self.s.server_opt
        self.server_opt = ServerOptimizer(opt, self.shapes, self.s.device) if opt is not None else None
        loaded = load(self.dir, self.s.device)
        if loaded is None:
            assert self.s.init is not None  # _model_shapes refused a fresh start without it
            self.model = initial.read_model(self.s.init, self.s.device, set(self.shapes))
            self.state = ShardState(
                self.s.shard,
                self.s.shards,
                all_shapes=list(self.all_shapes.items()),
                dtype_limits=_dtype_limits(self.s.init),
                initial_digest=self._initial_digest(),
            )
            self.state.save(self.dir, self._tensors(), record=self._record(), keep=self.s.keep_versions)
            log.info("shard %d: version 0 from %s (%d tensors)", self.s.shard, self.s.init, len(self.shapes))
        else:
            tensors, self.state = loaded
            self._check_resumed_shards()
            self.state.all_shapes = list(self.all_shapes.items())
            if not self.state.dtype_limits and self.s.init is not None:  # a checkpoint older than the field
                self.state.dtype_limits = _dtype_limits(self.s.init)
            # the optimizer's state is in the same checkpoint file as the model: it commits with the model
            saved = {n: tensors.pop(n) for n in [n for n in tensors if n.startswith(STATE_PREFIX)]}
            if self.server_opt is not None:
                self.server_opt.load(saved)
            self.model = tensors
            log.info("shard %d: resumed at version %d from %s", self.s.shard, self.state.version, self.dir)
        if self.s.shard == 0:
            self.leader = self._new_leader(restore=loaded is not None)
            planner = self.leader.planner
            if planner.privacy is not None:
                metrics.DP_EPSILON.set(planner.privacy.spent)
                metrics.DP_DELTA.set(planner.privacy.config.delta)
                metrics.DP_BUDGET.set(planner.privacy.config.epsilon_budget)
        metrics.MODEL_VERSION.labels(self.shard_label).set(self.state.version)
        # when the checkpoint of the version it starts from was written: `fedq status` said "made never" and
        # the stalled-version alert had no series until the first step
        made = (self.dir / checkpoint.model_file(self.state.version)).stat().st_mtime
        metrics.MODEL_VERSION_TIME.labels(self.shard_label).set(made)

    def _check_resumed_shards(self) -> None:
        """A checkpoint holds the tensors of its own split of the model: resumed under another --shards, the
        shard would fold a split its peers do not share (it resumed silently until the walk of 2026-11-29)."""
        if self.state.shards != self.s.shards:
            raise ConfigError(
                f"{self.dir} holds shard {self.state.shard} of {self.state.shards} shards, not of "
                f"--shards {self.s.shards}: start it with --shards {self.state.shards}, as every shard of "
                "its federation, or give a new federation a new --state-dir"
            )

    def _initial_digest(self) -> str:
        """This shard's digest of version 0 as clients will decode it (``fedq.initial_digest``), once at the
        first start: announced with every version, so that clients holding the initial weights skip it."""
        began = time.monotonic()
        order = [name for name in self.all_shapes if name in self.shapes]
        found = initial_digest.shard_digest(self.model, order, self.s.model_codec)
        log.info(
            "shard %d: digest of version 0 %s... (%d tensors, %.1f s)",
            self.s.shard,
            found[:12],
            len(order),
            time.monotonic() - began,
        )
        return found

    def _new_leader(self, *, restore: bool) -> Leader:
        """The leader's bookkeeping from the last checkpoint (the journal is replayed in ``start``)."""
        privacy = None
        if self.s.privacy is not None:
            seed = self.s.dp_seed if self.s.dp_seed is not None else int.from_bytes(os.urandom(8), "big") >> 1
            privacy = Privacy(self.s.privacy, seed)  # a restored state brings its own seed back
        planner = Planner(
            self.s.strategy,
            shards=self.s.shards,
            max_staleness=self.s.max_staleness,
            norm_bound=self.s.norm_bound,
            update_timeout=self.s.update_timeout,
            version=self.state.version,
            now=time.monotonic(),
            rule=self.s.rule,
            privacy=privacy,
            max_share=self.s.max_share,
        )
        if restore:
            planner.restore(self.state.planner, time.monotonic())
            planner.forget(set(self.state.finished_updates))
        return Leader(self.dir, planner, self.s.shards)

    def start(self) -> None:
        """Declare, consume, and redo whatever a crash may have left half done."""
        model_bytes = sum(4 * math.prod(shape) for shape in self.all_shapes.values())
        self.t.declare(
            self.s.names,
            self.s.shards,
            quorum=self.s.quorum,
            models_retention_bytes=retention_bytes(model_bytes, self.s.model_codec, self.s.snapshot_every),
        )
        # Exclusive: a second worker of this shard (another machine, another state dir) is refused here.
        names, shard = self.s.names, self.s.shard
        self.t.consume(names.updates_queue(shard), prefetch=self.s.prefetch, exclusive=True)
        self.t.consume(names.control_queue(shard), prefetch=self.s.shards * 4 + 4, exclusive=True)
        for stream in [s for s in self.staging.streams if s in self.state.finished]:
            self.staging.remove(stream)
        for staged in list(self.staging.streams.values()):
            if admission.is_complete(staged):
                self._on_complete(staged, None)
        if self.leader is not None:
            self._replay_journal()
        if self.state.published < self.state.version:
            self._publish_model()
        self._report_stepped()

    def _check_topology(self) -> None:
        """Refuse a worker whose --shards differs from its namespace's, before it writes or declares anything:
        it splits the tensors differently from its peers, and it ran silently beside them, publishing a
        version 0 of a shard no announcement names and leaving queues no client feeds (walk of 2026-11-29).
        A topology with fewer shards is refused only while shard 0 consumes it: a fresh one (a broker loaded
        with broker_config/definitions.json, one shard) grows to the worker's --shards, as it always did."""
        names, shards = self.s.names, self.s.shards
        beyond, last = names.updates_queue(shards), names.updates_queue(shards - 1)
        fix = "give every shard the --shards of `fedq broker apply`"
        if self.t.queue_consumers(beyond) is not None:
            declared = (
                f"more than {shards} shards: queue {beyond} exists; {fix} (a worker started with a larger "
                f"--shards leaves it: with no such shard running, delete it and "
                f"{names.control_queue(shards)}, e.g. `rabbitmqctl delete_queue {beyond}`)"
            )
        elif (
            shards > 1
            and self.t.queue_consumers(last) is None
            and self.t.queue_consumers(names.updates_queue(0))
        ):
            declared = f"fewer than {shards} shards, and runs: there is no queue {last}; {fix}"
        else:
            return
        raise ConfigError(f"--shards {shards}: namespace {names.namespace} was declared with {declared}")

    # main loop ----------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        self.start()
        while not (stop is not None and stop.is_set()) and not self._done():
            self._poll(timeout=0.2)
            self._expire()
            if self.leader is not None:
                self._maybe_plan()
        self._finish_sync()
        self.staging.close()
        self.t.flush()

    def _done(self) -> bool:
        st = self.state
        if not self._final():
            return False
        return st.announced >= st.version if self.leader is not None else st.published >= st.version

    def _final(self) -> bool:
        """Whether the current version is the federation's last: --max-versions, or the last one the privacy
        budget allows (its plan says so, so that every shard knows)."""
        if self.s.max_versions and self.state.version >= self.s.max_versions:
            return True
        plan = self.state.last_plan
        return plan is not None and plan.version == self.state.version and bool((plan.dp or {}).get("final"))

    def _poll(self, timeout: float) -> None:
        """Take up to a batch of deliveries and stage them; a full batch (more are waiting) is made durable in
        the background while the next one is staged, a last one right away; then they are acked together.

        Every delivery counts towards the batch, refused and ignored ones too, and a batch ends after
        ``POLL_SECONDS``: however fast junk arrives, the loop gets back to completing, expiring and planning
        (fair intake: a flood delays an honest version by a bounded factor, not until the flood ends).

        A batch counts deliveries, not what they add: a packed update is one delivery that completes its
        stream, so counting only the deliveries left to ack made every batch of packed updates wait for its
        fsync."""
        if self._syncing is not None:
            delivery = self.t.get(0)
            if delivery is None:  # none waiting: ack the batch syncing, its completions go to planning now
                self._finish_sync()
                return
        else:
            delivery = self.t.get(timeout)
        to_ack: list[Delivery] = []
        completed: list[tuple[Staged, Delivery | None]] = []
        handled = 0
        deadline = time.monotonic() + POLL_SECONDS
        while delivery is not None:
            if delivery.queue == self.s.names.control_queue(self.s.shard):
                self._flush_batch(to_ack, completed)
                self._guard(delivery, self._on_control)
            else:
                self._guard(delivery, lambda d: self._on_update_message(d, to_ack, completed))
            handled += 1
            if handled >= self.batch or time.monotonic() > deadline:
                break
            delivery = self.t.get(0)
        if handled < self.batch:  # no more were waiting: make this batch durable now
            self._flush_batch(to_ack, completed)
            return
        self._finish_sync()
        self._syncing = (self.staging.start_sync(), list(to_ack), list(completed))

    def _guard(self, delivery: Delivery, handler: Any) -> None:
        """Bad input is dead-lettered with its reason; the worker and the model are untouched."""
        try:
            handler(delivery)
        except (WireError, StreamError, RejectedUpdate) as exc:
            self._dead_letter(delivery, exc.reason, str(exc))

    def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        log.warning(
            "shard %d: refused a message from %s: %s (%s)", self.s.shard, delivery.user_id, reason, detail
        )
        metrics.REJECTED.labels(ROLE, reason).inc()
        self.t.dead_letter(delivery, reason, detail[:500])  # the transport counts DEAD_LETTERED

    def _flush_batch(self, to_ack: list[Delivery], completed: list[tuple[Staged, Delivery | None]]) -> None:
        """Make the batch syncing in the background and this one durable, then ack both and handle what they
        complete."""
        self._finish_sync()
        if not to_ack and not completed:
            return
        self.staging.sync()
        self._acked(to_ack, completed)
        to_ack.clear()
        completed.clear()

    def _finish_sync(self) -> None:
        """Wait for the batch syncing in the background, if any, then ack it."""
        if self._syncing is not None:
            future, to_ack, completed = self._syncing
            self._syncing = None
            future.result()
            self._acked(to_ack, completed)

    def _acked(self, to_ack: list[Delivery], completed: list[tuple[Staged, Delivery | None]]) -> None:
        """Ack durable deliveries and handle the streams they complete."""
        metrics.STAGED_BYTES.labels("disk").set(self.staging.nbytes)
        for delivery in to_ack:
            self.t.ack(delivery)
        for staged, completing in completed:
            self._on_complete(staged, completing)

    # update messages ----------------------------------------------------------------------------------------
    def _on_update_message(
        self, delivery: Delivery, to_ack: list[Delivery], completed: list[tuple[Staged, Delivery | None]]
    ) -> None:
        """Stage a delivery's message, or a batch's parts in order, each as if it had come alone; then the
        delivery is settled once: dead-lettered if a part was refused (the parts before it stay staged, as
        their own messages would have), handled with the stream it completes, acked once durable, or acked
        now when it added nothing. The chunks it staged are checked together once its parts are staged
        (``_check_arrived``), before anything reads their notes (a stream completes only once acked)."""
        user = admission.sender(delivery.user_id)
        admission.check_size(len(delivery.body), self.s.max_message_bytes)
        parts = wire.decode_all(delivery.body)
        arrived = Arrivals()
        try:
            self._stage_parts(delivery, parts, user, arrived, to_ack, completed)
        finally:
            self._check_arrived(arrived.chunks)
            arrived.count()

    def _stage_parts(
        self,
        delivery: Delivery,
        parts: list[tuple[wire.Message, memoryview]],
        user: str,
        arrived: Arrivals,
        to_ack: list[Delivery],
        completed: list[tuple[Staged, Delivery | None]],
    ) -> None:
        staged_any = False
        completes: Staged | None = None
        for msg, part in parts:
            decision = self._admit(msg, user, len(part))
            if decision.action == admission.REFUSE:
                if decision.forget:
                    self._refuse_stream(stream_key(user, msg.stream))
                    completes = None
                if completes is not None:
                    completed.append((completes, None))
                self._dead_letter(delivery, decision.reason, decision.detail)
                return
            staged = None if decision.action == admission.IGNORE else self._stage(msg, user, part, arrived)
            if staged is None:
                metrics.CHUNKS.labels(ROLE, "duplicate").inc()
                continue
            staged_any = True
            if admission.is_complete(staged):
                completes = staged
        if completes is not None:
            completed.append((completes, delivery))
        elif staged_any:
            to_ack.append(delivery)
        else:
            self.t.ack(delivery)

    def _admit(self, msg: wire.Message, user: str, size: int) -> admission.Decision:
        return admission.admit(
            msg,
            user,
            shapes=self.shapes,
            staged=self.staging.streams,
            finished=self.state.finished,
            expired=self.state.expired,
            update_timeout=self.s.update_timeout,
            quota=self.quota,
            size=size,
            usage=self.staging.usage(user),
            room=self._room(),
        )

    def _stage(self, msg: wire.Message, user: str, body: memoryview, arrived: Arrivals) -> Staged | None:
        """Stage one admitted message; None when it duplicates what is staged. A chunk goes to ``arrived``
        with its update's kind, to be checked and counted with the delivery's other chunks."""
        if msg.kind == wire.CHUNK:
            codec = msg.codec.name if msg.codec is not None else "none"  # a chunk always names its codec
            tally = arrived.received.setdefault(codec, [0, 0, 0])
            tally[0] += 1
            tally[1] += len(body)
            tally[2] += 4 * msg.count
        staged = self.staging.append(user, msg, body)
        if staged is not None and msg.kind == wire.CHUNK:
            kind = "full" if (staged.manifest or {}).get("kind") == "full" else "delta"
            arrived.chunks.append((staged.chunks[msg.index], msg, kind))
        return staged

    def _check_arrived(self, arrived: list[tuple[ChunkRef, wire.Message, str]]) -> None:
        """Note each arrived chunk's check (``admission.measure_all``: its error, or its delta's norm)."""
        checks = admission.measure_all(
            [(msg, kind) for _, msg, kind in arrived],
            model=self.model,
            wants_norm=self.wants_norm,
            version=self.state.version,
            device=self.s.device,
        )
        for (ref, _, _), check in zip(arrived, checks, strict=True):
            ref.check = check

    def _refuse_stream(self, key: str) -> None:
        self.state.finish(self.state.finished, key)
        self.staging.remove(key)

    def _on_complete(self, staged: Staged, delivery: Delivery | None) -> None:
        """Validate a complete slice and report it; the completing delivery is acked or dead-lettered here."""
        try:
            complete = self._validate(staged)
        except (WireError, StreamError, RejectedUpdate) as exc:
            self._refuse_stream(staged.key)
            if delivery is not None:
                self._dead_letter(delivery, exc.reason, str(exc))
            else:
                metrics.REJECTED.labels(ROLE, exc.reason).inc()
            return
        if delivery is not None:
            self.t.ack(delivery)
        self.complete[complete.update_id] = complete
        metrics.UPDATES.labels(ROLE, "committed").inc()
        log.info(
            "shard %d: update %s from %s complete (base version %d, %d chunks, %.1f MB staged)",
            self.s.shard,
            complete.update_id,
            complete.client,
            complete.base_version,
            len(staged.chunks),
            staged.nbytes / 1e6,
        )
        self._report_committed(complete)

    def _validate(self, staged: Staged) -> Admitted:
        """Admission's checks of a complete stream; chunks without a current note are measured here: after a
        restart (notes are not persisted), or for a "full" update whose global moved since it arrived."""
        _, info = admission.check_complete(
            staged,
            version=self.state.version,
            max_staleness=self.s.max_staleness,
            finished_updates=self.state.finished_updates,
            pending_updates=self.complete,
            max_samples=self.s.max_samples,
        )
        for index in sorted(staged.chunks):
            ref = staged.chunks[index]
            if not admission.current(
                ref.check, info.kind, wants_norm=self.wants_norm, version=self.state.version
            ):
                ref.check = self._measure(self.staging.read(staged, ref), info.kind)
        return admission.admitted(staged, info)

    def _measure(self, msg: wire.Message, kind: str) -> admission.Check:
        return admission.measure(
            msg,
            kind,
            model=self.model,
            wants_norm=self.wants_norm,
            version=self.state.version,
            device=self.s.device,
        )

    def _expire(self) -> None:
        """Drop incomplete streams that got no message for the update timeout: they contribute nothing.

        Inactivity, not age: a slow client, or a broker outage that holds its messages back, must not cost an
        update that is still coming; but a stream kept alive by a trickle is dropped at its absolute
        deadline (``stream_deadline``, 3 update timeouts by default), so a client cannot hold staging forever.
        A dropped stream is remembered (``expired``) so that its late messages
        are dead-lettered, where the client's loss shows, instead of being acked without effect.
        """
        now = time.monotonic()
        complete_streams = {c.staged.key for c in self.complete.values()}
        deadline = self.s.stream_deadline or 3 * self.s.update_timeout
        for stream, staged in list(self.staging.streams.items()):
            if stream in complete_streams:
                continue
            silent, age = now - staged.last_seen, now - staged.first_seen
            if silent > self.s.update_timeout or age > deadline:
                log.warning(
                    "shard %d: dropping incomplete stream %s (%.0f s without a message, %.0f s old)",
                    self.s.shard,
                    stream,
                    silent,
                    age,
                )
                metrics.UPDATES.labels(ROLE, "dropped_incomplete").inc()
                self.state.finish(self.state.expired, stream)
                self.staging.remove(stream)

    # coordination -------------------------------------------------------------------------------------------
    def _control(self, shard: int, message: protocol.Control) -> None:
        self.t.publish(
            self.s.names.control_exchange,
            self.s.names.shard_key(shard),
            protocol.encode_control(message),
            persistent=True,
        )

    def _report_committed(self, c: Admitted) -> None:
        report = Committed(
            self.s.shard, c.update_id, c.client, c.base_version, c.num_samples, c.norm_sq, len(c.by_tensor)
        )
        if self.leader is not None:
            self.leader.committed(report, self.state.finished_updates, journal=False, now=time.monotonic())
        else:
            self._control(0, report)
            self.t.flush()

    def _report_stepped(self) -> None:
        st = self.state
        report = Stepped(
            st.shard, st.version, st.published_offset, st.delta_offset, st.snapshot_offset, st.initial_digest
        )
        if self.leader is not None:
            self._on_stepped(report)
        else:
            self._control(0, report)
            self.t.flush()

    def _on_stepped(self, report: Stepped) -> None:
        assert self.leader is not None
        decision = self.leader.on_stepped(report, self.state.version, self.state.announced)
        if isinstance(decision, Announce):
            self._announce(decision)
        else:
            self._decide(decision)

    def _on_control(self, delivery: Delivery) -> None:
        message = protocol.parse_control(delivery.body)
        check_route(message, self.s.shard)
        if isinstance(message, Plan):
            if follow(message, self.state.version):
                self._prepare(message)
            else:
                self._report_stepped()  # a replayed plan: the leader is waiting to hear it again
        elif isinstance(message, Commit):
            self._on_commit(message.plan)
        elif isinstance(message, Abort):
            if self.prepared is not None and self.prepared.plan_id == message.plan_id:
                self._discard_prepared()
        elif isinstance(message, Committed):
            assert self.leader is not None
            self.leader.committed(message, self.state.finished_updates, journal=True, now=time.monotonic())
        elif isinstance(message, Folded):
            assert self.leader is not None
            self._decide(self.leader.on_folded(message, self.state.version, self.state.last_plan))
        elif isinstance(message, Measure):
            self._gram(message)
        elif isinstance(message, GramPart):
            assert self.leader is not None
            self.leader.gram(message)
        else:
            self._on_stepped(message)
        self.t.ack(delivery)

    def _gram(self, request: Measure) -> None:
        """This shard's Gram part of a ``Measure`` (to the leader; the leader's own is a local call)."""
        if request.version != self.state.version + 1:
            return  # a request of a version already made: the leader no longer waits for it
        entries = []
        for update_id in request.update_ids:
            c = self.complete.get(update_id)
            if c is None:
                raise StreamError(
                    f"measure for version {request.version} names update {update_id}, which shard "
                    f"{self.s.shard} does not hold",
                    reason="inconsistent",
                )
            entries.append((PlanEntry(update_id, 1.0, c.client, 0), c))
        started = time.monotonic()
        matrix = self.folder.gram(entries)
        log.info(
            "shard %d: Gram matrix of %d updates for version %d in %.2f s",
            self.s.shard,
            len(entries),
            request.version,
            time.monotonic() - started,
        )
        part = GramPart(
            self.s.shard, request.version, request.update_ids, tuple(tuple(map(float, r)) for r in matrix)
        )
        if self.leader is not None:
            self.leader.gram(part)
        else:
            self._control(0, part)
            self.t.flush()

    def _maybe_plan(self) -> None:
        assert self.leader is not None
        if self._final() or self.leader.pending is not None:
            return
        plan = self.leader.plan(
            time.monotonic(),
            version=self.state.version,
            announced=self.state.announced,
            max_versions=self.s.max_versions,
        )
        # what `fedq status` shows: with fewer clients than --buffer-size a version never came and nothing
        # said why (walk of 2026-11-29: three clients, K = 4, the default)
        metrics.UPDATES_WAITING.set(len(self.leader.planner.order))
        if plan is not None:
            self._step(plan)
            return
        request = self.leader.planner.measure_request()
        if request is not None:
            for shard in range(1, self.s.shards):
                self._control(shard, request)
            self.t.flush()
            self._gram(request)

    def _send_plan(self, plan: Plan) -> None:
        for shard in range(1, self.s.shards):
            self._control(shard, plan)
        self.t.flush()

    def _replay_journal(self) -> None:
        assert self.leader is not None
        replay = self.leader.replay(
            version=self.state.version,
            announced=self.state.announced,
            last_plan=self.state.last_plan,
            finished_updates=self.state.finished_updates,
            now=time.monotonic(),
        )
        if replay.reapply is not None:
            log.info("shard 0: re-applying journaled plan for version %d", replay.reapply.version)
            self._step(replay.reapply)
        elif replay.resend is not None:
            self._send_plan(replay.resend)  # ask the other shards to report "stepped" again

    # the step -----------------------------------------------------------------------------------------------
    def _step(self, plan: Plan) -> None:
        """The leader's step: every shard folds the plan (the followers while the leader does), and it becomes
        a version only once every shard's fold holds (``_decide``)."""
        assert self.leader is not None
        self.leader.prepare(plan)
        self._send_plan(plan)
        self._decide(self.leader.on_folded(self._fold(plan), self.state.version, self.state.last_plan))

    def _prepare(self, plan: Plan) -> None:
        """A follower's fold of a plan, answered to the leader; the result stays uncommitted until its
        ``Commit``. A plan folded already (the leader restarted) is answered again without folding."""
        pid = protocol.plan_id(plan)
        if self.prepared is not None and self.prepared.plan_id != pid:
            self._discard_prepared()  # another plan of the version: the one it replaces was aborted
        report = Folded(self.s.shard, plan.version, pid) if self.prepared is not None else self._fold(plan)
        self._control(0, report)
        self.t.flush()

    def _fold(self, plan: Plan) -> Folded:
        """Fold the plan into the model, uncommitted (``prepared``); a fold that fails restores the model and
        names the updates that caused it, never ends the process."""
        pid = protocol.plan_id(plan)
        try:
            started = time.monotonic()
            entries = self._planned(plan)
            t0 = time.perf_counter()
            folded = self.folder.fold(entries, plan)
        except FoldError as exc:
            self._restore_model()
            culprits = exc.update_ids or (self.folder.culprits(exc.window, plan.scale) if exc.window else [])
            log.error(
                "shard %d: plan for version %d not applied (%s): %s; refusing %s",
                self.s.shard,
                plan.version,
                exc.reason,
                exc,
                culprits,
            )
            return Folded(self.s.shard, plan.version, pid, tuple(culprits), exc.reason)
        self.prepared = Prepared(plan, pid, entries, folded, time.perf_counter() - t0, started)
        return Folded(self.s.shard, plan.version, pid)

    def _on_commit(self, plan: Plan) -> None:
        """A follower makes the committed plan its version; one it no longer holds folded (it restarted since
        it answered) is folded again first."""
        if plan.version <= self.state.version:
            self._report_stepped()
            return
        if self.prepared is None or self.prepared.plan_id != protocol.plan_id(plan):
            self._discard_prepared()
            follow(plan, self.state.version)
            report = self._fold(plan)
            if report.reason:
                raise StreamError(
                    f"plan {plan.version} is committed, but shard {self.s.shard} folded it before and cannot "
                    f"fold it again ({report.reason}: {', '.join(report.refused)}); its staging changed",
                    reason=report.reason,
                )
        self._commit()

    def _decide(self, decision: Verdict | Recommit | None) -> None:
        """Carry out the leader's decision on the shards' answers."""
        if isinstance(decision, Recommit):
            self._control(decision.shard, Commit(decision.plan))
            self.t.flush()
        elif isinstance(decision, Verdict) and not decision.reason:
            for shard in range(1, self.s.shards):
                self._control(shard, Commit(decision.plan))
            self.t.flush()
            self._commit()
        elif isinstance(decision, Verdict):
            self._discard_prepared()
            for shard in range(1, self.s.shards):
                self._control(shard, Abort(decision.plan.version, protocol.plan_id(decision.plan)))
            self.t.flush()
            self._refuse(decision.plan, list(decision.refused), decision.reason)

    def _commit(self) -> None:
        assert self.prepared is not None
        p, self.prepared = self.prepared, None
        self._apply(p.plan, p.entries, p.folded, p.fold_seconds, p.started)

    def _discard_prepared(self) -> None:
        """Forget an uncommitted fold: the model and the server optimizer's state go back to the version's."""
        if self.prepared is not None:
            self.prepared = None
            self._restore_model()

    def _planned(self, plan: Plan) -> list[tuple[PlanEntry, Admitted]]:
        entries = []
        for entry in plan.updates:
            c = self.complete.get(entry.update_id)
            if c is None:
                raise FoldError(
                    f"plan {plan.version} names update {entry.update_id}, "
                    f"which shard {self.s.shard} does not hold",
                    reason="inconsistent",
                    update_ids=[entry.update_id],
                )
            entries.append((entry, c))
        return entries

    def _refuse(self, plan: Plan, culprits: list[str], reason: str) -> None:
        """The leader after an aborted plan: refuse the culprits, forget the plan, and plan again (every shard
        drops the culprits with the next version)."""
        assert self.leader is not None
        for key in culprits:  # counted by every shard when the next plan drops them
            c = self.complete.pop(key, None)
            self.state.finish(self.state.finished_updates, key)
            if c is not None:
                self._refuse_stream(c.staged.key)
        # the next plan drops what this one did (it is cancelled) and the culprits, once each
        drops = list(dict([*plan.dropped, *self.leader.drops, *((key, reason) for key in culprits)]).items())
        self.leader = self._new_leader(restore=True)
        self.leader.cancel(plan.version)
        self.leader.drop(drops)
        self._replay_journal()  # the other shards' reports
        for c in self.complete.values():  # this shard's own are not journaled
            self._report_committed(c)

    def _restore_model(self) -> None:
        """The model and the server optimizer's state of the current version, from its checkpoint: a fold that
        does not become a version leaves neither moved."""
        loaded = load(self.dir, self.s.device)
        assert loaded is not None  # a shard always has a checkpoint once constructed
        tensors = loaded[0]
        saved = {n: tensors.pop(n) for n in [n for n in tensors if n.startswith(STATE_PREFIX)]}
        if self.server_opt is not None:
            self.server_opt.load(saved)
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.model[name].copy_(tensor)

    def _apply(
        self,
        plan: Plan,
        entries: list[tuple[PlanEntry, Admitted]],
        folded: int,
        fold_seconds: float,
        started: float,
    ) -> None:
        """Step to the folded version: checkpoint, clean up, publish, report."""
        device = self.s.device.type
        metrics.FOLDED_PARAMS.labels(device).inc(folded)
        metrics.FOLD_SECONDS.labels(device).inc(fold_seconds)
        for entry, c in entries:
            metrics.STALENESS.observe(entry.staleness)
            metrics.CLIENT_LAST_UPDATE.labels(c.client).set(time.time())
            self._export_metrics(c.client, c.metrics)
            metrics.UPDATES.labels(ROLE, "folded").inc()
        for update_id, reason in plan.dropped:
            metrics.REJECTED.labels(ROLE, reason).inc()
            log.warning("shard %d: update %s dropped: %s", self.s.shard, update_id, reason)
        log.info(
            "shard %d: version %d: folded %d updates (%s) in %.2f s, scale %.4g",
            self.s.shard,
            plan.version,
            len(entries),
            ", ".join(f"{e.update_id}@{e.factor:.3g}{' clipped' if e.clipped else ''}" for e, _ in entries),
            time.monotonic() - started,
            plan.scale,
        )
        if plan.dp is not None:
            if self.leader is not None:
                metrics.DP_EPSILON.set(plan.dp["epsilon"])
            log.info(
                "shard %d: version %d: differential privacy: epsilon %.4g, clip %.4g, noise std %.3g%s",
                self.s.shard,
                plan.version,
                plan.dp["epsilon"],
                plan.dp["clip"],
                plan.dp["std"],
                " (the last version the budget allows)" if plan.dp.get("final") else "",
            )
        covered = [c for _, c in entries] + [self.complete[u] for u, _ in plan.dropped if u in self.complete]
        self.codec_stats = codec_stats([c.staged for _, c in entries])
        st = self.state
        st.version = plan.version
        st.last_plan = plan
        for c in covered:
            st.finish(st.finished, c.staged.key)
            st.finish(st.finished_updates, c.update_id)
        # without a staleness bound a forgotten id can come back, but only as its own client's update again
        st.forget(keep_versions=(self.s.max_staleness if self.s.max_staleness is not None else 100) + 2)
        self._save()
        for c in covered:
            self.complete.pop(c.update_id, None)
            self.staging.remove(c.staged.key)
        if self.leader is not None:
            self.leader.applied()
        metrics.MODEL_VERSION.labels(self.shard_label).set(st.version)
        metrics.MODEL_VERSION_TIME.labels(self.shard_label).set(time.time())
        metrics.UPDATES_PER_VERSION.labels(self.shard_label).set(len(entries))
        metrics.VERSION_SECONDS.observe(time.monotonic() - self.version_time)
        self.version_time = time.monotonic()
        self._publish_model()
        self._report_stepped()

    def _export_metrics(self, client: str, values: dict[str, float]) -> None:
        """Client metrics as gauges, at most ``MAX_CLIENT_METRICS`` names per client (names already passed
        ``protocol.METRIC_NAME``): label cardinality stays bounded whatever clients send."""
        names = self.client_metrics.setdefault(client, set())
        for key, value in values.items():
            if key not in names:
                if len(names) >= MAX_CLIENT_METRICS:
                    continue
                names.add(key)
            metrics.CLIENT_METRIC.labels(client, key).set(value)

    def _save(self) -> None:
        """The shard's checkpoint: the model of the current version and the state, atomically."""
        if self.leader is not None:
            self.state.planner = self.leader.planner.state()
        self.state.save(self.dir, self._tensors(), record=self._record(), keep=self.s.keep_versions)

    def _record(self) -> dict[str, Any]:
        """What made the current version (``fedq export`` and ``fedq status`` show it): who contributed
        (validated broker users, update ids, weights, staleness), what was dropped, how it was aggregated."""
        plan = self.state.last_plan
        current = plan is not None and plan.version == self.state.version
        return {
            "version": self.state.version,
            "shard": self.s.shard,
            "shards": self.s.shards,
            "made_at": time.time(),
            "tensors": sorted(self.model),
            "aggregation": self._strategy_config(),
            "contributors": protocol.contributors(plan) if plan is not None and current else [],
            "codecs": self.codec_stats if current else {},
            "dropped": [list(d) for d in plan.dropped] if plan is not None and current else [],
        }

    def _checkpoint_bytes(self) -> int:
        """What the next version writes into the state directory before the previous one's files go: its
        checkpoint (model and server optimizer state, in float32) and, with a delta codec, x̂'s new file."""
        saved = 4 * sum(t.numel() for t in self._tensors().values())
        recon = 4 * sum(t.numel() for t in self.model.values()) if self.recon is not None else 0
        return saved + recon

    def _say_room(self, shard_bytes: int) -> None:
        """Log the state directory's room for staging; warn when one user's half of it cannot hold one fp32
        update of this shard: honest updates would then be refused (``quota_room``, ``no_room``)."""
        room = self._room()
        say = log.warning if room.user_limit() < shard_bytes else log.info
        say(
            "shard %d: staging leaves %d MiB free in %s, %d MiB of room above that, one user may stage half "
            "(an fp32 update of this shard: %d MiB; --disk-reserve)",
            self.s.shard,
            self.reserve >> 20,
            self.dir,
            max(0, room.left + room.staged) >> 20,
            shard_bytes >> 20,
        )

    def _room(self) -> admission.Room:
        """The state directory's room for staging now. Its free space is looked at (other shards and other
        programs may share the file system) at most every ``POLL_SECONDS``, and what staging added since is
        taken off it: admitting a message costs no system call (it was a statvfs per message)."""
        now = time.monotonic()
        if now - self._free_seen[0] >= POLL_SECONDS:
            self._free_seen = (now, shutil.disk_usage(self.staging.directory).free, self.staging.nbytes)
        _, free, staged = self._free_seen
        added = max(0, self.staging.nbytes - staged)  # what was dropped since is not credited until looked at
        return admission.Room(free - added - self.reserve, self.staging.nbytes)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """What the checkpoint file holds: the model, and the server optimizer's state next to it."""
        if self.server_opt is None:
            return self.model
        return {**self.model, **self.server_opt.tensors()}

    # distribution -------------------------------------------------------------------------------------------
    def _publish_model(self) -> None:
        """This shard's part of the current version on the models exchange: the whole version in the model
        codec, or, for a delta codec, its delta against x̂ and every ``snapshot_every`` versions a snapshot
        of x̂ (``fedq.reconstruction``). The state then records it as published."""
        st = self.state
        if self.recon is None:
            stream = protocol.model_stream(st.version, self.s.shard)
            st.published_offset = self._publish(stream, self.model, self.s.model_codec)
        else:
            self._publish_reconstruction()
        st.published = st.version
        self._save()
        if self.recon is not None:
            self.recon.prune(st.version)  # x̂ of older versions: a restart republishes from this one on
        log.info(
            "shard %d: version %d published on %s", self.s.shard, st.version, self.s.names.models_exchange
        )

    def _publish_reconstruction(self) -> None:
        """The delta x_v − x̂_{v−1} of the tensors that changed, in the model codec, with x̂_v written to disk
        as it is encoded; a snapshot of x̂_v after it at version 0, every ``snapshot_every`` versions, and
        where x̂_{v−1} is missing (a federation that switched to a delta codec: x̂_v = x_v then)."""
        st, recon = self.state, self.recon
        assert recon is not None
        version = st.version
        st.delta_offset = st.snapshot_offset = -1
        if version > 0 and recon.has(version - 1):
            step = recon.step(version)
            try:
                changed = {n: self.model[n] for n in self.shapes if step.changed(n, self.model[n])}
                stream = protocol.delta_stream(version, self.s.shard)
                st.delta_offset = self._publish(stream, changed, self.s.model_codec, step)
                step.commit()
            except BaseException:
                step.abort()
                raise
            log.info(
                "shard %d: version %d as a %s delta of %d of %d tensors (the others unchanged)",
                self.s.shard,
                version,
                self.s.model_codec,
                len(changed),
                len(self.shapes),
            )
        else:
            recon.reset(version, self.model)
        if st.delta_offset < 0 or version % self.s.snapshot_every == 0:
            snapshot = recon.reader(version)
            try:
                stream = protocol.model_stream(version, self.s.shard)
                st.snapshot_offset = self._publish(stream, snapshot, SNAPSHOT_CODEC)
            finally:
                snapshot.close()
        st.published_offset = st.delta_offset if st.delta_offset >= 0 else st.snapshot_offset

    def _publish(
        self,
        stream: str,
        tensors: Mapping[str, torch.Tensor],
        codec: str,
        feedback: ErrorFeedback | None = None,
    ) -> int:
        """One container stream on the models exchange; returns the models-stream offset where it begins.

        A marker goes first, published so that its offset on the models stream is known: the announcement
        carries the lowest of the shards' offsets, and clients attach there and read only what they need.
        """
        offset = self.t.publish_tracked(
            self.s.names.models_exchange,
            "",
            wire.encode_control(wire.COMMIT, stream + "/start", {}),
            stream=self.s.names.models_stream,
        )
        send_container(
            self.t,
            self.s.names.models_exchange,
            "",
            tensors,
            stream=stream,
            role=ROLE,
            meta=protocol.model_meta(self.state.version, self.s.shard, self.s.shards, self.s.client_config),
            codec_for=lambda name, t: choose_codec(name, tuple(t.shape), codec),
            chunk_bytes=self.s.chunk_bytes,
            feedback=feedback,
        )
        self.t.flush()
        return offset

    def _strategy_config(self) -> dict[str, Any]:
        """The aggregation as announced with each version: strategy, rule, server optimizer, and the ε spent
        so far under central DP (recorded with the version it belongs to)."""
        config = self.s.strategy.config()
        if self.s.rule is not None:
            config.update(self.s.rule.config())
        if self.server_opt is not None:
            config.update(self.server_opt.config())
        plan = self.state.last_plan
        if self.s.privacy is not None and plan is not None and plan.dp is not None:
            config.update({"dp_epsilon": plan.dp["epsilon"], "dp_delta": self.s.privacy.delta})
        return config

    def _contributors(self, version: int) -> list[dict[str, Any]]:
        plan = self.state.last_plan
        return protocol.contributors(plan) if plan is not None and plan.version == version else []

    def _announce(self, announce: Announce) -> None:
        exchange, _ = versions_names(self.s.names)
        st = self.state
        if self.recon is not None:  # the chain clients read: the newest snapshot and the last deltas
            version = announce.version
            kept = [d for d in st.deltas if d[0] < version]
            if announce.delta_offset >= 0:
                st.deltas = [*kept, (version, announce.delta_offset)][-self.s.snapshot_every :]
            else:
                st.deltas = []  # x̂ was reset to x_v: the deltas before it do not lead to it
            if announce.snapshot_offset >= 0:
                st.snapshot = (version, announce.snapshot_offset)
        body = protocol.Announcement(
            announce.version,
            self.s.shards,
            announce.models_offset,
            list(self.all_shapes.items()),
            self._strategy_config(),
            self.s.client_config,
            final=self._final(),
            contributors=self._contributors(announce.version),
            snapshot=st.snapshot if self.recon is not None else None,
            deltas=st.deltas,
            initial=announce.initial,
        ).encode()
        self.t.publish(exchange, "", body, persistent=True)
        self.t.flush()
        self.state.announced = announce.version
        self._save()
        log.info("version %d announced (%d shards)", announce.version, self.s.shards)


# helpers ----------------------------------------------------------------------------------------------------
def codec_stats(updates: list[Staged]) -> dict[str, Any]:
    """This shard's part of the folded updates: bytes staged (as they came over the wire) against their
    float32 size, and the elements each codec carried."""
    elements: dict[str, int] = {}
    fp32 = 0
    for staged in updates:
        for row in (staged.manifest or {}).get("tensors", []):
            numel = math.prod(int(d) for d in row[2])
            elements[str(row[3])] = elements.get(str(row[3]), 0) + numel
            fp32 += 4 * numel
    return {"wire_bytes": sum(s.nbytes for s in updates), "fp32_bytes": fp32, "elements": elements}


def _dtype_limits(init: Path) -> dict[str, float]:
    """The largest magnitude each tensor's dtype in the initial model holds (a float16 model's 65504): a
    version beyond it would turn into Inf in the clients' models, so it is never published."""
    files = initial.locate(init)
    limits: dict[str, float] = {}
    for path in set(files.files.values()):
        names = [n for n, f in files.files.items() if f == path]
        if path.suffix == ".safetensors":
            with SafetensorsReader(path, skip_other_dtypes=True) as reader:
                dtypes = {n: reader.specs[n].dtype for n in names if n in reader.specs}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            dtypes = {n: state[n].dtype for n in names if n in state}
        limits.update({n: float(torch.finfo(d).max) for n, d in dtypes.items() if d.is_floating_point})
    return limits


def _shard_shapes(shapes: dict[str, tuple[int, ...]], shard: int, shards: int) -> dict[str, tuple[int, ...]]:
    sizes = {name: math.prod(shape) * 4 for name, shape in shapes.items()}
    assignment = shard_of(sizes, shards)
    return {name: shape for name, shape in shapes.items() if assignment[name] == shard}
