"""Time the demo as a new user meets it: `git clone` this repository into a temporary folder,
run `bash run_all.sh` there (no argument: the demo, each source pre-trained with 3 seeds), then
print the demo's summary.md (the table with 95 % intervals, the paired comparisons, the slope
per decade of source images, the findings), the wall time, and the README's demo block (its
table, sizes and what the intervals support), to paste over the one in README.md.

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
import textwrap
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


def readme_block(demo):
    """The README's demo block from runs/demo's summary.csv and comparisons.csv: the headline mean
    ± std per source (pre-training images beside) and k, the larger source minus the smaller with
    its 95 % interval, and per pair of sources the k where the interval lies above or below 0."""
    summary, comp = (pd.read_csv(os.path.join(demo, f), dtype={"shots": str}, keep_default_na=False)
                     for f in ("summary.csv", "comparisons.csv"))
    metric, target, shots = summary["headline"][0], summary["target"][0], list(dict.fromkeys(summary["shots"]))
    cells = {(r["source"], r["shots"]): r for r in summary.to_dict("records")}
    sources = list(dict.fromkeys(summary["source"]))
    runs = ", ".join(f"{s} {n}" for s, n in summary.groupby("source", sort=False)["n_cells"].max().items())
    lines = [f"| {target} {metric} | images | " + " | ".join(k if k == "full" else f"{k}-shot" for k in shots) + " |",
             "|---" * (len(shots) + 2) + "|"]
    for s in sources:
        size = max(float(cells[s, k]["source_size"] or 0) for k in shots if (s, k) in cells)
        lines.append(f"| {s} | {f'{size:,.0f}' if size else ''} | " + " | ".join(
            f"{cells[s, k][f'{metric}_mean']:.3f} ± {cells[s, k][f'{metric}_std']:.3f}" if (s, k) in cells else ""
            for k in shots) + " |")
    pairs = list(dict.fromkeys(zip(comp["source"], comp["baseline"])))
    at = {(r["source"], r["baseline"], r["shots"]): r for r in comp.to_dict("records")}
    for a, b in [p for p in pairs if "scratch" not in p]:
        lines.append(f"| {a} - {b} | | " + " | ".join(
            f"{at[a, b, k]['estimate']:+.3f} [{at[a, b, k]['low']:+.3f}, {at[a, b, k]['high']:+.3f}]"
            if (a, b, k) in at else "" for k in shots) + " |")
    lines += ["", *textwrap.wrap(f"Mean ± std over a cell's runs ({runs}; pre-training x fine-tuning seeds); the "
                                 "difference: 95 % interval (pre-training seeds, fine-tuning seeds, test images). The "
                                 "intervals support:", 100)]
    for a, b in pairs:
        verdicts = {v: [k for k in shots if (a, b, k) in at and at[a, b, k]["verdict"] == v]
                    for v in ("better", "worse", "not resolved")}
        lines.append(f"- {a} - {b}: " + "; ".join(f"{v} at k = {', '.join(ks)}" for v, ks in verdicts.items() if ks)
                     + ".")
    return "\n".join(lines)


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
        print("\nREADME.md, 'The demo' (paste over the block there):\n\n"
              + readme_block(os.path.join(clone, "runs", "demo")))
        return proc.returncode
    finally:
        if args.keep:
            print(f"clone kept: {clone}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
