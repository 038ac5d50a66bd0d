"""Walk: mallory reconnects in a tight loop (or reads the models stream with 128 consumers) while alice sends
an update at a time; the latency of alice's versions.

Usage: python churn.py churn|consumers
"""

import sys
import threading
import time

import pika
from walk import Walk, walk

from fedq.safetensors import save_file
from fedq.transport import connect
from tests.aggregation_helpers import delta_for, small_model
from tests.test_hostile import messages


def churn(w: Walk, stop: threading.Event, ok: list[int], refused: list[int]) -> None:
    while not stop.is_set():
        try:
            pika.BlockingConnection(pika.URLParameters(w.urls["mallory"])).close()
            ok[0] += 1
        except pika.exceptions.AMQPError:
            refused[0] += 1


def consumers(w: Walk, stop: threading.Event, ok: list[int], refused: list[int]) -> None:
    """Four connections of 32 channels each, all reading the models stream from its first message."""
    connections = []
    for _ in range(4):
        connection = pika.BlockingConnection(pika.URLParameters(w.urls["mallory"]))
        for _ in range(32):
            try:
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1000)
                channel.basic_consume(w.names.models_stream, lambda ch, m, p, b: ch.basic_ack(m.delivery_tag),
                                      arguments={"x-stream-offset": "first"})
                ok[0] += 1
            except pika.exceptions.AMQPError:
                refused[0] += 1
                break
        connections.append(connection)
    while not stop.is_set():
        for connection in connections:
            connection.process_data_events(0.05)


def honest_run(w: Walk, x0: dict, n: int, tag: str, mode: str) -> list[float]:
    """Seconds from each of alice's updates to the version it makes."""
    latencies = []
    with connect(w.urls["alice"]) as a:
        for i in range(n):
            v, t = w.version(), time.time()
            for body in messages(delta_for(i, x0), f"a{tag}{i}", base=v):
                a.publish(w.names.updates_exchange, w.names.shard_key(0), body)
            a.flush()
            while w.version() <= v and time.time() - t < 30:
                time.sleep(0.01)
            latencies.append(time.time() - t)
            print(mode, i, round(latencies[-1], 3), w.version(), flush=True)
    return latencies


if __name__ == "__main__":
    mode = sys.argv[1]
    with walk("walkchurn") as w:
        x0 = small_model()
        w.start_aggregator(save_file(x0, w.tmp / "init.safetensors"), "--buffer-size", "1")
        stop, ok, refused = threading.Event(), [0], [0]
        base = honest_run(w, x0, 10, "base", mode)
        attack = churn if mode == "churn" else consumers
        threads = [threading.Thread(target=attack, args=(w, stop, ok, refused), daemon=True)
                   for _ in range(4 if mode == "churn" else 1)]
        for t in threads:
            t.start()
        time.sleep(2)
        under = honest_run(w, x0, 10, "under", mode)
        stop.set()
        for t in threads:
            t.join(10)
        print(f"{mode}: alice's version latency median {sorted(base)[5] * 1000:.0f} ms alone, "
              f"{sorted(under)[5] * 1000:.0f} ms (max {max(under) * 1000:.0f}) under attack; mallory ok {ok[0]}, "
              f"refused {refused[0]}; aggregator alive {w.alive()}")
