"""The federation's result as one file: every shard's part of a model version, with where it came from.

Two ways to get it. ``export`` reads the aggregator shards' state directories (each keeps its newest versions,
``model-v{N}.safetensors`` with its record ``model-v{N}.json``). ``receive_version`` takes the newest version
announced on the versions stream and reads each shard's part of it from the models stream, so a reader never
gets a version that is still being published, nor one shard of it only. Either writes a safetensors file that
Hugging Face and ``safetensors.torch.load_file`` read (``format: pt`` metadata), with fedq's metadata: the
version, the aggregation, and the contributors (validated broker users, update ids, weights, staleness).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedq.aggregation import checkpoint
from fedq.errors import ConfigError, StreamError
from fedq.protocol import Announcement, model_stream
from fedq.safetensors import SafetensorsReader, SafetensorsWriter
from fedq.topology import Names, versions_names
from fedq.transport.base import Transport

STATE_FILE = checkpoint.STATE


def metadata(
    version: int,
    shards: int,
    aggregation: dict[str, Any],
    contributors: list[Any],
    codecs: dict[str, Any] | None = None,
) -> dict[str, str]:
    """safetensors metadata holds strings only: structured values are JSON."""
    meta = {
        "format": "pt",
        "fedq.version": str(version),
        "fedq.shards": str(shards),
        "fedq.aggregation": json.dumps(aggregation, sort_keys=True),
        "fedq.contributors": json.dumps(contributors, sort_keys=True),
    }
    if codecs is not None:
        meta["fedq.codecs"] = json.dumps(codecs, sort_keys=True)
    return meta


def total_codec_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' codec statistics of one version summed: the updates' bytes on the wire, their float32
    size, and the elements each codec carried."""
    total: dict[str, Any] = {"wire_bytes": 0, "fp32_bytes": 0, "elements": {}}
    for record in records:
        stats = record.get("codecs") or {}
        total["wire_bytes"] += int(stats.get("wire_bytes", 0))
        total["fp32_bytes"] += int(stats.get("fp32_bytes", 0))
        for codec, count in (stats.get("elements") or {}).items():
            total["elements"][codec] = total["elements"].get(codec, 0) + int(count)
    return total


def merge(parts: list[tuple[Path, list[str] | None]], out: Path, meta: dict[str, str]) -> int:
    """Copy the named tensors (all when None) of each part into one file; returns the tensor count. Tensors
    are copied one at a time from memory-mapped files, so a model larger than memory goes through."""
    readers = [(SafetensorsReader(path), names) for path, names in parts]
    try:
        chosen = [(r, n if n is not None else list(r.specs)) for r, n in readers]
        specs = {name: r.specs[name] for r, names in chosen for name in names}
        writer = SafetensorsWriter(out, specs, meta)
        try:
            for reader, names in chosen:
                for name in names:
                    writer.write(name, 0, reader[name].reshape(-1))
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        return len(specs)
    finally:
        for reader, _ in readers:
            reader.close()


# from the aggregators' state directories --------------------------------------------------------------------
def shard_dirs(state_dirs: list[Path]) -> dict[int, Path]:
    """Each shard's directory, from ``--state-dir`` values that are shard directories or hold ``shard-*``."""
    found: dict[int, Path] = {}
    for base in state_dirs:
        if not base.is_dir():
            raise ConfigError(f"--state-dir {base}: no such directory")
        candidates = [base] if (base / STATE_FILE).exists() else sorted(base.glob("shard-*"))
        for directory in candidates:
            if (state := checkpoint.read_state(directory)) is not None:
                found[int(state["shard"])] = directory
    if not found:
        raise ConfigError(f"no aggregator state in {', '.join(map(str, state_dirs))} (a shard-N/state.json)")
    return found


def export(state_dirs: list[Path], out: Path, version: int | None = None) -> dict[str, str]:
    """Assemble ``version`` (default: the newest every shard holds) into ``out``; returns its metadata."""
    dirs = shard_dirs(state_dirs)
    state = checkpoint.read_state(dirs[min(dirs)])
    assert state is not None  # shard_dirs found it
    shards = int(state["shards"])
    missing = sorted(set(range(shards)) - set(dirs))
    if missing:
        raise ConfigError(
            f"the federation has {shards} shards; no state for shard(s) {missing}: give each shard's "
            "directory with --state-dir"
        )
    held = [set(checkpoint.versions(dirs[s])) for s in range(shards)]
    common = set.intersection(*held)
    if version is None:
        if not common:
            raise ConfigError("the shards hold no version in common (are they of one federation?)")
        version = max(common)
    elif version not in common:
        raise ConfigError(
            f"version {version} is not on disk on every shard; versions held by all: {sorted(common)}"
        )
    records = [checkpoint.read_record(dirs[s], version) for s in range(shards)]
    first = records[0]
    codecs = total_codec_stats(records)
    meta = metadata(version, shards, first.get("aggregation", {}), first.get("contributors", []), codecs)
    parts = [(dirs[s] / checkpoint.model_file(version), records[s].get("tensors")) for s in range(shards)]
    merge(parts, out, meta)
    return meta


# from the broker --------------------------------------------------------------------------------------------
def newest_announcement(transport: Transport, names: Names, timeout: float) -> Announcement:
    """The newest version announced on the versions stream (its tail is read until a short quiet spell)."""
    _, stream = versions_names(names)
    tag = transport.consume(stream, prefetch=64, arguments={"x-stream-offset": "last"})
    newest: Announcement | None = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            wait = 0.5 if newest is not None else max(0.0, deadline - time.monotonic())
            delivery = transport.get(wait)
            if delivery is None:
                if newest is not None:
                    return newest
                raise StreamError(
                    f"no model version announced on {stream} within {timeout:.0f} s", reason="timeout"
                )
            transport.ack(delivery)
            announcement = Announcement.parse(delivery.body)
            if newest is None or announcement.version > newest.version:
                newest = announcement
    finally:
        transport.cancel(tag)


def receive_version(
    transport: Transport, names: Names, out: Path, announcement: Announcement, **options: Any
) -> int:
    """Every shard's part of an announced version from the models stream, into one file at ``out``; returns
    the tensor count. ``options`` go to ``streaming.receive_file`` (timeout, memory budget, prefetch)."""
    from fedq.streaming import receive_file

    version, shards = announcement.version, announcement.shards
    meta = metadata(version, shards, announcement.strategy, announcement.contributors)
    if announcement.snapshot is not None:
        return _receive_reconstruction(transport, names, out, announcement, meta, **options)
    parts: list[tuple[Path, list[str] | None]] = []
    try:
        for shard in range(shards):
            part = out.with_name(f"{out.name}.shard{shard}.part")
            parts.append((part, None))
            receive_file(
                transport,
                names.models_stream,
                part,
                model_stream(version, shard),
                consume_arguments={"x-stream-offset": announcement.models_offset},
                **options,
            )
        return merge(parts, out, meta)
    finally:
        for part, _ in parts:
            part.unlink(missing_ok=True)


def _receive_reconstruction(
    transport: Transport,
    names: Names,
    out: Path,
    announcement: Announcement,
    meta: dict[str, str],
    *,
    timeout: float,
    memory_budget: int | None = None,
    prefetch: int = 16,
    on_message: Callable[[int], object] | None = None,
    **_: Any,
) -> int:
    """A version that travels as deltas (``--model-codec int8/nf4``): x̂, what every client holds, rebuilt as
    a client does (``fedq.Client.receive_file``: the newest snapshot and the deltas since) and written in
    float32, the models stream read within the same prefetch and memory budget as a whole version. The
    snapshot and the deltas come as one read of the models stream with no manifest to size a progress bar by
    (``on_manifest`` is not called), so the bar counts up. x̂ is rebuilt in a temporary file beside ``out``:
    that directory needs room for the model twice."""
    from fedq.client import Client, Reading

    # x̂ is rebuilt beside OUT, where room for a model was asked for, not in $TMPDIR (often a tmpfs: memory)
    client = Client("receive", namespace=names.namespace, transport=transport, scratch_dir=Path(out).parent)
    reading = Reading(prefetch, memory_budget, on_message)
    return client.receive_file(out, announcement, meta, timeout=timeout, reading=reading)
