"""Walk: mallory reconnects in a tight loop (or reads the models stream with 128 consumers) while alice sends
an update a second; the latency of alice's versions."""
import json, subprocess, sys, threading, time, uuid
from pathlib import Path
import pika
from fedq.broker import Management, add_client, management_url_for
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect
from tests.conftest import cleanup_namespace
from tests.test_broker_security import client_url
from tests.test_hostile import messages
from tests.aggregation_helpers import small_model, delta_for

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
mode = sys.argv[1]
ns = f"walkchurn{uuid.uuid4().hex[:8]}"; names = Names(ns)
mgmt = Management(management_url_for(URL))
tmp = Path(f"/tmp/fedq-hostile-walk/{ns}"); tmp.mkdir(parents=True)
sd = tmp / "state" / "shard-0"
def version():
    try: return json.loads((sd / "state.json").read_text())["version"]
    except Exception: return 0
try:
    with connect(URL) as op: op.declare(names, 1)
    urls = {}
    for who in ("alice", "mallory"):
        add_client(mgmt, f"{ns}-{who}", "pw", namespace=ns, vhost="/")
        urls[who] = client_url(URL, f"{ns}-{who}", "pw")
    x0 = small_model()
    init = save_file(x0, tmp / "init.safetensors")
    log = tmp / "agg.log"
    cmd = [sys.executable, "-m", "workers.aggregator", "--amqp-url", URL, "--namespace", ns, "--buffer-size", "1",
           "--init", str(init), "--state-dir", str(tmp / "state"), "--device", "cpu"]
    w = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd="/work/wt-hostile")
    while "version 0 from" not in log.read_text():
        assert w.poll() is None, log.read_text(); time.sleep(0.2)
    stop = threading.Event(); ok = [0]; refused = [0]
    def churn():
        while not stop.is_set():
            try:
                c = pika.BlockingConnection(pika.URLParameters(urls["mallory"])); c.close(); ok[0] += 1
            except Exception:
                refused[0] += 1
    def consumers():
        cs = []
        for _ in range(4):
            c = pika.BlockingConnection(pika.URLParameters(urls["mallory"]))
            for _ in range(32):
                try:
                    ch = c.channel(); ch.basic_qos(prefetch_count=1000)
                    ch.basic_consume(names.models_stream, lambda ch, m, p, b: ch.basic_ack(m.delivery_tag),
                                     arguments={"x-stream-offset": "first"})
                    ok[0] += 1
                except Exception as e:
                    refused[0] += 1; break
            cs.append(c)
        while not stop.is_set():
            for c in cs: c.process_data_events(0.05)
    def honest_run(n, tag):
        lat = []
        with connect(urls["alice"]) as a:
            for i in range(n):
                v = version(); t = time.time()
                for body in messages(delta_for(i, x0), f"a{tag}{i}", base=v):
                    a.publish(names.updates_exchange, names.shard_key(0), body)
                a.flush()
                while version() <= v and time.time() - t < 30: time.sleep(0.01)
                lat.append(time.time() - t); print(mode, i, round(lat[-1], 3), version(), flush=True)
        return lat
    base = honest_run(10, "base")
    threads = [threading.Thread(target=churn if mode == "churn" else consumers, daemon=True) for _ in range(4 if mode == "churn" else 1)]
    for t in threads: t.start()
    time.sleep(2)
    under = honest_run(10, "under")
    stop.set()
    for t in threads: t.join(10)
    print(f"{mode}: alice's version latency median {sorted(base)[5]*1000:.0f} ms alone, {sorted(under)[5]*1000:.0f} ms (max {max(under)*1000:.0f}) under attack; mallory ok {ok[0]}, refused {refused[0]}; aggregator alive {w.poll() is None}")
finally:
    if 'w' in dir() and w.poll() is None: w.terminate(); w.wait(30)
    cleanup_namespace(mgmt, "/", ns)
