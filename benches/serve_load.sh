#!/usr/bin/env bash
# Load test of `kiln serve`: C concurrent clients (default 8), each with a
# keep-alive connection, send N requests in all (default 4000) of one 28×28
# image to POST /v1/predict; prints requests/s and the p50/p90/p99 latency,
# and the server's batches (how many forward passes served them).
#
#   benches/serve_load.sh [MODEL] [CLIENTS] [REQUESTS]
# MODEL: a model folder or file (default: the seed CNN, trained 1 epoch on
# the bundled sample into a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
clients="${2:-8}"; requests="${3:-4000}"
cargo build --release -q -p kiln-cli
tmp="$(mktemp -d)"; trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
model="${1:-}"
if [ -z "$model" ]; then
  ./target/release/kiln train --model cnn --epochs 1 --out "$tmp/model" --plain > /dev/null
  model="$tmp/model"
fi
./target/release/kiln serve --model "$model" --addr 127.0.0.1:0 > "$tmp/serve.log" &
pid=$!
for _ in $(seq 50); do grep -q serving "$tmp/serve.log" 2>/dev/null && break; sleep 0.1; done
port="$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/serve.log")"
python3 - "$port" "$clients" "$requests" <<'PY'
import http.client, json, sys, threading, time
port, clients, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"image": [((i * 37) % 256) / 255 for i in range(784)]})
lat, lock = [], threading.Lock()
def client(n):
    c = http.client.HTTPConnection("127.0.0.1", port)
    mine = []
    for _ in range(n):
        t = time.perf_counter()
        c.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        mine.append(time.perf_counter() - t)
    with lock: lat.extend(mine)
per = total // clients
threads = [threading.Thread(target=client, args=(per,)) for _ in range(clients)]
t0 = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
wall = time.perf_counter() - t0
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
c = http.client.HTTPConnection("127.0.0.1", port); c.request("GET", "/metrics")
m = c.getresponse().read().decode()
batches = next(l.split()[1] for l in m.splitlines() if l.startswith("kiln_batches_total"))
print(f"{len(lat)} requests, {clients} clients: {len(lat) / wall:.0f} requests/s, "
      f"latency p50 {q(0.5):.2f} ms, p90 {q(0.9):.2f} ms, p99 {q(0.99):.2f} ms; {batches} forward passes")
PY
kill -TERM "$pid"; wait "$pid"
