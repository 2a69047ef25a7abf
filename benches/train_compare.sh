#!/usr/bin/env bash
# Trains the seed's MLP (Flatten → Dense 64 ReLU → Dense 10 softmax, Adam 1e-3
# ε 1e-7, batch 128) for EPOCHS epochs (default 3) on Fashion-MNIST with kiln
# and with PyTorch CPU (2 threads each; kiln also with 1), and prints the
# seconds per epoch, the ratio and both test accuracies.
#
# PyTorch comes from PyPI (`pip install torch`, about 3 GB with its CUDA
# wheels): fine for a benchmark, not for CI.
#
#   benches/train_compare.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-3}"
data=/usr/share/datasets/fashion-mnist
[ -f "$data/train-images-idx3-ubyte.gz" ] || { echo "needs Fashion-MNIST: apt-get install dataset-fashion-mnist" >&2; exit 1; }
python3 -c 'import torch, numpy' 2>/dev/null || python3 -m pip install -q torch numpy
cargo build --release -q -p kiln-cli

kiln() { # threads → "s/epoch accuracy"
  KILN_THREADS=$1 ./target/release/kiln train --model mlp --dataset fashion-mnist --epochs "$epochs" \
    --no-validation --plain --seed 1 --out "$(mktemp -d)" \
    | sed -n 's/^test: .*accuracy \([0-9.]*\)%.*(\([0-9.]*\)s\/epoch).*/\2 \1/p'
}

torch_run() { # threads → "s/epoch accuracy"
  python3 - "$data" "$epochs" "$1" <<'PY'
import gzip, sys, time
import numpy as np, torch
data, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads); torch.manual_seed(1)
def idx(name, off):
    return np.frombuffer(gzip.open(f"{data}/{name}").read(), np.uint8, offset=off)
x = torch.tensor(idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255
y = torch.tensor(idx("train-labels-idx1-ubyte.gz", 8), dtype=torch.long)
xt = torch.tensor(idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255
yt = torch.tensor(idx("t10k-labels-idx1-ubyte.gz", 8), dtype=torch.long)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
loss_fn = torch.nn.CrossEntropyLoss()
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
with torch.no_grad():
    acc = (model(xt).argmax(1) == yt).float().mean().item() * 100
print(f"{sum(times) / len(times):.3f} {acc:.2f}")
PY
}

read -r k1 a1 <<<"$(kiln 1)"
read -r k2 a2 <<<"$(kiln 2)"
read -r t2 ta <<<"$(torch_run 2)"
echo "seed MLP on Fashion-MNIST, $epochs epochs, batch 128, Adam 1e-3 (torch $(python3 -c 'import torch; print(torch.__version__)'))"
printf '%-22s %10s %10s %14s\n' "run" "s/epoch" "accuracy" "vs PyTorch"
printf '%-22s %10s %9s%% %14s\n' "PyTorch CPU, 2 threads" "$t2" "$ta" "1.00×"
printf '%-22s %10s %9s%% %13.2f×\n' "kiln, 2 threads" "$k2" "$a2" "$(echo "$t2 / $k2" | bc -l)"
printf '%-22s %10s %9s%% %13.2f×\n' "kiln, 1 thread" "$k1" "$a1" "$(echo "$t2 / $k1" | bc -l)"
