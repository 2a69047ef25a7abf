#!/usr/bin/env bash
# Where a training epoch's time goes: samples a `kiln train` run with
# `perf record` (DWARF call stacks, both threads) and sorts every sample
# into one category by the first frame of its stack that names one — the
# GEMM micro-kernel, packing, convolution glue, pooling, the optimiser,
# the data loader, the thread team's waiting, allocation, bookkeeping.
# Needs `perf` and Fashion-MNIST (`apt-get install dataset-fashion-mnist`).
#
#   benches/epoch_profile.sh [mlp|cnn] [EPOCHS] [THREADS]   (default: mlp 10 2)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-mlp}"
epochs="${2:-10}"
threads="${3:-2}"
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release -q -p kiln-cli
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
KILN_THREADS=$threads perf record -q -F 1500 --call-graph dwarf,16384 -o "$tmp/perf.data" \
  ./target/release/kiln train --model "$model" --dataset fashion-mnist --epochs "$epochs" \
  --no-validation --plain --seed 1 --out "$tmp/run" | grep '^test:'
echo "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $threads threads, $model, $epochs epochs"
perf script -i "$tmp/perf.data" 2>/dev/null | python3 -c '
import collections, re, sys
# (category, pattern, matched only as the sample'"'"'s own frame)
CATS = [
    ("GEMM micro-kernel", r"gemm::(avx512|avx2|neon|rows|narrow|bf16)::|gemm::rows", False),
    ("GEMM packing", r"gemm::pack::", False),
    ("GEMM output zeroing and epilogue", r"gemm::Problem|gemm::gemm\b|Workers::filled", False),
    ("fused convolution + ReLU + pool forward (AVX-512 kernel)", r"kiln_cpu::conv::avx512::conv_relu_pool", False),
    ("convolution filter gradient from the routed cells", r"kiln_cpu::conv::routed::", False),
    ("convolution glue (im2col, col2im, gradient routing, bias)", r"kiln_cpu::conv::", False),
    ("max-pool", r"kiln_cpu::pool::", False),
    ("optimiser (Adam)", r"adam|kiln_nn::optim", False),
    ("loss, softmax, elementwise", r"kiln_cpu::vector::|softmax|cross_entropy|reference::", False),
    ("data loader (batches of u8 → f32)", r"kiln_data::loader", False),
    ("dataset load (gunzip, IDX, fingerprint)", r"miniz|kiln_data::idx|kiln_data::dataset", False),
    ("thread team waiting", r"workers::Shared::helper|sched_yield|futex", True),
    ("allocation", r"malloc|_int_free|cfree|realloc", True),
    ("autograd, tensors, bookkeeping", r"kiln_core::|kiln_nn::|kiln_train::", False),
]
CATS = [(n, re.compile(p), own) for n, p, own in CATS]
count, total, block = collections.Counter(), 0, []
def sample(lines):
    global total
    frames = [re.sub(r"^[0-9a-f]+\s+", "", l) for l in lines[1:]]
    if not frames:
        return
    total += 1
    for depth, f in enumerate(frames):
        for name, rx, own in CATS:
            if (depth == 0 or not own) and rx.search(f):
                count[name] += 1
                return
    count["other (plots, reports, start-up)"] += 1
for line in sys.stdin:
    if line.strip():
        block.append(line.strip())
    else:
        sample(block)
        block = []
sample(block)
print(f"{total} samples\n\n| where | share of samples |\n|---|---|")
for name, n in count.most_common():
    print(f"| {name} | {100 * n / total:.1f} % |")
'
