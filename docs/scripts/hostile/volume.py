"""Walk: one client floods valid updates under FedBuff defaults; where do honest updates land?"""
import json, subprocess, sys, time, uuid
from pathlib import Path
import torch
from fedq.broker import Management, add_client, management_url_for
from fedq.safetensors import save_file
from fedq.topology import Names
from fedq.transport import connect
from tests.conftest import cleanup_namespace
from tests.test_broker_security import client_url
from tests.test_hostile import messages
from tests.aggregation_helpers import small_model, delta_for

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
extra = sys.argv[1:]
ns = f"walkvol{uuid.uuid4().hex[:8]}"; names = Names(ns)
mgmt = Management(management_url_for(URL))
tmp = Path(f"/tmp/fedq-hostile-walk/{ns}"); tmp.mkdir(parents=True)
sd = tmp / "state" / "shard-0"
def version():
    try: return json.loads((sd / "state.json").read_text())["version"]
    except Exception: return 0
try:
    with connect(URL) as op: op.declare(names, 1)
    urls = {}
    for who in ("alice", "bob", "mallory"):
        add_client(mgmt, f"{ns}-{who}", "pw", namespace=ns, vhost="/")
        urls[who] = client_url(URL, f"{ns}-{who}", "pw")
    x0 = small_model()
    init = save_file(x0, tmp / "init.safetensors")
    log = tmp / "agg.log"
    cmd = [sys.executable, "-m", "workers.aggregator", "--amqp-url", URL, "--namespace", ns,
           "--init", str(init), "--state-dir", str(tmp / "state"), "--device", "cpu", "--keep-versions", "100", *extra]
    w = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd="/work/wt-hostile")
    while "version 0 from" not in log.read_text():
        assert w.poll() is None, log.read_text(); time.sleep(0.2)
    d = delta_for(3, x0)
    n = 0
    t0 = time.time()
    with connect(urls["mallory"]) as m, connect(urls["alice"]) as a, connect(urls["bob"]) as b:
        def burst(k):
            global n
            v = version()
            for _ in range(k):
                for body in messages(d, f"m{n}", base=v):
                    m.publish(names.updates_exchange, names.shard_key(0), body)
                n += 1
            m.flush()
        burst(16)
        time.sleep(0.5)
        for body in messages(delta_for(1, x0), "a", base=version()):
            a.publish(names.updates_exchange, names.shard_key(0), body)
        a.flush()
        for body in messages(delta_for(2, x0), "b", base=version()):
            b.publish(names.updates_exchange, names.shard_key(0), body)
        b.flush()
        for _ in range(12):
            burst(4); time.sleep(0.4)
    time.sleep(2)
    rows = []
    for f in sorted(sd.glob("model-v*.json"), key=lambda p: int(p.stem.split("-v")[1])):
        r = json.loads(f.read_text())
        if r["version"] == 0: continue
        rows.append((r["version"], [(c["client"].rsplit("-", 1)[1][0], c["staleness"], round(c["weight"], 2)) for c in r["contributors"]]))
    for v, cs in rows: print(v, cs)
    tot = sum(len(cs) for _, cs in rows); mal = sum(1 for _, cs in rows for c in cs if c[0] == "m")
    print(f"versions {len(rows)}, contributions {tot}, mallory's {mal} ({mal/tot:.0%}); refused:",
          {k: log.read_text().count(k) for k in ("quota_streams", "stale", "quota_bytes")})
finally:
    if 'w' in dir() and w.poll() is None: w.terminate(); w.wait(30)
    cleanup_namespace(mgmt, "/", ns)
