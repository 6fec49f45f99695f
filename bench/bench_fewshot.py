"""Time a few-shot grid (5 shot counts x 5 seeds) on the demo target with full fine-tuning
and with the linear probe, in the same run. Settings default to run_all.sh's demo (R14x1,
48 px crops, 40 steps of batch 16); the target is runs/demo/prepared/tuberculosis when
`bash run_all.sh` has made it, else a synthetic stand-in.

    python bench/bench_fewshot.py
    python bench/bench_fewshot.py --data runs/demo/prepared/tuberculosis --device cuda

Prints one line per method: wall time of the whole grid and per (k, seed) run.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fewshot  # noqa: E402
from prepare_data import save_prepared  # noqa: E402


def demo_target(folder, n_train, n_test, size, classes, seed=0):
    """Grayscale images whose classes differ by a bright band at a class-specific height, like
    the demo's two-class chest X-ray target (e.g. tuberculosis)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    cls = rng.integers(0, classes, n)
    images = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    band = size // (classes + 1)
    for i, c in enumerate(cls):
        images[i, c * band:(c + 1) * band] += 120
    table = pd.DataFrame({"path": [f"im{i}.png" for i in range(n)], "patient": [str(i) for i in range(n)],
                          "view": "PA", "split": ["train"] * n_train + ["test"] * n_test})
    labels = [f"class{c}" for c in range(classes)]
    for c, name in enumerate(labels):
        table[name] = (cls == c).astype(float)
    save_prepared(folder, images, table, labels, "multiclass", name="demo",
                  extra_meta={"orig_size": [1024, 1024]})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="runs/demo/prepared/tuberculosis",
                   help="prepared target; a synthetic one when this folder does not exist")
    p.add_argument("--init", default="scratch", help="weights to start from (timing barely depends on it)")
    p.add_argument("--model", default="R14x1", help="network")
    p.add_argument("--shots", nargs="+", default=["1", "2", "5", "10", "full"], help="the 5 shot counts")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="the 5 seeds")
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch size")
    p.add_argument("--size", type=int, default=48, help="synthetic target: stored image side")
    p.add_argument("--resize", type=int, default=56, help="train resize side")
    p.add_argument("--crop", type=int, default=48, help="crop side")
    p.add_argument("--train", type=int, default=750, help="synthetic target: training images")
    p.add_argument("--test", type=int, default=150, help="synthetic target: test images")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is much faster on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not os.path.exists(os.path.join(data, "meta.json")):
            data = os.path.join(tmp, "demo")
            demo_target(data, args.train, args.test, args.size, classes=2)
        common = ["--data", data, "--init", args.init, "--model", args.model, "--shots", *args.shots, "--seeds",
                  *map(str, args.seeds), "--out", os.path.join(tmp, "out"), "--resize", str(args.resize),
                  "--crop", str(args.crop), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                  "--log-every", str(args.steps), "--bootstrap", "200"]
        if args.device:
            common += ["--device", args.device]
        runs = len(args.shots) * len(args.seeds)
        timings = {}
        for name, extra in [("finetune", []), ("linear probe", ["--linear-probe"])]:
            t0 = time.perf_counter()
            rows = fewshot.main(fewshot.get_args_parser().parse_args(common + extra))
            timings[name] = (time.perf_counter() - t0, rows)
        print(f"\n{args.model} on {data}, crop {args.crop}, "
              f"{torch.get_num_threads()} threads, shots {' '.join(args.shots)} x seeds {' '.join(map(str, args.seeds))}")
        for name, (seconds, rows) in timings.items():
            acc = np.mean([r["accuracy"] for r in rows])
            detail = f"{args.steps} steps of batch {args.batch_size} per run" if name == "finetune" \
                else "features extracted once, L-BFGS per run"
            print(f"{name:>12}: {runs} runs in {seconds:7.1f} s = {seconds / runs:6.2f} s/run "
                  f"({detail}); mean accuracy {acc:.3f}")
        print(f"speed-up of the linear probe: {timings['finetune'][0] / timings['linear probe'][0]:.1f}x")


if __name__ == "__main__":
    main()
