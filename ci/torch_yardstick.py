#!/usr/bin/env python3
"""The yardsticks kiln's CUDA backend is measured against, on the same GPU:
cuBLAS through PyTorch (SGEMM, TF32 and BF16 GEMM at SIZE³) and the seed
MLP and CNN trained for one epoch on Fashion-MNIST (batch 128, Adam 1e-3,
data already on the GPU), as PyTorch users would run them.

    torch_yardstick.py DATA_DIR [SIZE]
"""
import gzip
import os
import sys
import time

import numpy as np
import torch


def bench(f, reps=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gemms(size):
    print(f"cuBLAS via torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {size}³")
    flops = 2 * size ** 3
    for name, dtype, tf32 in [("sgemm fp32", torch.float32, False),
                              ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.rand(size, size, device="cuda", dtype=dtype)
        b = torch.rand(size, size, device="cuda", dtype=dtype)
        t = bench(lambda: a @ b)
        print(f"  {name:<11} {t * 1e3:8.3f} ms {flops / t / 1e12:8.1f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False


def idx(data, name, offset):
    return np.frombuffer(gzip.open(os.path.join(data, name)).read(), np.uint8, offset=offset)


def epochs(data):
    x = torch.tensor(idx(data, "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28),
                     dtype=torch.float32, device="cuda") / 255
    y = torch.tensor(idx(data, "train-labels-idx1-ubyte.gz", 8), dtype=torch.long, device="cuda")
    nn = torch.nn
    for name in ["mlp", "cnn"]:
        torch.manual_seed(1)
        if name == "mlp":
            model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        else:
            model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(32 * 13 * 13, 64), nn.ReLU(), nn.Linear(64, 10))
        model = model.cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
        loss_fn = nn.CrossEntropyLoss()
        times = []
        for _ in range(2):  # the first epoch includes cuDNN autotuning and warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            perm = torch.randperm(len(x), device="cuda")
            for i in range(0, len(x), 128):
                b = perm[i:i + 128]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[b]), y[b]).backward()
                opt.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"  PyTorch {name} epoch: first {times[0]:.3f} s, second {times[1]:.3f} s")


if __name__ == "__main__":
    gemms(int(sys.argv[2]) if len(sys.argv) > 2 else 4096)
    if len(sys.argv) > 1 and os.path.exists(os.path.join(sys.argv[1], "train-images-idx3-ubyte.gz")):
        epochs(sys.argv[1])
    else:
        print("  (no Fashion-MNIST folder given: epoch yardsticks skipped)")
