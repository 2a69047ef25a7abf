#!/usr/bin/env bash
# Trains the seed's models for EPOCHS epochs (default 3) on Fashion-MNIST with
# kiln and with PyTorch CPU, same model, initial weights aside (Adam 1e-3
# ε 1e-7, batch 128, 2 threads each; kiln also with 1), and prints seconds
# per epoch, test accuracy and inference throughput (test set, batches of
# 1000, no autograd), with kiln's ratio to PyTorch for each: medians of
# RUNS (default 3) runs, the frameworks alternating. Inference times the
# forward passes on images already f32, after one untimed warm-up pass
# over the first batch: PyTorch's loop over the prepared tensor (with its
# argmax), and `kiln eval`'s "forward passes alone" (its end-to-end rate
# also converts each batch's bytes and builds a report); each run's rate is
# the median of PASSES (default 5) passes over the test set — PyTorch's in
# one process, kiln's one `kiln eval` each. Two more rows time the same
# trained models inferring in bf16 on 2 threads — PyTorch with a bf16 copy
# of the model on bf16 images, kiln with `kiln eval --precision bf16` — with
# their test accuracy, against PyTorch's f32 and bf16 rates.
#
#   MLP: Flatten → Dense 64 ReLU → Dense 10 softmax
#   CNN: Conv2D 32 3×3 ReLU → MaxPool 2×2 → Flatten → Dense 64 ReLU → Dense 10 softmax
#
# PyTorch comes from PyPI (`pip install torch`, about 3 GB with its CUDA
# wheels): fine for a benchmark, not for CI.
#
#   [RUNS=3] [PASSES=5] benches/train_compare.sh [EPOCHS] [mlp|cnn ...]     (default: 3 mlp cnn)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-3}"
runs="${RUNS:-3}"
passes="${PASSES:-5}"
[[ $runs =~ ^[1-9][0-9]*$ && $passes =~ ^[1-9][0-9]*$ ]] || { echo "RUNS and PASSES must be whole numbers ≥ 1" >&2; exit 2; }
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mlp cnn)
data=/usr/share/datasets/fashion-mnist
[ -f "$data/train-images-idx3-ubyte.gz" ] || { echo "needs Fashion-MNIST: apt-get install dataset-fashion-mnist" >&2; exit 1; }
python3 -c 'import torch, numpy' 2>/dev/null || python3 -m pip install -q torch numpy
cargo build --release -q -p kiln-cli

kiln() { # model threads [bf16] → "s/epoch accuracy images/s [bf16-images/s bf16-accuracy]"
  local out; out="$(mktemp -d)"
  local acc secs
  acc="$(KILN_THREADS=$2 ./target/release/kiln train --model "$1" --dataset fashion-mnist \
    --epochs "$epochs" --no-validation --plain --seed 1 --out "$out" \
    | sed -n 's/^test: .*accuracy \([0-9.]*\)%.*/\1/p')"
  # Seconds per epoch to the millisecond: the mean of the history's epochs
  # (the progress line rounds to 10 ms, a tenth of an MLP epoch).
  secs="$(grep -o '"seconds":[0-9.e-]*' "$out/history.jsonl" | cut -d: -f2 \
    | awk '{s += $1} END {printf "%.3f", s / NR}')"
  # The median of PASSES evaluations' forward-pass rates: one pass over
  # the test set takes milliseconds, which one busy moment on a shared host
  # halves.
  local rates=()
  for _ in $(seq "$passes"); do
    rates+=("$(KILN_THREADS=$2 ./target/release/kiln eval --model "$out" --dataset fashion-mnist \
      | sed -n 's/.*forward passes alone \([0-9]*\) images\/s.*/\1/p')")
  done
  # With `bf16`, the same passes again computing in bf16 (the trained f32
  # weights rounded as they load), and that test accuracy.
  local bf16=()
  local bacc=""
  if [ "${3:-}" = bf16 ]; then
    for _ in $(seq "$passes"); do
      local line
      line="$(KILN_THREADS=$2 ./target/release/kiln eval --model "$out" --dataset fashion-mnist \
        --precision bf16 | grep 'forward passes alone')"
      bf16+=("$(echo "$line" | sed -n 's/.*forward passes alone \([0-9]*\) images\/s.*/\1/p')")
      bacc="$(echo "$line" | sed -n 's/.* accuracy \([0-9.]*\)% (.*/\1/p')"
    done
  fi
  echo "$secs $acc $(median "${rates[@]}") ${bf16:+$(median "${bf16[@]}") $bacc}"
}

torch_run() { # model threads → "s/epoch accuracy images/s bf16-images/s bf16-accuracy"
  python3 - "$data" "$epochs" "$1" "$2" "$passes" <<'PY'
import copy, gzip, sys, time
import numpy as np, torch
data, epochs, model_name, threads, passes = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads); torch.manual_seed(1)
def idx(name, off):
    return np.frombuffer(gzip.open(f"{data}/{name}").read(), np.uint8, offset=off)
x = torch.tensor(idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255
y = torch.tensor(idx("train-labels-idx1-ubyte.gz", 8), dtype=torch.long)
xt = torch.tensor(idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255
yt = torch.tensor(idx("t10k-labels-idx1-ubyte.gz", 8), dtype=torch.long)
nn = torch.nn
if model_name == "mlp":
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
else:
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(32 * 13 * 13, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
loss_fn = nn.CrossEntropyLoss()
times = []
for _ in range(epochs):
    t0 = time.perf_counter()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), 128):
        b = perm[i:i + 128]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[b]), y[b]).backward()
        opt.step()
    times.append(time.perf_counter() - t0)
rates = []
with torch.no_grad():
    model(xt[:1000])
    for _ in range(passes):
        t0 = time.perf_counter()
        correct = sum((model(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum().item()
                      for i in range(0, len(xt), 1000))
        rates.append(len(xt) / (time.perf_counter() - t0))
ips = sorted(rates)[(len(rates) - 1) // 2]  # the lower middle, as `median` below takes
# bf16 inference: a bf16 copy of the trained model on bf16 images (faster
# on this CPU than autocast, which casts the f32 weights at every call).
mb, xb = copy.deepcopy(model).to(torch.bfloat16), xt.to(torch.bfloat16)
rates_b = []
with torch.no_grad():
    mb(xb[:1000])
    for _ in range(passes):
        t0 = time.perf_counter()
        correct_b = sum((mb(xb[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum().item()
                        for i in range(0, len(xb), 1000))
        rates_b.append(len(xt) / (time.perf_counter() - t0))
ips_b = sorted(rates_b)[(len(rates_b) - 1) // 2]
print(f"{sum(times) / len(times):.3f} {100 * correct / len(xt):.2f} {ips:.0f} {ips_b:.0f} {100 * correct_b / len(xt):.2f}")
PY
}

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
echo "Fashion-MNIST, $epochs epochs, batch 128, Adam 1e-3 (torch $(python3 -c 'import torch; print(torch.__version__)'), $(nproc) cores, $cpu)"
echo "medians of $runs runs per row, the frameworks alternating (RUNS=N to change); inference: each run's median of $passes passes (PASSES=N)"
printf '%-5s %-22s %9s %9s %10s %12s %10s\n' model run s/epoch accuracy "epoch ×" "inference/s" "infer ×"
for m in "${models[@]}"; do
  ts=(); tis=(); tbs=(); k2s=(); i2s=(); b2s=(); k1s=(); i1s=()
  for _ in $(seq "$runs"); do
    read -r t ta ti tb tba <<<"$(torch_run "$m" 2)"; ts+=("$t"); tis+=("$ti"); tbs+=("$tb")
    read -r k a2 i b ba2 <<<"$(kiln "$m" 2 bf16)"; k2s+=("$k"); i2s+=("$i"); b2s+=("$b")
    read -r k a1 i <<<"$(kiln "$m" 1)"; k1s+=("$k"); i1s+=("$i")
  done
  t2="$(median "${ts[@]}")"; ti="$(median "${tis[@]}")"; tb="$(median "${tbs[@]}")"
  k2="$(median "${k2s[@]}")"; i2="$(median "${i2s[@]}")"; b2="$(median "${b2s[@]}")"
  k1="$(median "${k1s[@]}")"; i1="$(median "${i1s[@]}")"
  printf '%-5s %-22s %9s %8s%% %10s %12s %10s\n' "$m" "PyTorch CPU, 2 threads" "$t2" "$ta" "1.00×" "$ti" "1.00×"
  printf '%-5s %-22s %9s %8s%% %9.2f× %12s %9.2f×\n' "$m" "kiln, 2 threads" "$k2" "$a2" \
    "$(echo "$t2 / $k2" | bc -l)" "$i2" "$(echo "$i2 / $ti" | bc -l)"
  printf '%-5s %-22s %9s %8s%% %9.2f× %12s %9.2f×\n' "$m" "kiln, 1 thread" "$k1" "$a1" \
    "$(echo "$t2 / $k1" | bc -l)" "$i1" "$(echo "$i1 / $ti" | bc -l)"
  # The same trained models inferring in bf16 (2 threads; the accuracy is
  # the last run's, the × against PyTorch's f32 row).
  printf '%-5s %-22s %9s %8s%% %10s %12s %9.2f×\n' "$m" "PyTorch bf16 inference" "" "$tba" "" "$tb" \
    "$(echo "$tb / $ti" | bc -l)"
  printf '%-5s %-22s %9s %8s%% %10s %12s %9.2f×   (%.2f× PyTorch bf16)\n' "$m" "kiln bf16 inference" "" "$ba2" "" "$b2" \
    "$(echo "$b2 / $ti" | bc -l)" "$(echo "$b2 / $tb" | bc -l)"
done
