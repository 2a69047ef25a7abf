#!/usr/bin/env bash
# Trains the seed's MLP and CNN on Fashion-MNIST in f32, bf16 and f16
# (mixed precision: f32 master weights; f16 with dynamic loss scaling) and
# prints, per model and precision, the median seconds per epoch, the test
# accuracy after the last epoch, and both against f32 in the same run.
#
#   benches/precision_compare.sh [EPOCHS] [SEED] [mlp|cnn ...]   (default: 10 42 mlp cnn)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-10}"
seed="${2:-42}"
shift 2 || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mlp cnn)
data=/usr/share/datasets/fashion-mnist
[ -f "$data/train-images-idx3-ubyte.gz" ] || { echo "needs Fashion-MNIST: apt-get install dataset-fashion-mnist" >&2; exit 1; }
cargo build --release -q -p kiln-cli
threads="${KILN_THREADS:-$(nproc)}"

run() { # model precision → "median-s/epoch accuracy skipped"
  local out; out="$(mktemp -d)"
  KILN_THREADS=$threads ./target/release/kiln train --model "$1" --dataset fashion-mnist \
    --epochs "$epochs" --seed "$seed" --precision "$2" --plain --out "$out" >/dev/null
  python3 - "$out/history.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
skipped = sum(r.get("skipped_steps") or 0 for r in rows)
print(f'{statistics.median(r["seconds"] for r in rows):.3f} {100 * rows[-1]["val_accuracy"]:.2f} {skipped}')
PY
  rm -rf "$out"
}

echo "Fashion-MNIST, $epochs epochs, seed $seed, batch 128, Adam 1e-3, $threads threads, $(./target/release/kiln info | sed -n "s/^kernels: *//p" | head -1)"
printf '%-5s %-9s %9s %8s %9s %9s %8s\n' model precision s/epoch "× f32" accuracy "Δ points" skipped
for m in "${models[@]}"; do
  base_t="" base_a=""
  for p in f32 bf16 f16; do
    read -r t a k <<<"$(run "$m" "$p")"
    [ -n "$base_t" ] || { base_t=$t; base_a=$a; }
    python3 -c "import sys; m,p,t,a,k,bt,ba=sys.argv[1:]; print(f'{m:<5} {p:<9} {float(t):9.3f} {float(t)/float(bt):8.2f} {float(a):8.2f}% {float(a)-float(ba):+9.2f} {k:>8}')" \
      "$m" "$p" "$t" "$a" "$k" "$base_t" "$base_a"
  done
done
