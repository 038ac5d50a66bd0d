"""Walk: queue N costly manifests (1,900 rows, 64 KiB headers) ahead of an honest update; time to the version."""
import json, subprocess, sys, time, uuid
from pathlib import Path
from fedq import wire
from fedq.broker import Management, add_client, management_url_for
from fedq.protocol import UpdateMeta
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect
from tests.conftest import cleanup_namespace
from tests.test_broker_security import client_url
from tests.test_hostile import messages
from tests.aggregation_helpers import small_model, delta_for

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
N = int(sys.argv[1]); kind = sys.argv[2]
ns = f"walkman{uuid.uuid4().hex[:8]}"; names = Names(ns)
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
    return wire.encode_control(wire.MANIFEST, f"s/j{i}", meta)
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
    import os
    bodies = [manifest(i) if kind == "manifest" else (os.urandom(53313) if kind == "bigjunk" else b"junk %d" % i) for i in range(N)]
    with connect(urls["mallory"]) as m, connect(urls["alice"]) as a:
        for b in bodies: m.publish(names.updates_exchange, names.shard_key(0), b)
        m.flush()
        t0 = time.time()
        for body in messages(delta_for(1, x0), "a"):
            a.publish(names.updates_exchange, names.shard_key(0), body)
        a.flush()
    while version() < 1 and time.time() - t0 < 300: time.sleep(0.05)
    print(f"{N} x {kind} ({len(bodies[0])} B) queued ahead: version 1 after {time.time()-t0:.2f} s; refused {log.read_text().count('refused a message')}")
finally:
    if 'w' in dir() and w.poll() is None: w.terminate(); w.wait(30)
    cleanup_namespace(mgmt, "/", ns)
