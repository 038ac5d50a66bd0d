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
from dataclasses import dataclass, field
from typing import Any

import torch

from fedq import wire
from fedq.aggregation.staging import Check, ChunkRef, Staged
from fedq.codecs.base import sum_sq
from fedq.errors import FedqError, RejectedUpdate, StreamError, WireError
from fedq.protocol import UpdateMeta
from fedq.streaming import Manifest

STAGE, IGNORE, REFUSE = "stage", "ignore", "refuse"


@dataclass(frozen=True)
class Decision:
    """What to do with one update message: ``STAGE`` it, ``IGNORE`` it (ack without effect) or ``REFUSE``
    it (dead-letter with ``reason``); ``forget``: also drop what is staged of its stream and remember the
    stream as finished."""

    action: str
    reason: str = ""
    detail: str = ""
    forget: bool = False


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
    finished: set[str],
    expired: set[str],
    update_timeout: float,
) -> Decision:
    """The decision for one decoded update message sent by broker user ``user`` (see ``sender``)."""
    if msg.stream in expired:
        return Decision(
            REFUSE,
            "expired",
            f"stream {msg.stream} was dropped after {update_timeout:g} s without a message; "
            "this late part of it is not used",
        )
    if msg.stream in finished:
        return Decision(IGNORE)
    try:
        if msg.kind == wire.CHUNK:
            check_tensor(shapes, msg.name, msg.shape)
        elif msg.kind == wire.MANIFEST:
            try:
                check_manifest(shapes, msg.stream, msg.meta)
            except RejectedUpdate as exc:
                return _refuse(exc, forget=True)
        check_owner(staged.get(msg.stream), msg.stream, user)
    except (RejectedUpdate, StreamError) as exc:
        return _refuse(exc)
    return Decision(STAGE)


def sender(user: str | None) -> str:
    """The validated broker user of a message; nothing else is looked at before this passes."""
    if not user:
        raise RejectedUpdate("update message without a validated AMQP user_id", reason="unauthorised")
    return user


def check_owner(staged: Staged | None, stream: str, user: str) -> None:
    """A stream belongs to the user who staged its first message."""
    if staged is not None and staged.user != user:
        raise RejectedUpdate(
            f"stream {stream!r} belongs to {staged.user!r}, message sent by {user!r}", reason="unauthorised"
        )


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
    manifest, info = parse_manifest(stream, meta)
    if info.update_tensors == 0 or (info.update_tensors is None and not manifest.tensors):
        # An empty update would count (a FedAvg weight, a FedBuff slot) and dilute everyone else's. Emptiness
        # is the whole update's (``update_tensors``): this shard's stream of a non-empty update may be empty,
        # and its commit is still needed before the update folds on any shard.
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
    finished_updates: set[str],
    pending_updates: set[str] | dict[str, Any],
) -> tuple[Manifest, UpdateMeta]:
    """A complete stream checked as a whole, except its chunks' decoded values (see ``admitted``)."""
    assert staged.manifest is not None
    manifest, info = parse_manifest(staged.stream, staged.manifest)
    staleness = version - info.base_version
    if staleness < 0 or (max_staleness is not None and staleness > max_staleness):
        raise RejectedUpdate(
            f"update {info.update_id} is based on version {info.base_version}, current is {version} "
            f"(max staleness {max_staleness})",
            reason="stale",
        )
    if info.update_id in finished_updates:
        raise RejectedUpdate(
            f"update id {info.update_id} was folded or refused already", reason="duplicate_update"
        )
    if info.update_id in pending_updates:
        raise RejectedUpdate(f"update id {info.update_id} is already staged", reason="duplicate_update")
    check_commit(staged, manifest)
    check_coverage(staged, manifest)
    return manifest, info


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
        info.update_id,
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


def current(check: Check | None, kind: str, *, wants_norm: bool, version: int) -> bool:
    """Whether a chunk's note still holds: errors, delta norms and (without a wanted norm) plain checks
    always; a full update's norm only while the global it was measured against is current."""
    if check is None:
        return False
    if check.error is not None or not wants_norm:
        return True
    return check.kind == kind and (kind == "delta" or check.version == version)
