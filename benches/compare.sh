#!/usr/bin/env bash
# One comparison run: kiln's SGEMM (each SIMD kernel set) against the
# matrixmultiply and gemm crates and NumPy/OpenBLAS, with the machine's peak
# FMA throughput measured in the same run, for 1 and 2 threads. Prints
# GFLOP/s, % of peak and ratios; with --write, also replaces the table in
# benches/RESULTS.md.
#
#   benches/compare.sh [--quick] [--write]
set -euo pipefail
cd "$(dirname "$0")/.."
quick=""; write=0
for a in "$@"; do
  case "$a" in
    --quick) quick="--quick" ;;
    --write) write=1 ;;
    *) echo "usage: benches/compare.sh [--quick] [--write]" >&2; exit 2 ;;
  esac
done

python3 -c 'import numpy' 2>/dev/null || python3 -m pip install -q numpy
cargo build --release -q -p kiln-bench --bin kiln-bench-compare

out="$(mktemp -d)"
for t in 1 2; do
  # OpenBLAS as NumPy ships it: unset the machine's compatibility overrides
  # for this command only (they select an older, slower kernel).
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t \
    python3 - "$out/numpy-$t.json" "$t" "$quick" <<'PY'
import json, sys, time
import numpy as np
path, threads, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "--quick"
# (m, k, n, flags): flags as kiln-bench-compare's (A then B; t: stored
# transposed, as training's weight and input gradients read them).
shapes = [(64, 64, 64, "nn"), (128, 784, 64, "nn"), (784, 128, 64, "tn")] if quick else \
    [(s, s, s, "nn") for s in (64, 128, 256, 512, 1024, 2048, 4096)] + \
    [(128, 784, 64, "nn"), (784, 128, 64, "tn"), (128, 64, 10, "nn"), (128, 10, 64, "nt"),
     (64, 128, 10, "tn"), (32, 9, 676, "nn"), (128, 5408, 64, "nn"), (5408, 128, 64, "tn"),
     (128, 64, 5408, "nt"), (768, 128, 384, "nn"), (768, 384, 128, "nt"), (128, 768, 384, "tn"),
     (768, 128, 512, "nn"), (768, 512, 128, "nn"), (768, 512, 128, "nt"), (128, 768, 512, "tn"),
     (768, 128, 73, "nt"), (73, 768, 128, "tn")]
res = {}
for m, k, n, flags in shapes:
    # A transposed is stored [k, m] and read as its .T (NumPy hands BLAS
    # the transpose flag, no copy); B likewise from [n, k].
    a = np.random.rand(k, m).astype(np.float32).T if flags[0] == "t" else np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(n, k).astype(np.float32).T if flags[1] == "t" else np.random.rand(k, n).astype(np.float32)
    a @ b
    flops = 2.0 * m * k * n
    reps = max(3, min(200, int(0.4 * 50e9 / flops)))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
    ts.sort()
    res[f"{m},{k},{n},{flags},{threads}"] = flops / ts[len(ts) // 2] / 1e9
try:
    from threadpoolctl import threadpool_info
    info = [i.get("internal_api", "") + " " + str(i.get("architecture", "")) for i in threadpool_info()]
except Exception:
    info = ["threadpoolctl not installed"]
json.dump(res, open(path, "w"))
print(f"numpy {np.__version__}, BLAS: {'; '.join(info)}", file=sys.stderr)
PY
  MATMUL_NUM_THREADS=$t ./target/release/kiln-bench-compare --threads $t --numpy "$out/numpy-$t.json" $quick --markdown | tee "$out/table-$t.md"
  echo
done

if [ "$write" = 1 ]; then
  # Sections after the marker line are measured by other benches; keep them.
  marker='<!-- below: kept by compare.sh -->'
  kept="$(sed -n "/^$marker\$/,\$p" benches/RESULTS.md 2>/dev/null || true)"
  {
    echo "# Benchmark results"
    echo
    echo "Written by \`benches/compare.sh --write\` on $(date -u +%Y-%m-%d): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
    echo "SGEMM, f32, GFLOP/s as the median of repeated runs; operands row-major, or stored transposed where marked Aᵀ / Bᵀ (as training's gradients read them); % of the peak measured in the same run;"
    echo "the ratios compare kiln's best kernel set with each library. Shared, noisy machine: read the ratios, not the decimals."
    for t in 1 2; do
      echo
      echo "## $t thread$([ $t = 2 ] && echo s)"
      echo
      cat "$out/table-$t.md"
    done
    if [ -n "$kept" ]; then
      echo
      echo "$kept"
    fi
  } > benches/RESULTS.md
  echo "wrote benches/RESULTS.md"
fi
rm -rf "$out"
