#!/usr/bin/env bash
# Data-parallel scaling on this machine: the seed MLP and CNN (an epoch of
# Fashion-MNIST, or of the bundled MNIST sample when Debian's
# dataset-fashion-mnist is missing) and GPT config A (300 steps), each as
#   1 process × 1 thread, 1 process × 2 threads, 2 processes × 1 thread
#   (mpirun), and 4 processes × 1 thread (oversubscribed, for the model),
# printing throughput, the ratio 2×1 / 1×2, and the share of each run's
# training time spent communicating. Then a model of the all-reduce's cost —
# a ring all-reduce makes 2(N−1) steps of bytes/N each, so
# t = 2(N−1)·latency + 2(N−1)/N · bytes / bandwidth — fitted to the
# all-reduce alone at N = 2 (kiln-allreduce-bench, 4 KiB to 16 MiB), then
# checked against N = 4 and the communication each distributed run measured.
#
# Needs Open MPI (Debian: openmpi-bin libopenmpi-dev libclang-dev); builds
# `kiln` with `--features mpi`. The medians are over the records of each run
# (epochs, or evaluation intervals for the GPT). Communication time is what
# rank 0 spent inside the all-reduces, waiting for slower ranks included.
#
#   benches/dist_compare.sh [EPOCHS] [GPT_ITERS]     (default: 3 300)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-3}"
gpt_iters="${2:-300}"
command -v mpirun >/dev/null || { echo "mpirun missing: apt-get install openmpi-bin libopenmpi-dev libclang-dev" >&2; exit 1; }
cargo build --release -q -p kiln-cli -p kiln-dist --features kiln-cli/mpi,kiln-dist/mpi
kiln="$PWD/target/release/kiln"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

dataset=fashion-mnist
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || dataset=mnist-sample

run() { # NAME PROCS THREADS ARGS... → $out/NAME.jsonl
  local name=$1 procs=$2 threads=$3; shift 3
  if [ "$procs" = 1 ]; then
    KILN_THREADS=$threads "$kiln" train "$@" --log-format json --out "$out/$name" \
      > "$out/$name.jsonl" 2> "$out/$name.log"
  else
    mpirun --allow-run-as-root --oversubscribe -np "$procs" -x KILN_THREADS="$threads" \
      "$kiln" train "$@" --log-format json --out "$out/$name" \
      > "$out/$name.jsonl" 2> "$out/$name.log"
  fi
}

for n in 2 4; do
  mpirun --allow-run-as-root --oversubscribe -np "$n" target/release/kiln-allreduce-bench > "$out/allreduce-$n.jsonl"
done
for model in mlp cnn; do
  for cfg in "1 1" "1 2" "2 1" "4 1"; do
    set -- $cfg
    run "$model-$1x$2" "$1" "$2" --model "$model" --dataset "$dataset" --epochs "$epochs" --no-validation
  done
done
for cfg in "1 1" "1 2" "2 1" "4 1"; do
  set -- $cfg
  run "gpt-$1x$2" "$1" "$2" --model gpt --iters "$gpt_iters" --eval-every $(( gpt_iters / 3 )) \
    --eval-iters 5 --seed 1337
done

python3 - "$out" "$dataset" <<'PY'
import json, math, sys
out, dataset = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
load = lambda n: [json.loads(l) for l in open(f"{out}/{n}.jsonl") if l.startswith("{")]
median = lambda xs: sorted(xs)[len(xs) // 2]
# Gradient bytes (f32) per model, and examples per step.
params = {"mlp": 50_890, "cnn": 347_146}
examples = {"fashion-mnist": 60_000, "mnist-sample": 8_000}[dataset]
print(f"Data-parallel scaling, {cpu}; MLP and CNN on {dataset} (batch 128), GPT config A (batch 12 × 64)")
print(f"{'model':<6} {'1×1':>10} {'1×2':>10} {'2×1':>10} {'4×1':>10} {'2×1 / 1×2':>10} {'comm 2×1':>9} {'comm 4×1':>9}  unit")
points = []
for model in ["mlp", "cnn", "gpt"]:
    rate, comm = {}, {}
    for cfg in ["1x1", "1x2", "2x1", "4x1"]:
        recs = load(f"{model}-{cfg}")
        if model == "gpt":
            rate[cfg] = median([r["tokens_per_sec"] for r in recs])
            steps = [r["iters_per_sec"] * r["seconds"] for r in recs]
        else:
            rate[cfg] = median([r["images_per_sec"] for r in recs])
            steps = [-(-examples // 128)] * len(recs)
        if cfg[0] != "1":
            n = int(cfg[0])
            comm[cfg] = sum(r["comm_seconds"] for r in recs) / sum(r["seconds"] for r in recs)
            per_step = median([r["comm_seconds"] / s for r, s in zip(recs, steps)])
            nbytes = 4 * (params.get(model) or recs[0].get("params", 0))
            points.append((model, n, nbytes, per_step))
    unit = "tokens/s" if model == "gpt" else "images/s"
    print(f"{model:<6} {rate['1x1']:>10.0f} {rate['1x2']:>10.0f} {rate['2x1']:>10.0f} {rate['4x1']:>10.0f} "
          f"{rate['2x1'] / rate['1x2']:>9.2f}× {100 * comm['2x1']:>8.1f}% {100 * comm['4x1']:>8.1f}%  {unit}")
# GPT config A's parameters: read from the model file rank 0 saved.
try:
    from struct import unpack
    with open(f"{out}/gpt-2x1/model.safetensors", "rb") as f:
        header = json.loads(f.read(unpack("<Q", f.read(8))[0]))
    gpt_params = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
except OSError:
    gpt_params = 0
points = [(m, n, b or 4 * gpt_params, t) for m, n, b, t in points]
# The all-reduce alone (kiln-allreduce-bench: after a barrier, no training):
# a ring all-reduce makes 2(N−1) steps, each a message of bytes/N, so
# t = 2(N−1)·a + 2(N−1)/N · bytes / B. Latency a and bandwidth B are fitted
# to the 2-rank runs (least squares on relative error, 4 KiB…16 MiB), then
# the model predicts the 4-rank runs and the training runs' all-reduces.
bench = []
for n in (2, 4):
    bench += [json.loads(l) for l in open(f"{out}/allreduce-{n}.jsonl") if l.startswith("{")]
rows = [(2 * (r["world"] - 1), 2 * (r["world"] - 1) / r["world"] * r["bytes"], r["median_s"])
        for r in bench if r["world"] == 2]
# Weighted normal equations for t = a·u + c·v (c = 1/B), weights 1/t².
w = [1 / t ** 2 for _, _, t in rows]
suu = sum(k * u * u for k, (u, v, t) in zip(w, rows)); svv = sum(k * v * v for k, (u, v, t) in zip(w, rows))
suv = sum(k * u * v for k, (u, v, t) in zip(w, rows)); sut = sum(k * u * t for k, (u, v, t) in zip(w, rows))
svt = sum(k * v * t for k, (u, v, t) in zip(w, rows))
det = suu * svv - suv * suv
a = (sut * svv - svt * suv) / det
c = (suu * svt - suv * sut) / det
model = lambda n, b: 2 * (n - 1) * a + 2 * (n - 1) / n * b * c
print(f"\nall-reduce alone (kiln-allreduce-bench), fitted to N = 2: "
      f"t = 2(N−1)·{a * 1e6:.1f} µs + 2(N−1)/N · bytes / {1 / c / 1e9:.2f} GB/s")
print(f"{'N':>2} {'bytes':>10} {'measured µs':>12} {'model µs':>9}")
for r in bench:
    print(f"{r['world']:>2} {r['bytes']:>10} {r['median_s'] * 1e6:>12.0f} {model(r['world'], r['bytes']) * 1e6:>9.0f}")
print("\nin training: rank 0's communication per step against the model's all-reduce of the gradients")
print("(the rest is waiting for the slowest rank, the step totals' all-reduce and the gradient copies)")
print(f"{'model':<6} {'N':>2} {'grad MB':>8} {'measured µs/step':>17} {'all-reduce model µs':>20}")
for m, n, b, t in points:
    print(f"{m:<6} {n:>2} {b / 1e6:>8.2f} {t * 1e6:>17.0f} {model(n, b) * 1e6:>20.0f}")
PY
