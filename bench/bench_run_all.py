"""Time the demo as a new user meets it: `git clone` this repository into a temporary folder,
run `bash run_all.sh` there (no argument: the demo), then print the wall time and the demo's
table (headline metric, mean and std over seeds, per source and shots).

    python bench/bench_run_all.py            # a few minutes on 2 CPU cores
    python bench/bench_run_all.py --keep     # keep the clone (its runs/demo) for a look

Only committed files reach the clone: commit before timing. Extra environment (SEEDS, SHOTS,
...) passes through to run_all.sh.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=ROOT, help="repository to clone (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone and print its path")
    return p


def demo_table(results):
    """Headline metric per (source, shots): mean, std over seeds and the seed count, one row per
    source in the order the demo ran them, one column per k (full last)."""
    r = results.copy()
    r["value"] = [row[row["headline"]] for _, row in r.iterrows()]
    stats = r.groupby(["source", "shots"], sort=False)["value"].agg(["mean", "std", "count"])
    shots = sorted(r["shots"].unique(), key=lambda k: (k == 0, k))
    header = "| source | " + " | ".join("full" if k == 0 else f"{k}-shot" for k in shots) + " |"
    lines = [f"{r['target'].iloc[0]}, {r['model'].iloc[0]}, {r['headline'].iloc[0]} (mean ± std over "
             f"{int(stats['count'].max())} seeds)", "", header, "|---|" + "---|" * len(shots)]
    for source in r["source"].unique():
        cells = [f"{stats.loc[(source, k), 'mean']:.3f} ± {stats.loc[(source, k), 'std']:.3f}"
                 if (source, k) in stats.index else "" for k in shots]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args):
    tmp = tempfile.mkdtemp(prefix="bench_run_all_")
    clone = os.path.join(tmp, "repo")
    try:
        subprocess.run(["git", "clone", "--quiet", args.repo, clone], check=True)
        t0 = time.time()
        proc = subprocess.run(["bash", "run_all.sh"], cwd=clone)
        wall = time.time() - t0
        results = pd.read_csv(os.path.join(clone, "runs", "demo", "results.csv"))
        print()
        print(demo_table(results))
        print(f"\nbash run_all.sh (demo): {wall:.0f} s wall on {os.cpu_count()} CPU(s), exit status {proc.returncode}")
        return proc.returncode
    finally:
        if args.keep:
            print(f"clone kept: {clone}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
