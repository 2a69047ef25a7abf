#!/usr/bin/env bash
# The README's test command: installs everything the tests need on a fresh
# machine, then runs the formatting and lint gates and every test.
#
#   ci/test.sh            everything
#   ci/test.sh --quick    skip fmt, clippy, the NEON run, the CUDA kernel
#                         build check and the fuzz smoke
#
# KILN_FUZZ_SECONDS (default 20) sets the fuzz smoke's time per target.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

step() { printf '\n== %s\n' "$*"; }

# --- system packages --------------------------------------------------------
# Fashion-MNIST from Debian (installs to /usr/share/datasets/fashion-mnist),
# the TrueType font the plots' text is laid out with, OpenBLAS (a
# comparator `kiln bench` loads at run time), Chromium (the headless
# browser that renders `kiln report`'s HTML page in the CLI tests), Open
# MPI with libclang (the `mpi` feature's build and its `mpirun` tests) and
# Valgrind (the C ABI's example runs under memcheck).
missing_packages() {
  [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && return 0
  [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && return 0
  [ ! -e /usr/lib/"$(uname -m)"-linux-gnu/openblas-pthread/libopenblas.so.0 ] && return 0
  ! command -v mpicc >/dev/null && return 0
  ! command -v mpirun >/dev/null && return 0
  ! compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null && return 0
  ! command -v valgrind >/dev/null && return 0
  ! command -v chromium >/dev/null
}
if missing_packages; then
  step "installing dataset-fashion-mnist, fonts-dejavu-core, libopenblas0-pthread, chromium, Open MPI, libclang and valgrind"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    dataset-fashion-mnist fonts-dejavu-core libopenblas0-pthread chromium \
    openmpi-bin libopenmpi-dev libclang-dev valgrind
fi
export KILN_REQUIRE_PLOTS=1 KILN_REQUIRE_OPENBLAS=1 KILN_REQUIRE_BROWSER=1 KILN_REQUIRE_MPI=1
export KILN_REQUIRE_VALGRIND=1

# --- Rust components --------------------------------------------------------
if [ "$quick" = 0 ]; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy (warnings are errors)"
  cargo clippy --workspace --all-targets --locked -- -D warnings
  cargo clippy -p kiln-dist -p kiln-cli --features kiln-cli/mpi,kiln-cli/nccl,kiln-dist/mpi,kiln-dist/nccl \
    --all-targets --locked -- -D warnings
  # The light builds embedders get: no TOML, plots or progress bars.
  cargo clippy -p kiln-nn -p kiln-train --no-default-features --all-targets --locked -- -D warnings
  step "cargo package: every crate packages from its own folder"
  cargo package --workspace --no-verify --locked --allow-dirty --quiet
  step "cargo doc (warnings are errors)"
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
fi

# --- tests ------------------------------------------------------------------
# The `ci` profile is optimised (the training tests need it) with overflow
# checks and debug assertions on. Datasets are required: a missing one fails,
# as does a g++ that cannot build the CUDA kernels' CPU emulation
# (kernels/host/, crates/kiln-cuda/tests/host_emulation.rs).
# Every SIMD kernel set this processor has must run its conformance suite
# (a set the processor lacks would be skipped, so name them explicitly).
required=""
if [ "$(uname -m)" = x86_64 ]; then
  grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && required="avx2"
  grep -qw avx512f /proc/cpuinfo && required="$required,avx512"
fi
# Where the processor reports AMX-BF16, the bf16 GEMM's AMX tile must run
# its test too (not skip).
grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null && export KILN_REQUIRE_AMX=1
step "cargo test (kernel sets required: scalar${required:+,$required}${KILN_REQUIRE_AMX:+, AMX})"
KILN_REQUIRE_DATASETS=1 KILN_REQUIRE_KERNELS="$required" KILN_REQUIRE_HOST_EMULATION=1 \
  cargo test --workspace --profile ci --locked

# The Rust examples assert what they show (the C example runs in
# kiln-capi's tests above, directly and under Valgrind).
step "examples/rust"
for example in tensors custom_loop train_mlp load_and_predict; do
  cargo run -q -p kiln-examples --example "$example" --profile ci --locked >/dev/null
done
cargo run -q -p kiln-examples --example tensors --profile ci --locked -- scalar >/dev/null

# The Python package: a wheel built by maturin, installed into a fresh
# virtual environment, and the pytest suite run against the installed
# module (from outside the source tree).
step "Python package: maturin wheel, pytest"
python3 -m venv target/python-ci
target/python-ci/bin/pip install -q --disable-pip-version-check maturin pytest numpy
rm -rf target/wheels
target/python-ci/bin/maturin build --profile ci -m python/Cargo.toml -o target/wheels
target/python-ci/bin/pip install -q --disable-pip-version-check --force-reinstall target/wheels/kiln-*.whl
(cd target && python-ci/bin/python -m pytest -q ../python/tests)

# Benchmarks as a smoke only (numbers come from benches/compare.sh): each
# criterion bench once, and the comparison binary on two small shapes.
step "benchmark smoke"
cargo test -p kiln-bench --benches --profile ci --locked

# Data-parallel training over MPI: the `mpi` feature's build (Open MPI via
# rsmpi) and `kiln train` under a real mpirun — replicas, a killed rank, a
# failing rank, Ctrl-C to the launcher.
step "MPI: kiln-dist and kiln train under mpirun (features mpi, nccl)"
# One test at a time: each starts up to 4 ranks on this machine's cores.
# Built with NCCL too (loaded at run time): with no GPU here, its errors.
KILN_REQUIRE_MPI=1 cargo test -p kiln-dist -p kiln-cli --features kiln-cli/mpi,kiln-cli/nccl \
  --profile ci --locked --lib --test mpi -- --test-threads=1
cargo test -p kiln-cli --features kiln-cli/mpi,kiln-cli/nccl --profile ci --locked \
  --test cli errors_are_one_clear_line

step "CUDA host code: planted faults fail the suite on the emulated device"
KILN_REQUIRE_HOST_EMULATION=1 \
  cargo test -p kiln-cuda --features planted-faults --test planted_host_faults --profile ci --locked
cargo clippy -p kiln-cuda --features planted-faults --all-targets --locked -- -D warnings
cargo run -q -p kiln-bench --bin kiln-bench-compare --profile ci --locked -- --quick

# NEON: the aarch64 build of kiln-cpu's tests under qemu-aarch64.
if [ "$quick" = 0 ]; then
  step "NEON kernels under qemu-aarch64"
  ci/neon.sh
fi

# --- CUDA kernels, offline -----------------------------------------------------
# NVRTC and ptxas from PyPI wheels (no GPU, no toolkit): the committed PTX
# must be what kernels/*.cu compile to, and no kernel may spill on sm_80 or
# sm_90. (The kiln-cuda crate's own tests ran above; without a GPU its
# conformance suite reports itself skipped.)
if [ "$quick" = 0 ]; then
  step "CUDA kernels: NVRTC → PTX, ptxas sm_80/sm_90, no spills, PTX up to date"
  ci/kernels.sh --check
fi

# --- fuzz smoke ---------------------------------------------------------------
# Every cargo-fuzz target briefly, from the saved inputs (nightly, cargo-fuzz).
if [ "$quick" = 0 ]; then
  step "fuzz smoke (${KILN_FUZZ_SECONDS:-20}s per target)"
  ci/fuzz.sh "${KILN_FUZZ_SECONDS:-20}"
fi
