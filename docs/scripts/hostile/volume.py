"""Walk: one client floods valid updates under FedBuff's defaults; where do honest updates land?

Usage: python volume.py [AGGREGATOR OPTIONS, e.g. --distinct-clients --buffer-size 3]
"""

import json
import sys
import time

from walk import Walk, walk

from fedq.safetensors import save_file
from fedq.transport import Transport, connect
from tests.aggregation_helpers import delta_for, small_model
from tests.test_hostile import messages


def send(w: Walk, client: Transport, delta: dict, update_id: str) -> None:
    for body in messages(delta, update_id, base=w.version()):
        client.publish(w.names.updates_exchange, w.names.shard_key(0), body)


def contributions(w: Walk) -> list[tuple[int, list[tuple[str, int, float]]]]:
    """(version, [(client's initial, staleness, weight)]) of every version after 0, from the shard's records."""
    rows = []
    for f in sorted(w.shard_dir.glob("model-v*.json"), key=lambda p: int(p.stem.split("-v")[1])):
        r = json.loads(f.read_text())
        if r["version"]:
            who = [(c["client"].rsplit("-", 1)[1][0], c["staleness"], round(c["weight"], 2)) for c in r["contributors"]]
            rows.append((r["version"], who))
    return rows


if __name__ == "__main__":
    with walk("walkvol", ("alice", "bob", "mallory")) as w:
        x0 = small_model()
        w.start_aggregator(save_file(x0, w.tmp / "init.safetensors"), "--keep-versions", "100", *sys.argv[1:])
        flood, sent = delta_for(3, x0), 0
        with connect(w.urls["mallory"]) as m, connect(w.urls["alice"]) as a, connect(w.urls["bob"]) as b:

            def burst(k: int) -> None:
                global sent
                for _ in range(k):
                    send(w, m, flood, f"m{sent}")
                    sent += 1
                m.flush()

            burst(16)
            time.sleep(0.5)
            send(w, a, delta_for(1, x0), "a")
            a.flush()
            send(w, b, delta_for(2, x0), "b")
            b.flush()
            for _ in range(12):
                burst(4)
                time.sleep(0.4)
        time.sleep(2)
        rows = contributions(w)
        for version, who in rows:
            print(version, who)
        total = sum(len(who) for _, who in rows)
        mallory = sum(1 for _, who in rows for c in who if c[0] == "m")
        log = w.log.read_text()
        print(f"versions {len(rows)}, contributions {total}, mallory's {mallory} ({mallory / total:.0%}); refused:",
              {k: log.count(k) for k in ("quota_streams", "stale", "quota_bytes")})
