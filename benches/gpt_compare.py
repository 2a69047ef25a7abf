#!/usr/bin/env python3
"""The PyTorch side of benches/gpt_compare.sh: the same GPT as kiln's
`--model gpt` on the same corpus, split, batches and settings.

Model: token + position embeddings, N pre-norm blocks (LayerNorm →
causal multi-head attention → residual; LayerNorm → Linear 4× → GELU
(tanh) → Linear → residual), a final LayerNorm, the LM head tied to the
token table; no biases; weights N(0, 0.02²), the two projections into the
residual stream N(0, (0.02/√(2N))²).
Training: AdamW (PyTorch's) β (0.9, β₂), ε 1e-8, weight decay on the
Linear weights only, linear warm-up then cosine decay to min_lr,
gradients clipped to a global norm of 1. Batches: the same windows kiln
draws — kiln's Philox4x32-10 stream, ported below — so both frameworks
see identical data at every step. Initial weights differ (each framework
draws its own).

`--precision bf16` runs the forward passes and the loss under
`torch.autocast("cpu", dtype=torch.bfloat16)` — PyTorch's mixed precision,
f32 master weights and optimiser state, as kiln's `--precision bf16`.

Prints one JSON object per evaluation, then one for generation.
"""

import argparse
import contextlib
import gzip
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF
TRAIN_KEY = 0x7472_6169_6E5F_6C6D
VAL_KEY = 0x7661_6C5F_6C6D_0000
EVAL_TRAIN_KEY = 0x5EED_E7A1


def philox(counter, key):
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
    return c


class Stream:
    """kiln_core::rng::Philox: blocks from counter stream << 32."""

    def __init__(self, seed, stream):
        self.key = [seed & MASK, (seed >> 32) & MASK]
        self.n = (stream << 32) & ((1 << 64) - 1)
        self.buf, self.used = [], 4

    def next_u32(self):
        if self.used == 4:
            self.buf = philox([self.n & MASK, self.n >> 32, 0, 0], self.key)
            self.n += 1
            self.used = 0
        self.used += 1
        return self.buf[self.used - 1]

    def below(self, n):
        threshold = ((1 << 32) - n) % n
        while True:
            m = self.next_u32() * n
            if (m & MASK) >= threshold:
                return m >> 32


def batch(ids, size, block, seed, key, index):
    rng = Stream((seed ^ key) & ((1 << 64) - 1), index)
    starts = [rng.below(len(ids) - block) for _ in range(size)]
    x = torch.stack([ids[s : s + block] for s in starts])
    y = torch.stack([ids[s + 1 : s + block + 1] for s in starts])
    return x, y


class Block(nn.Module):
    def __init__(self, c, heads, n_layer):
        super().__init__()
        self.ln1 = nn.LayerNorm(c, bias=False)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.proj = nn.Linear(c, c, bias=False)
        self.ln2 = nn.LayerNorm(c, bias=False)
        self.fc = nn.Linear(c, 4 * c, bias=False)
        self.out = nn.Linear(4 * c, c, bias=False)
        self.heads = heads
        for lin in (self.qkv, self.fc):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in (self.proj, self.out):
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layer))

    def attend(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        x = x + self.attend(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, heads, c):
        super().__init__()
        self.tok = nn.Embedding(vocab, c)
        self.pos = nn.Embedding(block, c)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(c, heads, n_layer) for _ in range(n_layer))
        self.ln = nn.LayerNorm(c, bias=False)
        self.block = block

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="data/shakespeare/input.txt.gz")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    def mixed():
        if a.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    text = gzip.open(a.corpus, "rb").read().decode("utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = len(ids) * 9 // 10
    train, val = ids[:cut], ids[cut:]
    model = GPT(len(chars), a.block, a.layers, a.heads, a.embd)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2 and "tok" not in n and "pos" not in n]
    rest = [p for n, p in model.named_parameters() if not any(p is d for d in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, a.beta2), eps=1e-8)

    def lr_at(i):
        if i < a.warmup:
            return a.lr * (i + 1) / (a.warmup + 1)
        if i >= a.iters:
            return a.min_lr
        r = (i - a.warmup) / max(a.iters - a.warmup, 1)
        return a.min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (a.lr - a.min_lr)

    def evaluate(data, seed_key, first):
        model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(a.eval_iters):
                x, y = batch(data, a.batch, a.block, a.seed, seed_key, first + i)
                with mixed():
                    logits = model(x).view(-1, len(chars))
                total += F.cross_entropy(logits.float(), y.view(-1)).item()
        model.train()
        return total / a.eval_iters

    trained, since, rounds = 0.0, 0, 0
    clock = time.perf_counter()
    for it in range(a.iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch(train, a.batch, a.block, a.seed, TRAIN_KEY, it)
        with mixed():
            logits = model(x).view(-1, len(chars))
        loss = F.cross_entropy(logits.float(), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        since += 1
        if (it + 1) % a.eval_every == 0 or it + 1 == a.iters:
            trained = time.perf_counter() - clock
            first = rounds * a.eval_iters
            rec = {
                "iter": it + 1,
                "train_loss": evaluate(train, TRAIN_KEY ^ EVAL_TRAIN_KEY, first),
                "val_loss": evaluate(val, VAL_KEY, first),
                "iters_per_sec": since / trained,
                "tokens_per_sec": since * a.batch * a.block / trained,
            }
            print(json.dumps(rec), flush=True)
            rounds += 1
            since = 0
            clock = time.perf_counter()
    # Generation as nanoGPT does it: the whole (cropped) context per token.
    model.eval()
    idx = torch.tensor([[index["\n"]]])
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(a.tokens):
            with mixed():
                logits = model(idx[:, -a.block:])[:, -1, :]
            logits = logits.float() / 0.8
            top = torch.topk(logits, min(200, len(chars))).values[:, -1:]
            logits[logits < top] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
    secs = time.perf_counter() - start
    print(json.dumps({"generate_tokens_per_sec": a.tokens / secs}), flush=True)


if __name__ == "__main__":
    main()
