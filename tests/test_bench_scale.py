"""``fedq bench scale`` reads its figures from the aggregator's log: folds and drops are found by update id,
whatever sender key the log puts in front of it."""

from __future__ import annotations

from pathlib import Path

from fedq.bench.scale import _read_log, _stamp

LOG = """\
2026-11-27 18:59:14,992 INFO fedq.aggregation.service: shard 0: version 3: folded 2 updates \
(5:guest/aa11@0.707, 5:guest/bb22@1 clipped) in 0.24 s, scale 0.1
2026-11-27 18:59:15,100 WARNING fedq.aggregation.service: shard 0: update 5:guest/cc33 dropped: stale
2026-11-27 18:59:15,200 WARNING fedq.aggregation.service: shard 0: refused a message from bob: quota (x)
"""


def test_folds_and_drops_are_read_by_update_id(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.log"
    path.write_text(LOG)
    folds, dropped, refused = _read_log(path)
    folded_at = _stamp("2026-11-27 18:59:14,992")
    # with the version folded into, less 1: a base's staleness counts from it
    assert folds == {"aa11": (folded_at, 2), "bb22": (folded_at, 2)}
    assert dropped == {"cc33"}
    assert refused == [_stamp("2026-11-27 18:59:15,200")]
