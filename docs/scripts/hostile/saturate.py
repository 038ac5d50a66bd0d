"""Walk: one client keeps the (policy-bounded, 16 MiB) update queue full; when does an honest update fold?"""
import json, subprocess, sys, threading, time, uuid, os
from pathlib import Path
import pika
from fedq import wire
from fedq.broker import Management, add_client, management_url_for
from fedq.protocol import UpdateMeta
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect
from tests.conftest import cleanup_namespace
from tests.test_broker_security import client_url
from tests.aggregation_helpers import small_model, delta_for, send_update

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
kind, FLOOD = sys.argv[1], float(sys.argv[2])
ns = f"walksat{uuid.uuid4().hex[:8]}"; names = Names(ns)
mgmt = Management(management_url_for(URL))
tmp = Path(f"/tmp/fedq-hostile-walk/{ns}"); tmp.mkdir(parents=True)
sd = tmp / "state" / "shard-0"
def version():
    try: return json.loads((sd / "state.json").read_text())["version"]
    except Exception: return 0
def manifest(i):
    meta = UpdateMeta(f"j{i}", 0).to_meta()
    meta["tensors"] = [[f"t{r:08d}", "float32", [1], "fp32", 1, 1] for r in range(1900)]
    meta["chunks"] = 1900
    return wire.encode_control(wire.MANIFEST, f"s/j{i:012d}", meta)
try:
    with connect(URL) as op: op.declare(names, 1)
    if os.environ.get("BOUND"): mgmt.put(f"/policies/%2F/{ns}-bound", {"pattern": f"^{ns}\\.updates\\.", "apply-to": "queues", "definition": {"max-length-bytes": 16 << 20}})
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
    stop = threading.Event(); sent = [0]
    body = manifest(0) if kind == "manifest" else os.urandom(53313)
    template = b"s/j%012d" % 0
    assert body.count(template) == 1 or kind != "manifest"
    def flood():
        c = pika.BlockingConnection(pika.URLParameters(urls["mallory"])); ch = c.channel()
        props = pika.BasicProperties(user_id=f"{ns}-mallory")
        while not stop.is_set():
            sent[0] += 1
            b = body.replace(template, b"s/j%012d" % sent[0]) if kind == "manifest" else body
            ch.basic_publish(names.updates_exchange, names.shard_key(0), b, props)
        c.close()
    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads: t.start()
    time.sleep(3)
    q = mgmt.get(f"/queues/%2F/{ns}.updates.shard.0")
    print(f"after 3 s: queue {q.get('message_bytes', 0) >> 20} MiB, {q.get('messages')} messages; mallory sent {sent[0]}")
    t0 = time.time(); done = [None]
    def honest():
        with connect(urls["alice"]) as a:
            send_update(a, names, delta_for(1, x0), shards=1, update_id="a", base_version=0)
        done[0] = time.time() - t0
    h = threading.Thread(target=honest, daemon=True); h.start()
    while version() < 1 and time.time() - t0 < FLOOD: time.sleep(0.1)
    v1 = time.time() - t0 if version() >= 1 else None
    stop.set()
    for t in threads: t.join()
    t1 = time.time()
    while version() < 1 and time.time() - t1 < 120: time.sleep(0.1)
    print(f"{kind}: alice's publish done after {done[0]} s; version 1 during the flood: {v1}; after the flood stopped: {time.time()-t1:.1f} s (version {version()}); mallory sent {sent[0]}; aggregator refused {log.read_text().count('refused a message')}")
finally:
    if 'w' in dir() and w.poll() is None: w.terminate(); w.wait(30)
    try: mgmt.delete(f"/policies/%2F/{ns}-bound")
    except Exception as e: print(e)
    cleanup_namespace(mgmt, "/", ns)
