#!/usr/bin/env bash
# Builds kiln-cpu's tests for aarch64 and runs them under qemu: the
# conformance suite on the NEON kernel set, and the packed-GEMM, thread-count
# and math tests, with NEON required (not skipped); and kiln-data's pixel
# conversion (its AArch64 path). The scalar set's suite
# (portable Rust, the same on every target) runs natively in ci/test.sh;
# under qemu it would double this step's time for no new code.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null \
   || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
rustup target list --installed | grep -q '^aarch64-unknown-linux-gnu$' \
  || rustup target add aarch64-unknown-linux-gnu

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export KILN_REQUIRE_KERNELS=neon
cargo test -p kiln-cpu --target aarch64-unknown-linux-gnu --profile ci --locked "$@" -- --skip scalar::
# kiln-data's pixel conversion takes its FMA path natively on AArch64.
cargo test -p kiln-data --target aarch64-unknown-linux-gnu --profile ci --locked --lib pixels
