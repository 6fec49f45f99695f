"""Benchmark prepare_data.py on realistic-size images (1024x1024 8-bit grayscale PNGs, the size
of the real NIH ChestX-ray14 files), in one run:
  1. conversion images/s with --workers 1 and --workers 2 vs decoding the same files alone
     (Pillow, one process, no resize or write);
  2. the prepared reader (PreparedDataset.__getitems__ batches) vs decoding the source files.

    python bench/bench_prepare.py --n 300 --size 512
"""
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import prepare_data as P  # noqa: E402


def get_args_parser():
    p = models.ArgumentParser(description="prepare_data.py throughput")
    p.add_argument("--n", type=int, default=300, help="number of 1024x1024 PNGs")
    p.add_argument("--size", type=int, default=512, help="prepared image side")
    p.add_argument("--batch-size", type=int, default=64, help="reader batch size")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    return p


def write_images(root, n):
    """Chest-like 1024x1024 PNGs with per-image noise, so they compress like real radiographs."""
    rng = np.random.default_rng(0)
    bases = [P.synthetic_chest(rng, f, 1024).astype(np.int16) for f in ([], ["Effusion"], ["Cardiomegaly"], ["Edema"])]
    os.makedirs(root, exist_ok=True)
    names = []
    for i in range(n):
        img = np.clip(bases[i % 4] + rng.normal(0, 6, (1024, 1024)), 0, 255).astype(np.uint8)
        names.append(f"{i:05d}.png")
        Image.fromarray(img).save(os.path.join(root, names[-1]))
    pd.DataFrame({"path": names, "finding": [i % 2 for i in range(n)]}).to_csv(os.path.join(root, "labels.csv"), index=False)
    return names


def main(args):
    work = args.dir or tempfile.mkdtemp(prefix="bench_prepare_")
    raw = os.path.join(work, "raw")
    t0 = time.time()
    names = write_images(raw, args.n)
    mb = sum(os.path.getsize(os.path.join(raw, n)) for n in names) / 2 ** 20
    print(f"wrote {args.n} PNGs 1024x1024 ({mb / args.n:.2f} MiB each) in {time.time() - t0:.1f} s", flush=True)

    t0 = time.time()
    for n in names:
        with Image.open(os.path.join(raw, n)) as img:
            img.load()
    decode = args.n / (time.time() - t0)
    print(f"decode only (Pillow, 1 process): {decode:.1f} images/s", flush=True)

    rates = {}
    for workers in (1, 2):
        out = os.path.join(work, f"prepared_w{workers}")
        argv = ["--dataset", "csv", "--root", raw, "--labels-csv", os.path.join(raw, "labels.csv"), "--out", out,
                "--size", str(args.size), "--workers", str(workers), "--overwrite", "--test-fraction", "0",
                "--valid-fraction", "0"]
        t0 = time.time()
        P.main(P.get_args_parser().parse_args(argv))
        rates[workers] = args.n / (time.time() - t0)
    print(f"convert --workers 1: {rates[1]:.1f} images/s ({rates[1] / decode:.2f}x decode only)", flush=True)
    print(f"convert --workers 2: {rates[2]:.1f} images/s ({rates[2] / decode:.2f}x decode only, "
          f"{rates[2] / rates[1]:.2f}x one worker; target >= 1.6x on 2 cores)", flush=True)

    ds = P.PreparedDataset(os.path.join(work, "prepared_w2"))
    rng = np.random.default_rng(0)
    total, t0 = 0, time.time()
    while time.time() - t0 < 2.0:
        x, _, _ = ds.__getitems__(rng.integers(0, len(ds), args.batch_size))
        total += len(x)
    read = total / (time.time() - t0)
    print(f"prepared reader ({args.size}px, batches of {args.batch_size}, page cache warm): {read:.1f} images/s = "
          f"{read / decode:.1f}x decoding the source PNGs (target >= 20x)", flush=True)
    print(f"machine: {os.cpu_count()} CPUs (shared with other jobs; figures are noisy)", flush=True)


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
