#!/usr/bin/env bash
# Trains the same character-level GPT with kiln and with PyTorch CPU on the
# bundled Shakespeare corpus — same model, split, batches (kiln's Philox
# windows, which benches/gpt_compare.py draws too) and settings; initial
# weights aside — and prints, side by side, the validation loss at every
# evaluation, iterations/s and tokens/s of training, and tokens/s of
# generating 500 characters (kiln with its key/value cache and without,
# medians of 3 runs; PyTorch recomputing the context, as nanoGPT does).
#
# Config A (the default) is nanoGPT's CPU example: 4 layers, 4 heads, 128
# wide, block 64, batch 12, 2,000 iterations, lr 1e-3 warm-up 100 + cosine
# to 1e-4, AdamW β₂ 0.99 wd 0.1, clip 1, no dropout.
#
# PyTorch comes from PyPI (`pip install torch`, about 3 GB with its CUDA
# wheels): fine for a benchmark, not for CI.
#
#   benches/gpt_compare.sh [ITERS] [THREADS]     (default: 2000 2)
#   PRECISIONS="f32 bf16" benches/gpt_compare.sh  (both frameworks in bf16
#   too: kiln's --precision bf16 and PyTorch's autocast, each with f32
#   master weights; every kiln run is compared with PyTorch in f32 and in
#   its own precision)
set -euo pipefail
cd "$(dirname "$0")/.."
iters="${1:-2000}"
threads="${2:-2}"
precisions="${PRECISIONS:-f32}"
every=$(( iters < 250 ? iters : 250 ))
# 100 warm-up steps, or the whole of a shorter run (kiln refuses a warm-up
# longer than the run).
warmup=$(( iters < 100 ? iters : 100 ))
python3 -c 'import torch, numpy' 2>/dev/null || python3 -m pip install -q torch numpy
cargo build --release -q -p kiln-cli
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

common=(--iters "$iters" --eval-every "$every" --eval-iters 20 --batch-size 12
        --lr 1e-3 --min-lr 1e-4 --warmup "$warmup" --beta2 0.99 --weight-decay 0.1 --seed 1337)
for p in $precisions; do
  KILN_THREADS=$threads ./target/release/kiln train --model gpt --dataset shakespeare "${common[@]}" \
    --precision "$p" --log-format json --out "$out/kiln-$p" > "$out/kiln-$p.jsonl" 2> "$out/kiln-$p.log"
done
for p in $precisions; do
  python3 benches/gpt_compare.py --iters "$iters" --eval-every "$every" --eval-iters 20 \
    --warmup "$warmup" --threads "$threads" --seed 1337 --precision "$p" > "$out/torch-$p.jsonl"
done
[ -f "$out/torch-f32.jsonl" ] || python3 benches/gpt_compare.py --iters "$iters" \
  --eval-every "$every" --eval-iters 20 --warmup "$warmup" --threads "$threads" --seed 1337 > "$out/torch-f32.jsonl"
gen() { # extra flags → tokens/s, the median of 3 runs
  # Each run's JSON goes to a file and is read after the run: a python3
  # reading a pipe starts up while kiln generates and takes a core from its
  # threads (500 cached tokens last about 70 ms; its start-up is as long).
  for i in 1 2 3; do
    KILN_THREADS=$threads ./target/release/kiln generate --model "$out/kiln-f32" --prompt $'\n' \
      --tokens 500 --temperature 0.8 --top-k 200 --seed 1 --format json "$@" > "$out/gen-$i.json"
  done
  python3 -c 'import json,statistics,sys; print(statistics.median(json.load(open(f))["tokens_per_sec"] for f in sys.argv[1:]))' \
    "$out"/gen-{1,2,3}.json
}
cached="$(gen)"
recomputed="$(gen --no-cache)"

python3 - "$out" "$iters" "$threads" "$precisions" "$cached" "$recomputed" <<'PY'
import json, platform, sys, torch
out, iters, threads, precisions, cached, recomputed = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
load = lambda p: [json.loads(l) for l in open(p) if l.startswith("{")]
precisions = precisions.split()
torch_runs = {p: load(f"{out}/torch-{p}.jsonl") for p in dict.fromkeys(["f32"] + precisions)}
t_gen = torch_runs["f32"][-1]["generate_tokens_per_sec"]
torch_runs = {p: runs[:-1] for p, runs in torch_runs.items()}
kiln = {p: load(f"{out}/kiln-{p}.jsonl") for p in precisions}
print(f"GPT config A on Shakespeare ({iters} iterations, {threads} threads each, {cpu}, torch {torch.__version__})")
cols = [(f"PyTorch {p} val", r) for p, r in torch_runs.items()] + [(f"kiln {p} val", r) for p, r in kiln.items()]
print(f"{'iter':>6}" + "".join(f" {name:>15}" for name, _ in cols))
for i, t in enumerate(torch_runs["f32"]):
    row = f"{t['iter']:>6}"
    for _, runs in cols:
        row += f" {runs[i]['val_loss']:>15.4f}" if i < len(runs) else f" {'—':>15}"
    print(row)
median = lambda xs: sorted(xs)[len(xs) // 2]
rate = lambda runs, key: median([r[key] for r in runs])
t_ips = {p: rate(runs, "iters_per_sec") for p, runs in torch_runs.items()}
print(f"\n{'run':<22} {'it/s':>8} {'tokens/s':>10} {'× PyTorch f32':>14} {'× PyTorch, same precision':>26}")
for p, runs in torch_runs.items():
    print(f"{'PyTorch CPU ' + p:<22} {t_ips[p]:>8.2f} {rate(runs, 'tokens_per_sec'):>10.0f} "
          f"{t_ips[p] / t_ips['f32']:>13.2f}× {1:>25.2f}×")
for p, runs in kiln.items():
    k = rate(runs, "iters_per_sec")
    print(f"{'kiln ' + p:<22} {k:>8.2f} {rate(runs, 'tokens_per_sec'):>10.0f} "
          f"{k / t_ips['f32']:>13.2f}× {k / t_ips[p]:>25.2f}×")
print(f"\ngeneration, 500 tokens: PyTorch (recompute) {t_gen:.0f} tok/s; kiln KV cache {float(cached):.0f} tok/s "
      f"({float(cached) / t_gen:.2f}× PyTorch, {float(cached) / float(recomputed):.2f}× kiln recomputing, {float(recomputed):.0f} tok/s)")
PY
