"""Time the demo as a new user meets it: `git clone` this repository into a temporary folder,
run `bash run_all.sh` there (no argument: the demo, each source pre-trained with 3 seeds), then
print the demo's summary.md (the table with 95 % intervals, the paired comparisons, the slope
per decade of source images, the findings) and the wall time.

    python bench/bench_run_all.py            # about 10 minutes on 2 idle CPU cores
    python bench/bench_run_all.py --keep     # keep the clone (its runs/demo) for a look

Only committed files reach the clone: commit before timing. Extra environment (SEEDS,
PRETRAIN_SEEDS, SHOTS, ...) passes through to run_all.sh.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=ROOT, help="repository to clone (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone and print its path")
    return p


def main(args):
    tmp = tempfile.mkdtemp(prefix="bench_run_all_")
    clone = os.path.join(tmp, "repo")
    try:
        subprocess.run(["git", "clone", "--quiet", args.repo, clone], check=True)
        t0 = time.time()
        proc = subprocess.run(["bash", "run_all.sh"], cwd=clone)
        wall = time.time() - t0
        with open(os.path.join(clone, "runs", "demo", "summary.md")) as f:
            print("\n" + f.read())
        print(f"\nbash run_all.sh (demo): {wall:.0f} s wall on {os.cpu_count()} CPU(s) (load average "
              f"{os.getloadavg()[1]:.1f} over the last 5 minutes), exit status {proc.returncode}")
        return proc.returncode
    finally:
        if args.keep:
            print(f"clone kept: {clone}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
