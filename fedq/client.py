"""The drop-in client API: an existing training loop joins a federation with three calls.

    client = Client("alice", amqp_url="amqps://alice:...@broker/", codec="nf4")   # connect
    while True:
        round = client.receive(model)                     # newest global version -> the model, in place
        if round.final:                                   # the aggregator's last version: the end
            break
        train(model, steps=round.config.get("local_steps", 50))   # the user's own loop and optimizer
        client.send(model, num_samples=n, metrics={"loss": loss})

Identity: the broker user of the AMQP URL is who the client is (the broker checks every message's
``user_id``); the first argument of ``Client`` is only a label, a prefix of its stream ids that shows up in
the aggregator's logs.

``receive`` reads the ``{ns}.versions`` stream from its last entry to learn the newest version, then reads
that version's container streams (one per aggregator shard) from ``{ns}.models``, starting at the offset the
announcement gives (its first message: nothing older is read). It is atomic: the model is first lined up with
the announced tensors (names, aliases, shapes, dtypes: ``fedq.binding``), then every chunk is decoded into a
``BaseStore`` (a temporary file, not memory, in ``scratch_dir``: ``fedq.scratch`` checks it has room first),
and only when the whole version is in hand is it copied into the model. So a refusal or a failure leaves the
model untouched; the store then keeps the base that ``send`` diffs against (the default), or ``full=True``
sends the tensors themselves (only in a 16- or 32-bit codec: a 4-bit copy of the weights would replace the
global's weights by their rounding).

A client whose model already holds version 0 (the initial weights the aggregator was started with, as
clients of a pretrained LLM usually do) does not download it: its first ``receive`` compares the model's
digest with the one announced (``fedq.initial_digest``) and, on a match, takes version 0 from the model and
reads only the deltas since; on any mismatch it downloads. One log line says which.

``send`` streams: each shard's tensors go as one container to that shard's queue, and every chunk is sliced,
(error-feedback compensated,) encoded and published only when the transport has room, so the serialized update
never exists in memory as a whole. Deltas are computed a chunk at a time, when the chunker reaches them. An
update with no tensors is refused, never sent (it would dilute everyone else's in the average).

Error feedback (on by default for codecs below 16 bits) adds what quantization dropped from a chunk to the
same chunk of the next update, so nothing is lost for good, only delayed; its residuals live in the ``Client``
and carry across rounds. ``trainable_only`` (a constructor option, since it also bounds what ``receive`` keeps
as the delta base) sends only tensors that require gradients: the frozen base of a LoRA model never travels.
It needs a module (or ``state_dict(keep_vars=True)``): a plain state dict has no ``requires_grad``.

When the aggregator reaches its last version (``--max-versions``) it announces it as final: ``receive``
returns it with ``Round.final`` set, and a later ``receive`` or ``send`` raises ``FederationEnded`` at once
(an update sent then would sit in the queue, never folded).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedq import metrics, scratch, wire
from fedq.basestore import BaseStore
from fedq.binding import HINTS, Binding, bind, missing_hint
from fedq.codecs import Codec, EncodedErrorFeedback, ErrorFeedback, choose_codec, get_codec
from fedq.errors import ConfigError, FederationEnded, StreamError, TransportError
from fedq.initial_digest import model_digests, slices
from fedq.protocol import Announcement, UpdateMeta, delta_stream, model_stream, update_stream
from fedq.reconstruction import advance
from fedq.streaming import (
    Assembler,
    CodecFor,
    LazyTensors,
    TensorEntry,
    send_container,
    shard_of,
    wait_for_memory,
)
from fedq.topology import DEFAULT_CHUNK_BYTES, DEFAULT_NAMESPACE, Names, versions_names
from fedq.transport import Delivery, Transport, connect

log = logging.getLogger(__name__)

ROLE = "client"
DEFAULT_TIMEOUT = 300.0
REATTACH_SECONDS = 5.0  # a quiet versions stream is attached to again this often (see _newest_announcement)
Model = nn.Module | MutableMapping[str, torch.Tensor]


@dataclass(frozen=True)
class Reading:
    """How one read of the models stream keeps its memory and reports: ``prefetch`` deliveries read ahead at
    most, none taken while the process is near ``memory_budget`` (``fedq receive --memory-budget``, which
    sets both; ``streaming.wait_for_memory``), and ``on_message`` hears each message's size (a progress
    bar). A training client reads with the defaults: its model, not fedq, is what fills its memory."""

    prefetch: int = 16
    memory_budget: int | None = None
    on_message: Callable[[int], object] | None = None


@dataclass(frozen=True)
class Round:
    """What ``receive`` loaded: the version, and the settings the server sends with it."""

    version: int
    config: dict[str, Any]  # operator settings for clients, e.g. {"local_steps": 50}
    strategy: dict[str, Any]  # the aggregation strategy's parameters
    final: bool = False  # the aggregator's last version: nothing sent from now on will be aggregated


@dataclass(frozen=True)
class Sent:
    """What one ``send`` put on the wire."""

    update_id: str
    base_version: int
    tensors: int
    chunks: int
    wire_bytes: int
    fp32_bytes: int


def codec_policy(requested: str) -> CodecFor:
    """Each tensor's codec: the requested one, except where the codec policy keeps a tiny tensor in fp32."""
    get_codec(requested)  # an unknown name fails here, not at the first send

    def codec_for(name: str, tensor: torch.Tensor) -> Codec:
        return choose_codec(name, tuple(tensor.shape), requested)

    return codec_for


def default_error_feedback(codec: str) -> bool:
    """On for codecs below 16 bits per element: their rounding error is large enough to bias training."""
    return below_16_bits(codec)


def below_16_bits(codec: str) -> bool:
    n = 1 << 16
    return get_codec(codec).payload_nbytes(n) * 8 / n < 16


def delta(local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> LazyTensors:
    """local - base per tensor, in float32 (a bf16 difference would round small updates away), each computed
    when the chunker reaches it: never more than one tensor's delta in memory."""
    return LazyTensors(
        list(local), lambda name: local[name].detach().float() - base[name].float(), _float32_like(local)
    )


def _float32_like(local: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """A delta's shape and dtype (float32) without computing it: a tensor on the meta device."""
    return lambda name: torch.empty(local[name].shape, dtype=torch.float32, device="meta")


def tensors_of(model: Model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a module (its state dict) or of a state dict, optionally trainable only.

    Integer buffers cannot travel (the wire carries float tensors) and are never averaged.
    """
    if isinstance(model, nn.Module):
        state = model.state_dict(keep_vars=True)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    else:
        state = dict(model)
        trainable = {name for name, t in state.items() if t.requires_grad}
    return {
        name: t.detach()
        for name, t in state.items()
        if t.is_floating_point() and (not trainable_only or name in trainable)
    }


class Client:
    """One federation member; see the module docstring for the loop it fits into.

    ``label`` names this client in stream ids and the aggregator's logs; it is not an identity (the broker
    user of ``amqp_url`` is).
    """

    def __init__(
        self,
        label: str,
        *,
        amqp_url: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        codec: str = "nf4",
        error_feedback: bool | None = None,
        trainable_only: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        transport: Transport | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.label = label
        # where the received version (or x̂) and the residuals are kept on disk (fedq/scratch.py)
        self.scratch_dir = scratch.directory(scratch_dir)
        self.names = Names(namespace)
        self.codec = codec
        self.codec_for = codec_policy(codec)
        use_feedback = default_error_feedback(codec) if error_feedback is None else error_feedback
        # residuals kept nf4-encoded, on disk (fedq/codecs/feedback.py)
        self.feedback: ErrorFeedback | None = (
            EncodedErrorFeedback(directory=self.scratch_dir) if use_feedback else None
        )
        self.trainable_only = trainable_only
        self.chunk_bytes = chunk_bytes
        self.transport = transport if transport is not None else connect(amqp_url)
        self.version = -1
        self.final = False
        self.wire_bytes = 0  # sent so far, every message counted
        self.received_bytes = 0  # read from the models stream so far, skipped messages counted too
        self.fp32_bytes = 0
        # the received version, on disk, in the model's dtypes; or x̂ in float32 (versions as deltas)
        self._base: BaseStore | None = None
        self._holds_reconstruction = False
        self._shapes: dict[str, tuple[int, ...]] = {}  # the global model's tensors
        self._assignment: dict[str, int] = {}
        self._shards = 1
        metrics.record_process(ROLE)

    # receiving ----------------------------------------------------------------------------------------------
    def receive(self, model: Model, *, timeout: float = DEFAULT_TIMEOUT) -> Round:
        """Wait for a version newer than the last one received, load it into ``model`` in place, return it.

        A plain state dict gains entries for tensors it lacks; a module must have every tensor of the global.
        Raises ``FederationEnded`` once the final version has been received.
        """
        if self.final:
            raise FederationEnded(f"the federation ended with version {self.version}; nothing newer comes")
        deadline = time.monotonic() + timeout
        announcement = self._newest_announcement(deadline)
        version, shards = announcement.version, announcement.shards
        shapes = dict(announcement.tensors)
        binding = bind(model, shapes)  # refuses before anything is written
        may_add = not isinstance(model, nn.Module)
        if binding.missing and not may_add:
            raise ConfigError(
                f"version {version}: the model has no tensor for {len(binding.missing)} global tensor(s): "
                f"{sorted(binding.missing)[:5]} ({missing_hint(binding)})"
            )
        if isinstance(model, nn.Module) and self.version < 0:
            self._warn_unsendable(model, shapes)
            self._warn_frozen_traffic(binding, announcement)
        initial = self._holds_initial(binding, announcement)
        if announcement.snapshot is None and initial:
            store = self._own_store(binding)  # version 0 itself, from the model
        elif announcement.snapshot is None:
            store = self._receive_whole(binding, announcement, deadline)
        else:
            store = self._reconstruct(binding, announcement, deadline, initial)
        try:
            self._commit(model, binding, store)
        except BaseException:
            store.close()
            raise
        self._base = store
        self._holds_reconstruction = announcement.snapshot is not None
        self._shapes = shapes
        self._assignment = shard_of({n: 4 * math.prod(s) for n, s in shapes.items()}, shards)
        self._shards = shards
        self.version = version
        self.final = announcement.final
        return Round(version, announcement.config, announcement.strategy, self.final)

    def _warn_unsendable(self, model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Say at the first receive what ``send`` will refuse: a reader may hold more than the global (so no
        refusal here), a sender learns it before training."""
        if refusal := self._send_refusal(model, shapes):
            log.warning("send() will refuse this model: %s", refusal)

    def _warn_frozen_traffic(self, binding: Binding, announcement: Announcement) -> None:
        """Say at the first receive that every version will carry tensors this client never sends: versions
        that travel whole hold every tensor, changed or not, so a global holding a LoRA model's frozen base
        costs each client the whole model per version (41x the adapters in the 2026-11-29 walk-through)."""
        frozen = [slot for slot in binding.slots.values() if not slot.trainable]
        if not self.trainable_only or announcement.snapshot is not None or not frozen:
            return
        log.warning(
            "every version carries %d tensor(s) this client does not train (%.1f M elements, e.g. %s), read "
            "again at each receive: start the aggregator with --init the adapter directory (only the "
            "adapters travel) or --model-codec int8/nf4 (versions as deltas: unchanged tensors are not "
            "re-sent)",
            len(frozen),
            sum(slot.tensor.numel() for slot in frozen) / 1e6,
            frozen[0].name,
        )

    def check_sendable(self, model: Model) -> None:
        """Raise the ``ConfigError`` that ``send`` would raise for tensors the global model lacks (an extra
        layer, a different architecture), so that a training loop can fail right after its first
        ``receive``, not after a round of training (``FedqCallback`` does)."""
        if self.version < 0:
            raise ConfigError("check_sendable() needs a version: call receive() first")
        if refusal := self._send_refusal(model, self._shapes):
            raise ConfigError(refusal)

    def _send_refusal(self, model: Model, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """What ``send`` says of ``model``'s tensors that match no global tensor; None when all match."""
        unbound = bind(model, shapes, trainable_only=self.trainable_only).unbound
        return unbound_refusal(unbound) if unbound else None

    def restore(self, model: Model) -> None:
        """Put the last received version back into ``model``, as ``receive`` left it.

        For a training loop that cannot help taking steps after the final version: a ``Trainer`` that joins
        after the federation ended checks for a stop only after its first step (``fedq.hf``).
        """
        if self._base is None:
            raise ConfigError("restore() needs a version: call receive() first")
        with torch.no_grad():
            for name, slot in bind(model, self._shapes).slots.items():
                self._base.read_into(name, slot.tensor)

    def receive_file(
        self,
        out: Path,
        announcement: Announcement,
        metadata: Mapping[str, str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reading: Reading = Reading(),
    ) -> int:
        """A version that travels as deltas into the safetensors file ``out`` (float32, what every client
        holds; it appears only when complete), never held in memory: ``fedq receive`` in a federation with
        ``--model-codec int8/nf4``. x̂ is rebuilt from the newest snapshot and the deltas since in a store on
        disk, as ``receive`` does, then copied into ``out`` a slice at a time, the models stream read as
        ``reading`` says. Returns the tensor count."""
        deadline = time.monotonic() + timeout
        binding = bind({}, dict(announcement.tensors))
        store = self._reconstruct(binding, announcement, deadline, False, reading)
        try:
            store.save(out, metadata)
            return len(store)
        finally:
            store.close()

    def _receive_whole(self, binding: Binding, announcement: Announcement, deadline: float) -> BaseStore:
        """A version that travels whole, into a new store in the model's dtypes (the old base is released
        first: the client never holds two)."""
        self._release_base()
        store = self._new_store(binding, None, f"version {announcement.version}")
        wanted = {model_stream(announcement.version, shard) for shard in range(announcement.shards)}
        try:
            self._load(
                binding, announcement.version, wanted, set(), announcement.models_offset, deadline, store
            )
        except BaseException:
            store.close()
            raise
        return store

    def _holds_initial(self, binding: Binding, announcement: Announcement) -> bool:
        """Whether this first receive can take version 0 from the model itself: it holds version 0 bit for bit
        (its digests match the announced ones, ``fedq.initial_digest``) and version 0 is what the announced
        version needs (version 0 itself, or deltas since it that are all still announced). One log line says
        which way the version comes."""
        version = announcement.version
        if self._base is not None or binding.missing:
            return False
        if announcement.snapshot is None and version > 0:
            return False  # a whole version: version 0 would not help
        offsets = dict(announcement.deltas)
        if announcement.initial is None:
            log.info("version %d: the aggregator announces no digest of version 0: downloading", version)
            return False
        if not all(u in offsets for u in range(1, version + 1)):
            log.info("version %d: the deltas since version 0 are no longer announced: downloading", version)
            return False
        began = time.monotonic()
        tensors = {name: slot.tensor for name, slot in binding.slots.items()}
        held = model_digests(tensors, announcement.tensors, announcement.shards) == announcement.initial
        log.info(
            "version %d: %s (hashed in %.1f s)",
            version,
            "the model holds version 0 already: not downloading it"
            + (f", reading the deltas 1..{version}" if version > 0 else "")
            if held
            else "the model differs from version 0: downloading",
            time.monotonic() - began,
        )
        return held

    def _own_store(self, binding: Binding, dtype: torch.dtype | None = None) -> BaseStore:
        """A store holding the model's own tensors (as ``dtype``, else in their dtypes): version 0, where
        ``_holds_initial`` found the model holds it."""
        store = self._new_store(binding, dtype, "version 0")
        try:
            for name, slot in binding.slots.items():
                store.reserve(name, tuple(slot.tensor.shape), dtype or slot.tensor.dtype)
                offset = 0
                for piece in slices(slot.tensor):
                    store.write(name, offset, piece)
                    offset += piece.numel()
        except BaseException:
            store.close()
            raise
        return store

    def _reconstruct(
        self,
        binding: Binding,
        announcement: Announcement,
        deadline: float,
        initial: bool,
        reading: Reading = Reading(),
    ) -> BaseStore:
        """x̂ of a version that travels as deltas (``fedq.reconstruction``): the deltas since the version held
        (version 0 from the model itself where ``initial``) applied to the x̂ held, when every one of them is
        still announced and readable; else the newest snapshot and the deltas since, into a new store. x̂ is
        kept in float32: every client holds it bit for bit as the aggregator computed it."""
        version, shards = announcement.version, announcement.shards
        offsets = dict(announcement.deltas)
        store: BaseStore | None
        if initial:
            held, store = 0, self._own_store(binding, torch.float32)
        else:
            held, store = self.version, self._base if self._holds_reconstruction else None
        needed = range(held + 1, version + 1)
        if store is not None and held >= 0 and all(u in offsets for u in needed):
            self.version, self._base = -1, None  # until x̂ is whole again: a failure leaves it half applied
            if held == version:
                return store  # version 0, from the model itself
            deltas = {delta_stream(u, s) for u in needed for s in range(shards)}
            try:
                start = offsets[held + 1]
                self._load(binding, version, set(), deltas, start, deadline, store, torch.float32, reading)
                return store
            except StreamError as exc:
                store.close()
                if exc.reason != "version_gone":
                    raise
                # the deltas were trimmed, found at the first delivery, before any was applied: the snapshot
            except BaseException:
                store.close()
                raise
        self._release_base()
        assert announcement.snapshot is not None
        first, offset = announcement.snapshot
        snapshots = {model_stream(first, s) for s in range(shards)}
        deltas = {delta_stream(u, s) for u in range(first + 1, version + 1) for s in range(shards)}
        store = self._new_store(binding, torch.float32, f"x̂ of version {version}")
        try:
            self._load(binding, version, snapshots, deltas, offset, deadline, store, torch.float32, reading)
        except BaseException:
            store.close()
            raise
        return store

    def _new_store(self, binding: Binding, dtype: torch.dtype | None, what: str) -> BaseStore:
        """A store for a version, once the scratch directory is known to have room for all of it (in
        ``dtype``, else the model's dtypes; a tensor the model lacks counted as float32)."""
        nbytes = sum(
            slot.tensor.numel() * (dtype or slot.tensor.dtype).itemsize for slot in binding.slots.values()
        ) + sum(4 * math.prod(shape) for shape in binding.missing.values())
        scratch.check_room(self.scratch_dir, nbytes, what)
        return BaseStore(self.scratch_dir)

    def _release_base(self) -> None:
        if self._base is not None:
            self._base.close()
        self.version, self._base = -1, None

    def _commit(self, model: Model, binding: Binding, store: BaseStore) -> None:
        """Copy a whole downloaded version from ``store`` into the model (it cannot fail: everything was
        checked); the store then shows the delta base: the tensors ``send`` may send. With ``trainable_only``
        those are the tensors that require grad, or all of them when none does (a plain state dict was
        received into, and its module may be sent)."""
        keep_all = not self.trainable_only or not any(slot.trainable for slot in binding.slots.values())
        kept = set()
        with torch.no_grad():
            for name, slot in binding.slots.items():
                store.read_into(name, slot.tensor)
                if keep_all or slot.trainable:
                    kept.add(name)
        if binding.missing:
            assert isinstance(model, MutableMapping)
            for name in binding.missing:
                model[name] = store.read(name)
                if keep_all:
                    kept.add(name)
        store.keep(kept)

    def _newest_announcement(self, deadline: float) -> Announcement:
        """The newest announcement, waiting for one newer than ``self.version``.

        A reader that has heard nothing for ``REATTACH_SECONDS`` attaches at ``last`` again: in CI a client
        started together with its aggregator once waited out its whole timeout for a version 0 that the others
        had received (the announcement was the stream's first message, published as the client attached).
        Attaching again costs one round trip and at worst re-reads the newest announcement.
        """
        _, stream = versions_names(self.names)
        tag = self._consume_when_declared(stream, deadline)
        attached = time.monotonic()
        newest: Announcement | None = None
        try:
            while True:
                # once something newer is in hand, a short quiet spell means the stream's tail has been read
                wait = 0.2 if newest is not None else max(0.0, min(1.0, deadline - time.monotonic()))
                delivery = self._get(stream, wait)
                if delivery is None:
                    if newest is not None:
                        return newest
                    if time.monotonic() >= deadline:
                        raise StreamError(
                            f"no model version newer than {self.version} announced on {stream} in time: "
                            "the aggregator made none (fewer updates than its --buffer-size waiting, or a "
                            "shard down: `fedq status` says which); receive again to keep waiting, or pass "
                            "a longer timeout",
                            reason="timeout",
                        )
                    if time.monotonic() - attached >= REATTACH_SECONDS:
                        self.transport.cancel(tag)
                        tag = self._consume_when_declared(stream, deadline)
                        attached = time.monotonic()
                    continue
                attached = time.monotonic()
                self.transport.ack(delivery)
                announcement = Announcement.parse(delivery.body)
                if announcement.version > self.version and (
                    newest is None or announcement.version > newest.version
                ):
                    newest = announcement
                elif newest is None and announcement.final and announcement.version == self.version:
                    self.final = True
                    raise FederationEnded(
                        f"the federation ended with version {self.version}; nothing newer will come"
                    )
        finally:
            self.transport.cancel(tag)

    def _consume_when_declared(self, stream: str, deadline: float) -> str:
        """Start reading the versions stream from its last entry, waiting for the aggregator to declare it.

        Clients may not declare queues (least privilege), so a client started before its aggregator waits.
        """
        while True:
            try:
                return self.transport.consume(stream, prefetch=64, arguments={"x-stream-offset": "last"})
            except TransportError as exc:
                if exc.reason != "not_found" or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _load(
        self,
        binding: Binding,
        version: int,
        wholes: set[str],
        deltas: set[str],
        offset: int,
        deadline: float,
        store: BaseStore,
        dtype: torch.dtype | None = None,
        reading: Reading = Reading(),
    ) -> None:
        """Every chunk of the container streams ``wholes`` (tensors: written into ``store``, as ``dtype`` or
        else the model's dtypes) and ``deltas`` (x̂ deltas: added to the tensors ``store`` holds), read from
        models-stream offset ``offset`` on.

        Reading starts at the first message needed; a stream that starts the reader later has trimmed it away
        (retention): that is said, not waited out. A shard publishes in order, so a tensor's delta arrives
        after its snapshot and after the delta before it.
        """
        wanted = wholes | deltas
        queue = self.names.models_stream
        tag = self.transport.consume(queue, prefetch=reading.prefetch, arguments={"x-stream-offset": offset})
        assembler = Assembler(role=ROLE)
        first = True
        try:
            while not all(assembler.complete(s) for s in wanted):
                wait_for_memory(reading.memory_budget, max(0.0, deadline - time.monotonic()))
                delivery = self._get(queue, max(0.0, min(1.0, deadline - time.monotonic())))
                if delivery is None:
                    if time.monotonic() >= deadline:
                        missing = sorted(s for s in wanted if not assembler.complete(s))
                        raise StreamError(f"version {version} incomplete: {missing[:5]}", reason="timeout")
                    continue
                if first:
                    _check_not_trimmed(delivery, version, offset, queue)
                    first = False
                self.received_bytes += len(delivery.body)
                if reading.on_message is not None:
                    reading.on_message(len(delivery.body))
                msg = wire.decode(delivery.body)
                if msg.kind == wire.CHUNK and msg.codec is not None:
                    metrics.WIRE_BYTES.labels(ROLE, "received", msg.codec.name).inc(len(delivery.body))
                    metrics.FP32_BYTES.labels(ROLE, "received", msg.codec.name).inc(4 * msg.count)
                if msg.stream in wanted:
                    for chunk in assembler.add(msg):
                        if chunk.stream in deltas:
                            _add_into(store, chunk.entry, chunk.offset, chunk.values())
                        else:
                            _copy_into(store, binding, chunk.entry, chunk.offset, chunk.values(), dtype)
                self.transport.ack(delivery)
        finally:
            self.transport.cancel(tag)
        if absent := sorted(n for n in set(binding.slots) | set(binding.missing) if not store.reserved(n)):
            raise StreamError(f"version {version} lacks announced tensors {absent[:5]}", reason="manifest")

    def _get(self, queue: str, timeout: float) -> Delivery | None:
        """The next delivery of ``queue``; deliveries of a consumer cancelled earlier are acked, skipped."""
        deadline = time.monotonic() + timeout
        while True:
            delivery = self.transport.get(timeout=max(0.0, deadline - time.monotonic()))
            if delivery is None or delivery.queue == queue:
                return delivery
            self.transport.ack(delivery)

    # sending ------------------------------------------------------------------------------------------------
    def send(
        self,
        model: Model,
        *,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
        full: bool = False,
    ) -> Sent:
        """Send the update (delta vs the received version, or ``full`` tensors) weighted by ``num_samples``.

        ``metrics`` (numbers, e.g. the local loss) travel in the manifest; the client's peak RSS is added.
        Raises ``FederationEnded`` after the final version: no aggregator would fold the update.
        """
        local = self._local_tensors(model, full)
        base = self._base
        assert base is not None  # _local_tensors refuses a send before a receive
        tensors = (
            LazyTensors(list(local), local.__getitem__, local.__getitem__)
            if full
            else LazyTensors(
                list(local),
                lambda name: base.delta(name, local[name]),
                _float32_like(local),
                lambda name: _delta_slicer(base, name, local[name]),
            )
        )
        update_id = uuid.uuid4().hex
        meta = UpdateMeta(
            update_id,
            self.version,
            int(num_samples),
            "full" if full else "delta",
            {**{k: float(v) for k, v in (metrics or {}).items()}, "peak_rss_bytes": _peak_rss()},
            self.label,
            len(tensors),
        ).to_meta()
        wire_bytes = fp32_bytes = chunks = 0
        for shard in range(self._shards):
            # every shard gets its container, empty or not: an update folds once all shards have committed it
            names = [name for name in tensors if self._assignment[name] == shard]
            with scratch.writing(self.scratch_dir):  # the residuals' file
                stats = send_container(
                    self.transport,
                    self.names.updates_exchange,
                    self.names.shard_key(shard),
                    LazyTensors(names, tensors.__getitem__, tensors.spec, tensors.slicer),
                    stream=update_stream(self.label, update_id, shard),
                    meta=meta,
                    codec_for=self.codec_for,
                    chunk_bytes=self.chunk_bytes,
                    feedback=self.feedback,
                    role=ROLE,
                    pack=True,  # a small update is one message (wire format version 2: aggregators read it)
                )
            wire_bytes += stats.wire_bytes
            fp32_bytes += stats.fp32_bytes
            chunks += stats.chunks
        self.wire_bytes += wire_bytes
        self.fp32_bytes += fp32_bytes
        return Sent(update_id, self.version, len(tensors), chunks, wire_bytes, fp32_bytes)

    def _local_tensors(self, model: Model, full: bool) -> dict[str, torch.Tensor]:
        """The model's tensors to send, by global name; everything that would make the update wrong or empty
        is refused here, before anything is published."""
        if self.final:
            raise FederationEnded(
                f"the federation ended with version {self.version}: an update sent now would never be folded"
            )
        if self.version < 0:
            raise ConfigError("send() needs a version: call receive() first (and again after a failed one)")
        if full and below_16_bits(self.codec):
            raise ConfigError(
                f"full=True sends the weights themselves, and {self.codec} would replace the global's "
                "weights by their 4/8-bit rounding; send the delta (the default) or use codec='bf16', "
                "'fp16' or 'fp32'"
            )
        binding = bind(model, self._shapes, trainable_only=self.trainable_only)
        if binding.unbound:
            raise ConfigError(unbound_refusal(binding.unbound))
        if not binding.slots:
            why = (
                "no tensor of the model requires grad (a plain state_dict() has none: pass the module, or "
                "state_dict(keep_vars=True))"
                if self.trainable_only
                else "the model has no float tensor the global model has"
            )
            raise ConfigError(f"nothing to send: {why}; an empty update would only dilute the others'")
        if not full and (unknown := sorted(set(binding.slots) - set(self._base or {}))):
            raise ConfigError(
                f"{unknown[:5]} were not received into by the last receive(): send the model (or state dict) "
                "that receive() loaded"
            )
        return {name: slot.tensor for name, slot in binding.slots.items()}

    def close(self) -> None:
        if self._base is not None:
            self._base.close()
        if isinstance(self.feedback, EncodedErrorFeedback):
            self.feedback.close()
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unbound_refusal(unbound: list[str]) -> str:
    """What ``send`` says of model tensors that match no global tensor."""
    more = " and more" if len(unbound) > 5 else ""
    return f"tensors the global model does not have: {unbound[:5]}{more} ({HINTS})"


def _delta_slicer(base: BaseStore, name: str, local: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """One chunk of ``local - base`` at a time (``LazyTensors.slicer``): a sender holds a chunk's delta, never
    a tensor's."""
    flat = local.detach().reshape(-1)
    return lambda offset, count: base.delta(name, flat[offset : offset + count], offset)


def _check_not_trimmed(delivery: Delivery, version: int, models_offset: int, queue: str) -> None:
    """The first delivery must be the version's first message: a stream starts a reader at its oldest message
    where the one asked for was trimmed, and then the version is gone. (Only the first: RabbitMQ's stream
    offsets are not consecutive between 4 MiB messages, so a later jump proves nothing.)"""
    offset = delivery.headers.get("x-stream-offset")
    if isinstance(offset, int) and offset > models_offset:
        raise StreamError(
            f"version {version} can no longer be read: {queue} has trimmed it (it began at offset "
            f"{models_offset}, the oldest message left is at {offset}); the stream's retention "
            "(x-max-length-bytes) holds fewer versions than this client needs: receive() again for the "
            "newest version, or raise the retention",
            reason="version_gone",
        )


def _add_into(store: BaseStore, entry: TensorEntry, offset: int, delta: torch.Tensor) -> None:
    """x̂ += one decoded delta chunk, in the store (``fedq.reconstruction.advance``: as the aggregator did)."""
    held = store.reserved(entry.name)
    if held is None or held[1] != entry.shape:
        raise StreamError(
            f"a delta for {entry.name} {entry.shape}, which this client holds as {held}",
            reason="unknown_tensor",
        )
    store.write(entry.name, offset, advance(store.read_slice(entry.name, offset, delta.numel()), delta))


def _copy_into(
    store: BaseStore,
    binding: Binding,
    entry: TensorEntry,
    offset: int,
    chunk: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> None:
    """Write one decoded chunk into its tensor's place in the store (reserved at its first chunk, in
    ``dtype`` or else the dtype of the model's tensor; the announcement's shapes were checked against the
    model already)."""
    name = entry.name
    if store.reserved(name) is None:
        slot = binding.slots.get(name)
        if slot is None and name not in binding.missing:
            raise StreamError(f"the global model has an unannounced tensor {name!r}", reason="unknown_tensor")
        expected = tuple(slot.tensor.shape) if slot is not None else binding.missing[name]
        if entry.shape != expected:
            raise StreamError(f"{name}: announced as {expected}, streamed as {entry.shape}", reason="shape")
        store.reserve(name, entry.shape, dtype or (slot.tensor.dtype if slot is not None else entry.dtype))
    store.write(name, offset, chunk)


def _peak_rss() -> float:
    return float(metrics.peak_rss_bytes())
