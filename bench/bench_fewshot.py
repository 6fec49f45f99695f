"""Time a few-shot grid on the demo's target with full fine-tuning and with the linear probe,
in the same run. The defaults are run_all.sh's demo (RECIPE_TRANSFER, SHOTS, SEEDS): R14x0.5,
shots 1 5 10 full x seeds 0 1 2 3 4, 40 steps (at least 10 passes) of batch 16 at lr 0.01, resize
34 and crop 32. The target is runs/demo/prepared/tuberculosis when `bash run_all.sh` has made it,
else a synthetic stand-in of the same shape (two classes, 150 train and 450 test images stored at
34 px).

    python bench/bench_fewshot.py
    python bench/bench_fewshot.py --data runs/demo/prepared/tuberculosis --device cuda

Prints one line per method: wall time of the whole grid and per (k, seed) run, mean accuracy.
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the scripts; the tests' prepared-folder writer
import fewshot  # noqa: E402
import models  # noqa: E402
from prepared import write_prepared  # noqa: E402


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/demo/prepared/tuberculosis",
                   help="prepared target; a synthetic one when this folder does not exist")
    p.add_argument("--init", default="scratch", help="weights to start from (timing barely depends on it)")
    p.add_argument("--model", default="R14x0.5", help="network")
    p.add_argument("--shots", nargs="+", default=["1", "5", "10", "full"], help="shot counts")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds")
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps per run")
    p.add_argument("--min-epochs", type=float, default=10, help="fine-tuning passes over the subset, at least")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--size", type=int, default=34, help="synthetic target: stored image side")
    p.add_argument("--resize", type=int, default=34, help="train resize side")
    p.add_argument("--crop", type=int, default=32, help="crop side")
    p.add_argument("--train", type=int, default=150, help="synthetic target: training images")
    p.add_argument("--test", type=int, default=450, help="synthetic target: test images")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is much faster on a busy machine")
    return p


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not os.path.exists(os.path.join(data, "meta.json")):
            data = os.path.join(tmp, "demo")
            write_prepared(data, args.train, args.test, ("normal", "tuberculosis"), size=args.size)
        common = ["--data", data, "--init", args.init, "--model", args.model, "--shots", *args.shots, "--seeds",
                  *map(str, args.seeds), "--out", os.path.join(tmp, "out"), "--resize", str(args.resize),
                  "--crop", str(args.crop), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                  "--min-epochs", str(args.min_epochs), "--lr", str(args.lr), "--log-every", str(args.steps),
                  "--bootstrap", "200"]
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
            detail = f"{args.steps}+ steps of batch {args.batch_size} per run" if name == "finetune" \
                else "features extracted once, L-BFGS per run"
            print(f"{name:>12}: {runs} runs in {seconds:7.1f} s = {seconds / runs:6.2f} s/run "
                  f"({detail}); mean accuracy {acc:.3f}")
        print(f"speed-up of the linear probe: {timings['finetune'][0] / timings['linear probe'][0]:.1f}x")


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
