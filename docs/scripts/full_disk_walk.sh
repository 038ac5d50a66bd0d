#!/bin/bash
# An aggregator whose state directory fills up mid-run (a 12 MiB tmpfs), then room is made and it is started
# again: does it say so in one line, resume, and end with the exact model? Needs root (it mounts a tmpfs at
# /mnt/small), the local broker, and init.safetensors (2 tensors of 256 x 1024 float32) in /tmp/full; run from
# a checkout with its .venv at /work/main (edit F and PY otherwise). Used for docs/reliability.md ("A full disk").
set -u
F=/work/main/.venv/bin/fedq; PY=/work/main/.venv/bin/python
NS=fullwalk$RANDOM
umount /mnt/small 2>/dev/null; mount -t tmpfs -o size=12m tmpfs /mnt/small
cd /tmp/full
$F broker apply --namespace $NS > apply.log 2>&1; echo "apply rc=$?"
: > agg2.log
$F aggregator --namespace $NS --init init.safetensors --state-dir /mnt/small/state --strategy fedbuff --buffer-size 2 >> agg2.log 2>&1 &
AGG=$!
sleep 5
NS=$NS $PY - > clients.log 2>&1 <<'P' &
import os, torch
import fedq
ns = os.environ["NS"]
clients = [fedq.Client(f"c{i}", namespace=ns, codec="fp32") for i in range(2)]
model = [{f"w{i}": torch.zeros(256, 1024) for i in range(2)} for _ in clients]
from fedq.safetensors import SafetensorsReader
x0 = SafetensorsReader("init.safetensors")
expected = {n: x0[n].double() for n in x0}
for rnd in range(8):
    for c, m in zip(clients, model):
        r = c.receive(m, timeout=120)
        assert r.version == rnd, (r.version, rnd)
        for n, t in m.items():
            noise = torch.randn_like(t) * 0.01
            t.add_(noise)
            expected[n] += 0.5 * noise.double()
        c.send(m, num_samples=10)
    print(f"round {rnd}: sent on version {r.version}", flush=True)
r = clients[0].receive(model[0], timeout=120)
err = max(float((model[0][n].double() - expected[n]).abs().max()) for n in expected)
print("final version", r.version, "max |model - x0 - sum of half-deltas|", err, flush=True)
P
CL=$!
wait $AGG; echo "aggregator exited rc=$? at $(date +%T): $(tail -1 agg2.log)"
ls /mnt/small/state/shard-0/
sleep 3
mount -o remount,size=64m /mnt/small; echo "room made"
$F aggregator --namespace $NS --state-dir /mnt/small/state --strategy fedbuff --buffer-size 2 >> agg2.log 2>&1 &
AGG=$!
wait $CL; echo "clients rc=$?"; cat clients.log
grep -E -i "resum|replay|journal|plan|version 3|version 4" agg2.log | tail -12
kill -TERM $AGG; wait $AGG; echo "agg rc=$?"
$F export /tmp/full/out.safetensors --state-dir /mnt/small/state > export.log 2>&1; echo "export rc=$? $(tail -1 export.log)"
$F broker teardown $NS > teardown.log 2>&1; echo "teardown rc=$? $(tail -1 teardown.log)"
