#!/usr/bin/env bash
# Compiles every kernels/*.cu to kernels/ptx/*.ptx with NVRTC (PyPI wheel
# nvidia-cuda-nvrtc-cu12), then assembles each PTX with ptxas (wheel
# nvidia-cuda-nvcc-cu12) for sm_80 and sm_90, failing on register spills,
# and writes registers / shared memory / spills per kernel to
# kernels/ptx/REPORT.txt. Needs no GPU and no CUDA toolkit.
#
#   ci/kernels.sh          regenerate (commit the result)
#   ci/kernels.sh --check  regenerate into a temporary folder and fail if
#                          the committed PTX or report differs (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: the PTX text depends on the compiler version.
CUDA_WHEELS_VERSION=12.9.86
ARCH=compute_80
wheels="${KILN_CUDA_WHEELS:-$HOME/.cache/kiln/cuda-wheels-$CUDA_WHEELS_VERSION}"
if [ ! -x "$wheels/nvidia/cuda_nvcc/bin/ptxas" ] || [ ! -f "$wheels/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$wheels" \
    "nvidia-cuda-nvrtc-cu12==$CUDA_WHEELS_VERSION" "nvidia-cuda-nvcc-cu12==$CUDA_WHEELS_VERSION"
fi
nvrtc="$wheels/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
ptxas="$wheels/nvidia/cuda_nvcc/bin/ptxas"
export LD_LIBRARY_PATH="$wheels/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

check=0
[ "${1:-}" = "--check" ] && check=1
out=kernels/ptx
if [ $check = 1 ]; then out="$(mktemp -d)"; fi
mkdir -p "$out"

report="$out/REPORT.txt"
{
  echo "# ptxas $("$ptxas" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), PTX from NVRTC $CUDA_WHEELS_VERSION for $ARCH"
  echo "# kernel                              arch   registers  smem(B)  spill-stores  spill-loads  stack(B)"
} > "$report"

failed=0
for src in kernels/*.cu; do
  name="$(basename "$src" .cu)"
  python3 ci/nvrtc.py "$nvrtc" "$ARCH" kernels "$src" "$out/$name.ptx"
  for sm in sm_80 sm_90; do
    log="$("$ptxas" -arch="$sm" -O3 -v "$out/$name.ptx" -o /dev/null 2>&1)"
    # ptxas -v: "Compiling entry function 'X' for 'sm_90'", then
    # "Used N registers, ... M bytes smem" and "S bytes spill stores, L bytes spill loads".
    echo "$log" | awk -v sm="$sm" '
      /Compiling entry function/ { split($0, q, "'"'"'"); fn = q[2] }
      /spill stores/ {
        match($0, /[0-9]+ bytes stack frame/); fr = substr($0, RSTART, RLENGTH) + 0
        match($0, /[0-9]+ bytes spill stores/); st = substr($0, RSTART, RLENGTH) + 0
        match($0, /[0-9]+ bytes spill loads/); ld = substr($0, RSTART, RLENGTH) + 0
      }
      /Used [0-9]+ registers/ {
        match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15) + 0
        smem = 0
        if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH) + 0
        printf "%-38s %-6s %9d %8d %13d %12d %9d\n", fn, sm, regs, smem, st, ld, fr
      }' >> "$report"
  done
done
cat "$report"
if awk '!/^#/ && ($5 != 0 || $6 != 0) { bad = 1 } END { exit !bad }' "$report"; then
  echo "kernels: register spills (see the report above)" >&2
  failed=1
fi
if [ $check = 1 ]; then
  if ! diff -r kernels/ptx "$out" >/dev/null; then
    diff -r kernels/ptx "$out" | head -40 >&2
    echo "kernels: kernels/ptx is stale; run ci/kernels.sh and commit the result" >&2
    failed=1
  fi
  rm -rf "$out"
fi
exit $failed
