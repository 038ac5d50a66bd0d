"""``fedq bench quality --model llama`` on a tiny Llama: two clients, two rounds, through the real broker."""

from __future__ import annotations

import json
from pathlib import Path

from fedq.cli import main

ROW_KEYS = {
    "setting",
    "val_loss",
    "wire_bytes_up",
    "wire_bytes_down",
    "fp32_bytes_up",
    "fp32_bytes_down",
    "params",
}


def test_llama_quality_rows_and_learning(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "quality-llama.json"
    tiny = "--clients 2 --rounds 2 --local-steps 3 --batch-size 8 --n-embd 64 --n-layer 1 --block-size 32"
    args = [
        *f"bench quality --model llama {tiny} --eval-batches 1 --threads 1".split(),
        *("--settings", "nf4+ef,central", "--amqp-url", amqp_url, "--json", str(out)),
    ]
    assert main(args) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["nf4+ef", "central"]
    assert all(set(r) >= ROW_KEYS for r in rows.values())
    nf4 = rows["nf4+ef"]
    assert nf4["params"] == rows["central"]["params"] > 0
    # 2 clients x 2 updates up; 2 clients x 2 versions (1, 2) down: the clients start from the initial
    # weights and do not download version 0; every tensor counted in float32
    assert nf4["fp32_bytes_up"] == 2 * 2 * 4 * nf4["params"]
    assert nf4["fp32_bytes_down"] == 2 * 2 * 4 * nf4["params"]
    # nf4 both ways (the tiny and 1-D tensors stay fp32 by the codec policy): versions 1 and 2 as nf4 deltas
    assert 0.13 < nf4["wire_bytes_up"] / nf4["fp32_bytes_up"] < 0.3
    assert 0.13 < nf4["wire_bytes_down"] / nf4["fp32_bytes_down"] < 0.3
    losses = [loss for _, loss in nf4["curve"]]  # the federation learned
    assert nf4["val_loss"] == losses[-1] < losses[0]
