#!/usr/bin/env bash
# kiln on a GPU machine that has no Rust toolchain and no network.
#
#   ci/gpu.sh build [DIR]   (here, on the CPU machine) builds the test and
#                           bench binaries into DIR (default gpu-bin/):
#                           kiln, kiln-gpu-bench, cuda-conformance (the
#                           kiln-cuda test binary: the conformance suite),
#                           stripped, plus Fashion-MNIST if installed
#   ci/gpu.sh run [DIR]     (on the GPU machine, from the repository root)
#                           runs, each under a time limit, in well under 8
#                           minutes: the CUDA conformance suite against the
#                           f64 oracle; GEMM 4096³ (SGEMM, TF32, BF16) against
#                           cuBLAS in the same process; conv and softmax-CE
#                           step times; one epoch of the MLP and the CNN with
#                           --backend cuda; the CNN on the sample with
#                           --distributed nccl (a world of one GPU: the
#                           gradients summed by NCCL in GPU memory); and
#                           the PyTorch yardsticks
#                           (ci/torch_yardstick.py). Output goes to stdout and
#                           to $OUT/gpu-run.txt when OUT is set.
#   ci/gpu.sh gpt [DIR]     (on the GPU machine, a separate call: it needs
#                           minutes of its own) trains GPT config B — nanoGPT's
#                           shakespeare-char, models/gpt-shakespeare-char.toml:
#                           6 layers, 6 heads, 384 wide, block 256, dropout
#                           0.2, batch 64, GPT_ITERS steps (default 5000), lr
#                           1e-3 — with --backend cuda on the bundled corpus,
#                           under a GPT_LIMIT-second limit (default 420),
#                           then samples 500 characters; nanoGPT reports about
#                           3 minutes on an A100 and a validation loss of 1.47.
set -uo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"
dir="${2:-gpu-bin}"

build() {
  set -e
  # NCCL is loaded at run time; MPI stays out (the GPU machine has none),
  # so the NCCL step runs a world of one.
  cargo build --release --locked -p kiln-cli -p kiln-cuda --bins --features kiln-cli/nccl
  local test_exe
  test_exe="$(cargo test --release --locked -p kiln-cuda --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])' | tail -1)"
  [ -n "$test_exe" ] || { echo "gpu.sh: could not find the kiln-cuda test binary" >&2; exit 1; }
  rm -rf "$dir"
  mkdir -p "$dir"
  strip -o "$dir/kiln" target/release/kiln
  strip -o "$dir/kiln-gpu-bench" target/release/kiln-gpu-bench
  strip -o "$dir/cuda-conformance" "$test_exe"
  local fm=/usr/share/datasets/fashion-mnist
  if [ -f "$fm/train-images-idx3-ubyte.gz" ]; then
    mkdir -p "$dir/data/fashion-mnist"
    cp "$fm"/*-ubyte.gz "$dir/data/fashion-mnist/"
  fi
  du -sh "$dir"
  echo "built $dir: carry it to the GPU machine and run ci/gpu.sh run $dir"
}

step() { # name seconds command...
  local name="$1" limit="$2"
  shift 2
  echo
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0))s"
  [ $rc = 0 ] || failures+=("$name (exit $rc)")
}

# cudarc looks for libcublas.so / libcublas.so.12 (and libcublasLt); a CUDA
# 13 machine may have only .so.13 (in the toolkit or PyTorch's wheels).
# Link the newest found under the names cudarc tries, in a folder put first
# on the loader's path (the v12 entry points kiln uses are in v13 too).
# NCCL likewise: cudarc asks for libnccl.so, NCCL installs libnccl.so.2
# (the system's libnccl2, or the nvidia-nccl-cu12 wheel PyTorch brings).
find_cublas() {
  local links=/tmp/kiln-cuda-libs lib d
  mkdir -p "$links"
  for lib in libcublas libcublasLt libnccl; do
    local found=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
             $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
      [ -d "$d" ] || continue
      found="$(find "$d" -maxdepth 4 -name "$lib.so*" 2>/dev/null | sort -V | tail -1)"
      [ -n "$found" ] && break
    done
    if [ -n "$found" ]; then
      ln -sf "$found" "$links/$lib.so"
      echo "using $found for $lib"
      # Its own folder too, for the libraries it loads by their .so.13 names.
      LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  done
  export LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

run() {
  [ -x "$dir/kiln" ] || { echo "gpu.sh: no binaries in $dir; run ci/gpu.sh build first (on the build machine)" >&2; exit 1; }
  failures=()
  find_cublas
  echo "kiln GPU run, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "nvidia-smi: not available"
  "$dir/kiln" info
  local data="$dir/data/fashion-mnist"
  step "CUDA conformance suite" 150 env KILN_REQUIRE_CUDA=1 "$dir/cuda-conformance" --test-threads 4
  step "GEMM vs cuBLAS, conv, softmax-CE, attention" 120 "$dir/kiln-gpu-bench" --size 4096 --reps 20
  if [ -d "$data" ]; then
    step "MLP epoch, --backend cuda" 60 "$dir/kiln" train --backend cuda --model mlp \
      --dataset fashion-mnist --data "$data" --epochs 2 --plain --out "$dir/runs/mlp"
    step "CNN epoch, --backend cuda" 90 "$dir/kiln" train --backend cuda --model cnn \
      --dataset fashion-mnist --data "$data" --epochs 2 --plain --out "$dir/runs/cnn"
  else
    step "CNN epoch on the bundled sample, --backend cuda" 90 "$dir/kiln" train --backend cuda \
      --model cnn --epochs 2 --plain --out "$dir/runs/cnn"
  fi
  # NCCL through the data-parallel path (buckets summed in GPU memory,
  # replicas checked after every step), in a world of one GPU.
  step "NCCL all-reduce, world of one, --distributed nccl" 90 "$dir/kiln" train --backend cuda \
    --distributed nccl --verify-replicas --model cnn --epochs 1 --plain --out "$dir/runs/nccl"
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step "PyTorch yardsticks" 120 python3 ci/torch_yardstick.py "$data" 4096
  else
    echo "PyTorch with CUDA not found: yardsticks skipped"
  fi
  echo
  if [ ${#failures[@]} = 0 ]; then
    echo "gpu.sh: every step passed"
  else
    printf 'gpu.sh: FAILED: %s\n' "${failures[@]}"
    return 1
  fi
}

gpt() {
  [ -x "$dir/kiln" ] || { echo "gpu.sh: no binaries in $dir; run ci/gpu.sh build first (on the build machine)" >&2; exit 1; }
  failures=()
  find_cublas
  echo "kiln GPT config B, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  local iters="${GPT_ITERS:-5000}"
  step "GPT config B, --backend cuda, $iters steps" "${GPT_LIMIT:-420}" "$dir/kiln" train --backend cuda \
    --model models/gpt-shakespeare-char.toml --dataset shakespeare --batch-size 64 --iters "$iters" \
    --eval-every 250 --eval-iters 200 --lr 1e-3 --min-lr 1e-4 --warmup "$(( iters < 100 ? iters : 100 ))" --beta2 0.99 --plain \
    --out "$dir/runs/gpt-b"
  step "GPT config B, 500 characters with the KV cache" 60 "$dir/kiln" generate --backend cuda \
    --model "$dir/runs/gpt-b" --prompt "ROMEO:" --tokens 500 --temperature 0.8 --top-k 200 --seed 1
  [ ${#failures[@]} = 0 ] || { printf 'gpu.sh: FAILED: %s\n' "${failures[@]}"; return 1; }
}

case "$cmd" in
  build) build ;;
  gpt)
    if [ -n "${OUT:-}" ]; then
      gpt 2>&1 | tee "$OUT/gpu-gpt.txt"
      exit "${PIPESTATUS[0]}"
    fi
    gpt
    ;;
  run)
    if [ -n "${OUT:-}" ]; then
      run 2>&1 | tee "$OUT/gpu-run.txt"
      exit "${PIPESTATUS[0]}"
    fi
    run
    ;;
  *) echo "usage: ci/gpu.sh build|run|gpt [DIR]" >&2; exit 2 ;;
esac
