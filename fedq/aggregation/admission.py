"""Admission: which messages and updates a shard accepts, which it refuses (and why), who owns what.

Pure decisions over staged state, with no I/O and no clock, so that every rule is tested directly (as the
``Planner`` is) and the service only carries them out:

- ``admit``: one update message as it arrives: stage it, ignore it (a redelivery of something finished), or
  refuse it with a reason (it is dead-lettered);
- ``check_complete`` / ``admitted``: a stream whose manifest, chunks and commit have all arrived, checked as a
  whole (staleness, duplicates, commit count, each chunk's slice, dtype and codec, the chunks' noted errors);
- ``measure`` / ``current``: what decoding one chunk finds (its error, or the squared norm of its delta), and
  whether a note taken earlier still holds.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedq import wire
from fedq.aggregation.staging import Check, ChunkRef, Staged, is_duplicate, stream_key
from fedq.codecs.base import sum_sq
from fedq.errors import FedqError, RejectedUpdate, StreamError, WireError
from fedq.protocol import UpdateMeta
from fedq.streaming import Manifest

STAGE, IGNORE, REFUSE = "stage", "ignore", "refuse"
# The most samples one update may claim: FedAvg weighs updates by this claim, so an unbounded one lets a
# single client make the step its own delta. A million local samples per round covers honest fine-tuning.
MAX_SAMPLES = 1_000_000
# What each staged message counts for, at least, in the default message quota: a staged message's index
# entry takes ~525 bytes of memory whatever its size (measured: 200,000 one-element chunks, 29 MiB on disk,
# 100 MiB of index), so a byte quota alone let a client of tiny chunks grow the aggregator's memory by ~3.5x
# its staged bytes (a 1B model's default byte quota is ~20 GiB).
MESSAGE_CHARGE = 64 << 10
# The most of the state directory's staging room one user may hold: the rest stays for everyone else's
# updates, so a client that fills its share leaves room for the others instead of stopping the shard.
USER_ROOM_SHARE = 0.5


@dataclass(frozen=True)
class Decision:
    """What to do with one update message: ``STAGE`` it, ``IGNORE`` it (ack without effect) or ``REFUSE``
    it (dead-letter with ``reason``); ``forget``: also drop what is staged of its stream and remember the
    stream as finished."""

    action: str
    reason: str = ""
    detail: str = ""
    forget: bool = False


@dataclass(frozen=True)
class Quota:
    """What one broker user may hold in a shard's staging: streams (incomplete or waiting for a plan), bytes
    and messages (each is an entry of the staging index in memory). A client over its quota has its new
    messages refused; other clients' never are."""

    streams: int
    nbytes: int
    messages: int


@dataclass(frozen=True)
class Room:
    """The state directory's room for staging, looked at as a message arrives: ``left``, the bytes staging may
    still add before the directory's free space falls to its reserve (what the next checkpoint needs), and
    ``staged``, what all users have staged. Writing into a full directory stops the shard (``NoSpaceError``),
    so staging never takes the reserve, and no user takes more than ``USER_ROOM_SHARE`` of the room
    (``left + staged``): one client's incomplete streams can neither stop the shard nor crowd out the
    others'."""

    left: int
    staged: int

    def user_limit(self) -> int:
        return int(USER_ROOM_SHARE * (self.left + self.staged))


@dataclass
class Admitted:
    """A stream of this shard whose slice is complete and valid, waiting for a plan."""

    staged: Staged
    update_id: str
    client: str
    base_version: int
    num_samples: int
    kind: str
    norm_sq: float
    metrics: dict[str, float]
    by_tensor: dict[str, list[ChunkRef]] = field(default_factory=dict)  # chunks of each tensor, by offset


def _refuse(exc: FedqError, forget: bool = False) -> Decision:
    return Decision(REFUSE, exc.reason, str(exc), forget)


def admit(
    msg: wire.Message,
    user: str,
    *,
    shapes: dict[str, tuple[int, ...]],
    staged: dict[str, Staged],
    finished: Collection[str],
    expired: Collection[str],
    update_timeout: float,
    quota: Quota | None = None,
    size: int = 0,
    usage: tuple[int, int, int] = (0, 0, 0),
    room: Room | None = None,
) -> Decision:
    """The decision for one decoded update message sent by broker user ``user`` (see ``sender``).

    Streams are known by ``stream_key(user, stream)``: whatever ids a client writes, its messages reach only
    its own streams, so nothing it sends can refuse, replace or delete another client's. A message that would
    change a complete stream, or contradict its manifest, is refused alone: the stream stays as it was.
    """
    key = stream_key(user, msg.stream)
    if key in expired:
        return Decision(
            REFUSE,
            "expired",
            f"stream {msg.stream} was dropped after {update_timeout:g} s without a message; "
            "this late part of it is not used",
        )
    if key in finished:
        return Decision(IGNORE)
    current = staged.get(key)
    if current is not None and is_duplicate(current, msg):
        if msg.kind == wire.MANIFEST and msg.meta != current.manifest:
            return Decision(REFUSE, "manifest_mismatch", f"stream {msg.stream}: a second, different manifest")
        return Decision(IGNORE)
    if current is not None and is_complete(current):
        return Decision(
            REFUSE, "stream_complete", f"stream {msg.stream} is complete; a {msg.kind} cannot change it"
        )
    if quota is not None:
        streams, nbytes, messages = usage
        if current is None and streams >= quota.streams:
            return Decision(
                REFUSE,
                "quota_streams",
                f"{user} has {streams} streams staged, the most allowed ({quota.streams})",
            )
        if nbytes + size > quota.nbytes:
            return Decision(
                REFUSE, "quota_bytes", f"{user} has {nbytes} bytes staged; {size} more exceed {quota.nbytes}"
            )
        if messages >= quota.messages:
            return Decision(
                REFUSE,
                "quota_messages",
                f"{user} has {messages} messages staged, the most allowed ({quota.messages}; "
                "--max-user-messages)",
            )
    if room is not None:
        refused = _no_room(user, size, usage[1], room)
        if refused is not None:
            return refused
    try:
        if msg.kind == wire.CHUNK:
            check_tensor(shapes, msg.name, msg.shape)
        elif msg.kind == wire.MANIFEST:
            check_manifest(shapes, msg.stream, msg.meta)
    except (RejectedUpdate, StreamError) as exc:
        # a stream whose manifest is refused is refused whole: it can never complete (it is the sender's own)
        return _refuse(exc, forget=msg.kind == wire.MANIFEST)
    return Decision(STAGE)


def message_quota(nbytes: int, streams: int, tensors: int) -> int:
    """The default message quota: as many messages as ``nbytes`` of the byte quota holds at
    ``MESSAGE_CHARGE`` each, and never fewer than ``streams`` updates of a chunk per tensor (+ manifest and
    commit), so small updates of many tensors are never refused."""
    return max(nbytes // MESSAGE_CHARGE, streams * (tensors + 2))


def _no_room(user: str, size: int, nbytes: int, room: Room) -> Decision | None:
    """The refusal of ``size`` more bytes from ``user`` (``nbytes`` staged) that ``room`` cannot take."""
    if size > room.left:
        return Decision(
            REFUSE,
            "no_room",
            f"the state directory has {room.left} bytes left above its reserve; {size} more do not fit "
            "(free disk, or lower --disk-reserve)",
        )
    if nbytes + size > room.user_limit():
        return Decision(
            REFUSE,
            "quota_room",
            f"{user} has {nbytes} bytes staged; {size} more exceed its share of the state directory's room "
            f"({room.user_limit()} of {room.left + room.staged} bytes)",
        )
    return None


def check_size(size: int, limit: int) -> None:
    """A message larger than the intake limit is refused before it is decoded (the broker's
    ``max_message_size`` should refuse it first; see broker_config/rabbitmq.conf)."""
    if size > limit:
        raise RejectedUpdate(f"message of {size} bytes, the limit is {limit}", reason="too_large")


def sender(user: str | None) -> str:
    """The validated broker user of a message; nothing else is looked at before this passes."""
    if not user:
        raise RejectedUpdate("update message without a validated AMQP user_id", reason="unauthorised")
    return user


def check_tensor(shapes: dict[str, tuple[int, ...]], name: str, shape: tuple[int, ...]) -> None:
    expected = shapes.get(name)
    if expected is None:
        raise RejectedUpdate(f"tensor {name!r} is not one of this shard's", reason="unknown_tensor")
    if tuple(shape) != expected:
        raise RejectedUpdate(
            f"{name!r} has shape {tuple(shape)}, the model {expected}", reason="shape_mismatch"
        )


def parse_manifest(stream: str, meta: dict[str, Any]) -> tuple[Manifest, UpdateMeta]:
    manifest = Manifest.from_message(wire.Message(kind=wire.MANIFEST, stream=stream, meta=meta))
    return manifest, UpdateMeta.parse(manifest.meta)


def check_manifest(shapes: dict[str, tuple[int, ...]], stream: str, meta: dict[str, Any]) -> None:
    rows = meta.get("tensors")
    if isinstance(rows, list) and len(rows) > len(shapes):
        # Each row names a distinct tensor of this shard, so more rows cannot be valid; refused unparsed: a
        # 64 KiB header lists ~1,900 rows, which took 11 ms each to refuse (the version behind 1,000 of them
        # came 11.5 s late; behind 1,000 junk messages 0.4 s)
        raise StreamError(
            f"stream {stream}: bad manifest: {len(rows)} tensors listed, this shard has {len(shapes)}",
            reason="bad_manifest",
        )
    manifest, info = parse_manifest(stream, meta)
    if info.update_tensors == 0 or (info.update_tensors is None and not manifest.tensors):
        # An empty update would count (a FedAvg weight, a FedBuff slot) and dilute everyone else's. Emptiness
        # is the whole update's (``update_tensors``): this shard's stream of a non-empty update may be empty,
        # and its commit is still needed before the update folds on any shard. A claim of tensors elsewhere
        # is checked by the leader: an update with none on any shard is refused (the reports' counts).
        raise RejectedUpdate(f"stream {stream}: an update without tensors", reason="empty_update")
    for entry in manifest.tensors:
        check_tensor(shapes, entry.name, entry.shape)


def is_complete(staged: Staged) -> bool:
    """Manifest, commit, and as many chunks as the manifest declares (their validity is checked later)."""
    if staged.manifest is None or staged.commit is None:
        return False
    total = staged.manifest.get("chunks")
    return isinstance(total, int) and len(staged.chunks) >= total


def check_complete(
    staged: Staged,
    *,
    version: int,
    max_staleness: int | None,
    finished_updates: Collection[str],
    pending_updates: Collection[str],
    max_samples: int = MAX_SAMPLES,
) -> tuple[Manifest, UpdateMeta]:
    """A complete stream checked as a whole, except its chunks' decoded values (see ``admitted``)."""
    assert staged.manifest is not None
    manifest, info = parse_manifest(staged.stream, staged.manifest)
    if info.num_samples > max_samples:
        raise RejectedUpdate(
            f"update {info.update_id} claims {info.num_samples} samples, more than the {max_samples} allowed "
            "(--max-samples)",
            reason="too_many_samples",
        )
    staleness = version - info.base_version
    if staleness < 0 or (max_staleness is not None and staleness > max_staleness):
        raise RejectedUpdate(
            f"update {info.update_id} is based on version {info.base_version}, current is {version} "
            f"(max staleness {max_staleness})",
            reason="stale",
        )
    if update_key(staged.user, info) in finished_updates:
        raise RejectedUpdate(
            f"update id {info.update_id} was folded or refused already", reason="duplicate_update"
        )
    if update_key(staged.user, info) in pending_updates:
        raise RejectedUpdate(f"update id {info.update_id} is already staged", reason="duplicate_update")
    check_commit(staged, manifest)
    check_coverage(staged, manifest)
    return manifest, info


def update_key(user: str, info: UpdateMeta) -> str:
    """What an update is known by on the aggregators (in plans, the planner, the state): its sender and id."""
    return stream_key(user, info.update_id)


def admitted(staged: Staged, info: UpdateMeta) -> Admitted:
    """The admitted update, once every chunk has a current ``check``: its first noted error refuses it."""
    norm_sq = 0.0
    by_tensor: dict[str, list[ChunkRef]] = {}
    for index in sorted(staged.chunks):
        ref = staged.chunks[index]
        assert ref.check is not None
        if ref.check.error is not None:
            reason, detail = ref.check.error
            raise WireError(detail, reason=reason)
        norm_sq += ref.check.norm_sq
        by_tensor.setdefault(ref.name, []).append(ref)
    if not math.isfinite(norm_sq):
        raise RejectedUpdate(f"update {info.update_id} has an infinite norm", reason="norm_bound")
    for refs in by_tensor.values():
        refs.sort(key=lambda r: r.offset)
    return Admitted(
        staged,
        update_key(staged.user, info),
        staged.user,
        info.base_version,
        info.num_samples,
        info.kind,
        norm_sq,
        info.metrics,
        by_tensor,
    )


def check_commit(staged: Staged, manifest: Manifest) -> None:
    """The commit declares the manifest's chunk count (a stream is complete by the manifest's count)."""
    declared = (staged.commit or {}).get("chunks")
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != manifest.chunks:
        raise StreamError(
            f"stream {staged.stream}: commit of {declared!r:.40} chunks, manifest {manifest.chunks}",
            reason="commit_mismatch",
        )


def check_coverage(staged: Staged, manifest: Manifest) -> None:
    """Chunk i is exactly the slice the manifest assigns to index i, with the manifest's dtype and codec, and
    there is no other chunk."""
    for index, ref in staged.chunks.items():
        if index >= manifest.chunks:
            raise RejectedUpdate(f"chunk {index} of a {manifest.chunks}-chunk stream", reason="bad_manifest")
        entry = manifest.entry_for(index)
        if (ref.name, ref.shape, (ref.offset, ref.count)) != (entry.name, entry.shape, entry.slice_of(index)):
            raise RejectedUpdate(
                f"chunk {index} ({ref.name} {ref.offset}+{ref.count}) is not the slice the manifest assigns",
                reason="bad_manifest",
            )
        if (ref.dtype, ref.codec) != (wire.DTYPE_NAMES[entry.dtype], entry.codec):
            raise RejectedUpdate(
                f"chunk {index} of {ref.name} is {ref.dtype}/{ref.codec}, the manifest says "
                f"{wire.DTYPE_NAMES[entry.dtype]}/{entry.codec}",
                reason="bad_manifest",
            )


# measuring chunks -------------------------------------------------------------------------------------------
def measure(
    msg: wire.Message,
    kind: str,
    *,
    model: dict[str, torch.Tensor],
    wants_norm: bool,
    version: int,
    device: torch.device,
) -> Check:
    """What decoding one chunk finds: its error, or its delta's squared norm.

    The norm is wanted only for a norm bound or central DP's clip; without them a chunk is just checked
    (quantized codecs by their scales alone: measured on llama-3.2-1b nf4, 3.8 s of the aggregator's CPU
    during the transfer went to norms). A delta's squared norm comes from the codec's ``sq_norm`` (no full
    decode for quantized codecs); a full update's is of x_client - x_global, which needs the decoded
    values."""
    try:
        if not wants_norm:
            wire.check_chunk(msg, device)
            norm_sq = 0.0
        elif kind == "full":
            values = wire.decode_tensor(msg, device)
            values = values - model[msg.name].reshape(-1)[msg.offset : msg.offset + values.numel()]
            norm_sq = sum_sq(values)
        else:
            norm_sq = wire.chunk_sq_norm(msg, device)
    except WireError as exc:
        return Check(error=(exc.reason, str(exc)))
    return Check(norm_sq=norm_sq, kind=kind, version=version)


def measure_all(
    chunks: Sequence[tuple[wire.Message, str]],
    *,
    model: dict[str, torch.Tensor],
    wants_norm: bool,
    version: int,
    device: torch.device,
) -> list[Check]:
    """``measure`` of each (chunk, update kind): the same notes, but without a norm wanted the chunks are
    checked together (``wire.check_chunks``: a packed update's 28 chunks cost one op sequence per codec, not
    one per chunk; each chunk still gets its own verdict)."""
    if wants_norm:
        return [
            measure(msg, kind, model=model, wants_norm=True, version=version, device=device)
            for msg, kind in chunks
        ]
    errors = wire.check_chunks([msg for msg, _ in chunks], device)
    return [
        Check(error=(exc.reason, str(exc))) if exc is not None else Check(kind=kind, version=version)
        for (_, kind), exc in zip(chunks, errors, strict=True)
    ]


def current(check: Check | None, kind: str, *, wants_norm: bool, version: int) -> bool:
    """Whether a chunk's note still holds: errors, delta norms and (without a wanted norm) plain checks
    always; a full update's norm only while the global it was measured against is current."""
    if check is None:
        return False
    if check.error is not None or not wants_norm:
        return True
    return check.kind == kind and (kind == "delta" or check.version == version)
