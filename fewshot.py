"""The few-shot grid and its summary. For every k in --shots and every seed in --seeds, one
transfer.py cell on k training examples per class (fine-tuned, or with --linear-probe a
logistic regression on frozen features, extracted once for the grid), appended to
OUT/results.csv; then --summarize turns results into tables, paired comparisons of sources and
the slope per tenfold more pre-training images, each with a 95 % interval, and plots, beside the
paper's numbers (the part below `# Summary`: how the paper's claim is tested).

One GPU or CPU, on the files the demo (bash run_all.sh) makes, at its sizes:
    python fewshot.py --data runs/demo/prepared/tuberculosis --init runs/demo/pretrain/R14x0.5/chexpert/seed0/best.pt \
        --source chexpert --model R14x0.5 --shots 1 5 full --resize 34 --crop 32 --steps 40 --out runs/fewshot
    python fewshot.py --data prepared/pets --init BiT-M-R50x1.npz --source bit-m --model R50x1 \
        --linear-probe --out runs/fewshot
    python fewshot.py --summarize runs/fewshot   # summary.md/.csv, comparisons.csv, slopes.csv, fewshot.png, source_size.png
    python fewshot.py --summarize results/       # the authors' results files: the paper's own comparisons and slopes
Several GPUs (each cell is a DDP run over all ranks):
    torchrun --standalone --nproc_per_node=4 fewshot.py --data prepared/padchest --init best.pt \
        --source chexpert_mimic_nih_padchest --model R152x4 --batch-split 4 --out runs/fewshot
The demo's grid: bash run_all.sh (its plan prints each fewshot.py command).

Subsets, recipes, skipping of finished cells, failures and exit status are transfer.py's (its
docstring). Multi-label targets default to --multilabel-mode single here, the paper's few-shot way.
"""
import functools
import json
import os
import textwrap

import numpy as np
import pandas as pd
import scipy.stats

import models
import transfer

METRICS = ["accuracy", "auc", "map"]
# Columns of a results file read as numbers when summarising (empty = missing).
NUMERIC_COLUMNS = METRICS + ["source_size", "ci_low", "ci_high", "num_eval", "metric_value"]


def get_args_parser():
    parser = transfer.add_arguments(models.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                          memory_hint=transfer.MEMORY_HINT))
    parser.set_defaults(multilabel_mode="single")
    parser.add_argument("--shots", nargs="+", type=transfer.parse_shots, default=[1, 5, 10, 100, 0],
                        help="examples per class (a class with fewer keeps all it has); 0 or 'full' = "
                             "the whole training split")
    parser.add_argument("--seeds", nargs="+", type=models.SEED, default=[0, 1, 2, 3, 4],
                        help="seeds of subset choice and training (the paper's 0..4)")
    parser.add_argument("--summarize", nargs="+", metavar="RESULTS", default=None,
                        help="only summarise results into summary.csv, summary.md, comparisons.csv, slopes.csv, "
                             "fewshot.png, source_size.png, the paper's published numbers beside matching cells: "
                             "results CSVs or OUT folders, or the authors' finetuning_results_*.csv "
                             "files or their results/ folder")
    parser.add_argument("--summary-dir", default=None,
                        help="with --summarize: folder for its outputs (default: the first input's folder)")
    parser.add_argument("--paper-curves", action="store_true",
                        help="with --summarize: draw the paper's curve of every matching source and "
                             "model dashed in fewshot.png")
    parser.add_argument("--source-sizes", nargs="+", metavar="NAME=COUNT", default=None,
                        help="with --summarize: pre-training set sizes per source, for the slopes and source_size.png")
    return parser


def main(args):
    if args.summarize:
        return run_summary(args)
    return transfer.run(args, [(k, seed) for k in dict.fromkeys(args.shots) for seed in args.seeds])


# ----------------------------------------------------------------------------------------
# Summary: tables, the scale effect with its uncertainty, plots

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
PAPER_RESULTS = os.path.join(REFERENCE, "paper_results.csv")
PAPER_SIZES = os.path.join(REFERENCE, "source_sizes.csv")  # pre-training images of the paper's sources
# Our names -> the paper's (reference/paper_results.csv, the authors' results files). Sources and
# models carry the paper's names already (imagenet1k, chexpert_mimic, ..., R50x1, R152x4).
PAPER_TARGETS = {"cifar10": "cifar10", "cifar100": "cifar100", "pets": "pets",
                 "flowers102": "flowers_oversampling", "covidx": "covidx_cxr2",
                 "tuberculosis": "tuberculosis_full", "padchest": "padchest",
                 "padchest_single": "padchest"}  # first name wins when reading the authors' files
PAPER_METRICS = {"accuracy": "acc", "auc": "mean_auc", "map": "mean_average_precision"}
AUTHORS = "authors"  # the method of rows read from the authors' own results files
PAPER_METHODS = {"finetune", AUTHORS}  # the paper fine-tuned; a linear probe is another experiment
PAPER_SPREAD = 2  # a cell is within the paper's spread when |ours - paper| <= 2 paper seed stds
AUTHORS_COLUMNS = ["metric_value", "metric", "seed", "shot", "pretrained_model", "dataset"]
# The domain of each source and target: a transfer is intra-domain when both sides share one
# (chest -> chest, natural -> natural), else inter-domain. Scratch and unknown names have none.
DOMAINS = {**dict.fromkeys(["chexpert", "mimic", "nih", "padchest", "chexpert_mimic", "chexpert_mimic_nih",
                            "chexpert_mimic_nih_padchest", "covidx", "tuberculosis", "padchest_single"], "chest"),
           **dict.fromkeys(["imagenet1k", "imagenet21k", "bit-s", "bit-m", "cifar10", "cifar100", "pets",
                            "flowers102"], "natural")}
# The scale axes: sources that differ in size, not in kind; a slope is fitted along one. The
# single chest datasets (mimic, nih, padchest) differ in labels and views too: on no axis (they
# are compared, not fitted). A source of a name not known here joins the axis `other`.
SCALE_AXES = {"chest": ["chexpert", "chexpert_mimic", "chexpert_mimic_nih", "chexpert_mimic_nih_padchest"],
              "imagenet": ["imagenet1k", "imagenet21k"], "bit": ["bit-s", "bit-m"]}
LEVEL = 0.95  # of every interval in the summary
GROUP = ["target", "method", "model", "shots"]  # the cells that comparisons and slopes set side by side


def shots_label(k):
    return "full" if k == 0 else str(int(k))


def shots_order(k):
    return np.inf if k == 0 else k


def google_bit(args_json):
    """Whether a results row's --init (from its `args` JSON) is one of Google's released BiT-S /
    BiT-M files (BiT-M-R50x1.npz, ...): their ImageNet pre-training is not the paper's own, so
    such rows never match the paper's imagenet1k / imagenet21k cells, whatever --source said."""
    try:
        init = json.loads(args_json).get("init", "")
    except (TypeError, ValueError):  # no args recorded (NaN), or not JSON
        return False
    return os.path.basename(str(init)).startswith("BiT-")


def paper_comparable(results):
    """Per row: may it stand beside the paper's numbers (fine-tuned, not from Google's BiT)?"""
    ok = results["method"].isin(PAPER_METHODS)
    if "args" in results.columns:
        ok &= ~results["args"].map(google_bit).astype(bool)
    return ok


@functools.cache
def paper_sizes():
    """{source: pre-training images} of the paper's sources (reference/source_sizes.csv)."""
    return pd.read_csv(PAPER_SIZES).set_index("source")["images"].to_dict()


def transfer_kind(source, target):
    """'intra' (source and target of one domain), 'inter', or '' (scratch, unknown names)."""
    a, b = DOMAINS.get(source), DOMAINS.get(target)
    return "" if a is None or b is None else "intra" if a == b else "inter"


def scale_axis(source):
    """The scale axis of a source (SCALE_AXES), 'other' for an unknown name, None off every axis."""
    axis = [name for name, members in SCALE_AXES.items() if source in members]
    return axis[0] if axis else None if source in DOMAINS or source == "scratch" else "other"


def scale_rank(results):
    """{source: its place on the scale axis}: scratch first, then by pre-training images (the
    paper's count for a paper source whose results record none), unknown sizes last."""
    recorded, paper = results.groupby("source")["source_size"].max(), paper_sizes()

    def key(source):
        size = recorded[source] if recorded[source] > 0 else paper.get(source, np.inf)
        return source != "scratch", size, source
    return {s: i for i, s in enumerate(sorted(recorded.index, key=key))}


def summarize(cells):
    """Mean and std over cells (pre-training x fine-tuning seeds) of every metric per target,
    method, source, model and k, with the 95 % interval of the headline mean (contrast of the
    source alone); per model, sources in scale order, k ascending (full last). `cells`:
    cell_values(results). The std is the sample std for our runs; rows read from the authors'
    files get the paper's population std (ddof 0), so that their summary is the published table."""
    df = cells.assign(shots=cells["shots"].astype(int), paper_comparable=paper_comparable(cells))
    groups = df.groupby(["target", "method", "source", "model", "shots"], sort=False)
    mean, std = groups[METRICS].mean(), groups[METRICS].std()
    authors = mean.index.get_level_values("method") == AUTHORS
    std[authors] = groups[METRICS].std(ddof=0)[authors]
    out = pd.DataFrame({"n_seeds": groups["seed"].nunique(), "n_source_seeds": groups["source_seed"].nunique(),
                        "n_cells": groups.size()})
    for m in METRICS:
        out[f"{m}_mean"], out[f"{m}_std"] = mean[m], std[m]
    out["headline"] = groups["headline"].first()
    out["source_size"] = groups["source_size"].max()
    out["paper_comparable"] = groups["paper_comparable"].all()
    out = out.reset_index()
    grids = {group: source_grids(part) for group, part in df.groupby(GROUP, sort=False)}
    alone = [contrast(grids[(r.target, r.method, r.model, r.shots)], {r.source: 1}) for r in out.itertuples()]
    out["headline_low"], out["headline_high"] = [c["low"] for c in alone], [c["high"] for c in alone]
    out["_rank"], out["_order"] = out["source"].map(scale_rank(df)), out["shots"].map(shots_order)
    out = out.sort_values(["target", "method", "model", "_rank", "_order"]).drop(columns=["_rank", "_order"])
    return out.reset_index(drop=True)


def read_paper_reference(path=PAPER_RESULTS):
    """The paper's published cells with shots as our counts (0 = full) and our metric names;
    targets keep the paper's names."""
    ref = pd.read_csv(path)
    ref["shots"] = [0 if s == "full" else int(s) for s in ref["shots"]]
    ref["metric"] = ref["metric"].map({paper: ours for ours, paper in PAPER_METRICS.items()})
    return ref


def beside_paper(summary, reference):
    """The summary plus, per metric M that has a paper cell matching (target, source, model,
    shots, M) somewhere: M_paper_mean, M_paper_std, M_paper_seeds, M_diff (ours - paper) and
    M_within (|diff| <= PAPER_SPREAD paper stds). Empty where no paper cell matches or the row is
    not comparable."""
    out = summary.copy()
    keys = pd.DataFrame({"target": out["target"].map(PAPER_TARGETS).where(out["paper_comparable"]),
                         "source": out["source"], "model": out["model"], "shots": out["shots"]})
    for m in METRICS:
        cells = keys.assign(metric=m).merge(reference, how="left", on=list(keys.columns) + ["metric"])
        if cells["mean"].isna().all():
            continue
        diff = out[f"{m}_mean"].to_numpy(float) - cells["mean"].to_numpy(float)
        within = np.abs(diff) <= PAPER_SPREAD * cells["std"].to_numpy(float)
        out[f"{m}_paper_mean"] = cells["mean"].to_numpy(float)
        out[f"{m}_paper_std"] = cells["std"].to_numpy(float)
        out[f"{m}_paper_seeds"] = cells["seeds"].astype("Int64").array
        out[f"{m}_diff"] = diff
        out[f"{m}_within"] = pd.array(np.where(np.isnan(diff), None, within), dtype="boolean")
    return out


# ----------------------------------------------------------------------------------------
# The scale effect with its uncertainty: paired comparisons of sources and the slope against
# log10(pre-training images), each a contrast of source means with a 95 % interval

def t_interval(estimate, parts, level=LEVEL):
    """{estimate, low, high, df}: a t interval from variance parts [(variance, degrees of
    freedom)], df by Welch-Satterthwaite (a part with infinite df, e.g. test images, counts as
    known). NaN bounds when a part is unknown (NaN)."""
    var = sum(v for v, _ in parts)
    counted = [(v, d) for v, d in parts if v > 0 and np.isfinite(d)]
    df = var * var / sum(v * v / d for v, d in counted) if counted else np.inf
    half = scipy.stats.t.ppf((1 + level) / 2, df) * np.sqrt(var) if var > 0 else var  # 0: no spread; NaN: unknown
    return {"estimate": estimate, "low": estimate - half, "high": estimate + half, "df": df}


def interaction_ms(x):
    """Mean square of a two-way table's interaction: what is left after row and column means."""
    r, c = x.shape
    if r < 2 or c < 2:
        return 0.0
    rest = x - x.mean(0) - x.mean(1, keepdims=True) + x.mean()
    return float((rest * rest).sum() / ((r - 1) * (c - 1)))


def contrast_interval(values, weights, outcomes=None, cell_se=None, level=LEVEL):
    """c = sum_s w_s x (mean of source s's cells) for one target, method, model and k (two
    sources compared: w = +1, -1; the slope: least-squares weights, slope_weights), with its
    interval. values[s]: (pre-training seeds, fine-tuning seeds) headline metrics, the same
    fine-tuning seeds in the same columns for every source; outcomes[s]: (P, F, test images) per-image
    outcomes, or None; cell_se[s]: (P, F) standard errors of the cells over test images, or None.

    Three things vary; c's variance is the sum of what resampling each one gives (the bootstrap's
    variance in closed form, n / (n - 1)-corrected):
    - pre-training seeds, per source and independently: two sources' pre-trainings share nothing.
      A source with one pre-training adds no part: its luck is then not in the interval;
    - fine-tuning seeds, one draw for every source (paired): a seed picks the same k-shot subset
      whatever the source, since a subset is a function of labels, k and seed (transfer.py);
    - test images, one draw for every cell (paired): all cells are scored on one test set. From
      per-image outcomes where every cell has them; else from the cells' own bootstrap intervals
      (sources as independent: wider than the paired truth); else not counted (`test` says which).
    An interaction (a fine-tuning seed's luck on particular test images; a pre-training seed's
    with a fine-tuning seed) shows in both levels it joins; it is counted once, in the seed
    level, by taking its mean square off the other (two-way ANOVA). Degrees of freedom by
    Welch-Satterthwaite: with five seeds a half-width is ~2.8 standard errors, not 1.96 (a
    percentile bootstrap over five seeds covered 86-90 % in our simulations)."""
    fine = sum(w * values[s].mean(0) for s, w in weights.items())  # c per fine-tuning seed
    parts = [(fine.var(ddof=1) / len(fine), len(fine) - 1) if len(fine) > 1 else (np.nan, 0)]
    for s, w in weights.items():
        y = values[s]
        if len(y) > 1:  # pre-training seeds; their interaction with fine-tuning seeds is in `fine` already
            parts.append((w * w * max(y.mean(1).var(ddof=1) / len(y) - interaction_ms(y) / y.size, 0), len(y) - 1))
    test = "not counted"
    if outcomes is not None:
        x = sum(w * outcomes[s].mean(0) for s, w in weights.items())  # c per fine-tuning seed and image
        parts.append((max(x.mean(0).var(ddof=1) / x.shape[1] - interaction_ms(x) / x.size, 0), np.inf))
        test = "per-image outcomes"
    elif cell_se is not None:
        parts.append((sum(w * w * cell_se[s].mean() ** 2 for s, w in weights.items()), np.inf))
        test = "cell intervals"
    estimate = sum(w * values[s].mean() for s, w in weights.items())
    return {**t_interval(estimate, parts, level), "test": test}


def source_grids(cells):
    """{source: (fine-tuning seeds, value, se, outcomes)} of the results rows of one target,
    method, model and k (cell_values' columns); each of the last three is a (pre-training seeds,
    fine-tuning seeds) array. The input of contrast, built once per group."""
    grids = {}
    for source, rows in cells.groupby("source", sort=False):
        wide = rows.drop_duplicates(["source_seed", "seed"], keep="last").pivot(
            index="source_seed", columns="seed", values=["value", "se", "outcomes"])
        grids[source] = (wide["value"].columns.to_numpy(), *(wide[f].to_numpy() for f in ("value", "se", "outcomes")))
    return grids


def contrast(grids, weights):
    """contrast_interval over the fine-tuning seeds every weighted source ran, and each source's
    pre-training seeds that ran all of them (grids: source_grids). Adds `seeds` (fine-tuning
    seeds) and `pretrain` ({source: pre-training seeds}); None when they share no seed."""
    seeds = functools.reduce(np.intersect1d, [grids[s][0] for s in weights])
    values, se, outcomes = {}, {}, {}
    for s in weights:
        ran, value, cell_se, cell_outcomes = grids[s]
        columns = np.searchsorted(ran, seeds)
        complete = ~np.isnan(value[:, columns].astype(float)).any(axis=1)
        values[s], se[s], outcomes[s] = (a[complete][:, columns] for a in (value.astype(float), cell_se.astype(float),
                                                                           cell_outcomes))
    if not len(seeds) or not all(len(v) for v in values.values()):
        return None
    flat = [a for o in outcomes.values() for a in o.ravel()]
    one_test_set = all(isinstance(a, np.ndarray) for a in flat) and len({len(a) for a in flat}) == 1
    out = contrast_interval(values, weights,
                            {s: np.array(o.tolist(), np.float64) for s, o in outcomes.items()} if one_test_set else None,
                            se if all(np.isfinite(v).all() for v in se.values()) else None)
    return {**out, "seeds": len(seeds), "pretrain": {s: len(v) for s, v in values.items()}}


def slope_weights(sizes):
    """{source: weight}: the least-squares slope of source means against log10(images) is
    sum_s weight_s x mean_s, a contrast."""
    x = np.log10(pd.Series(sizes, dtype=float))
    x -= x.mean()
    return (x / (x * x).sum()).to_dict()


def published_contrast(reference, target, model, shots, metric, weights):
    """The contrast from the paper's published cells (mean, population std, seeds per source),
    or None unless all are published: sources independent (the table keeps no seed pairing),
    test images not counted; t interval, Welch-Satterthwaite."""
    cells = reference[(reference["target"] == PAPER_TARGETS.get(target)) & (reference["model"] == model)
                      & (reference["shots"] == shots) & (reference["metric"] == metric)].set_index("source")
    n = cells["seeds"].reindex(list(weights))
    if not (n >= 2).all():  # a source unpublished, or without a spread
        return None
    parts = [(w * w * cells.at[s, "std"] ** 2 / (n[s] - 1), n[s] - 1) for s, w in weights.items()]
    return t_interval(sum(w * cells.at[s, "mean"] for s, w in weights.items()), parts)


def verdict(low, high, words):
    """words[0] when the interval lies above 0, words[1] below, else 'not resolved'."""
    return words[0] if low > 0 else words[1] if high < 0 else "not resolved"


SLOPE_WORDS = ("positive", "negative")


def interval_columns(c, prefix="", words=("better", "worse")):
    return {f"{prefix}estimate": c["estimate"], f"{prefix}low": c["low"], f"{prefix}high": c["high"],
            f"{prefix}verdict": verdict(c["low"], c["high"], words)}


def by_group(cells):
    """The cells' groups (GROUP) by target, method, model, then k (full last)."""
    return sorted(cells.groupby(GROUP), key=lambda g: (*g[0][:3], shots_order(g[0][3])))


def compare_sources(cells, reference):
    """Every pair of sources of one target, method, model and k that ran common fine-tuning
    seeds: the larger source (scale order) minus the smaller, its 95 % interval (contrast) and
    verdict, and the paper's difference beside where both are published cells."""
    rows, rank = [], scale_rank(cells)
    for (target, method, model, k), part in by_group(cells):
        sources, grids = sorted(part["source"].unique(), key=rank.get), source_grids(part)
        comparable = paper_comparable(part).all()
        for i, b in enumerate(sources):
            for a in sources[i + 1:]:
                c = contrast(grids, {a: 1, b: -1})
                if c is None:
                    continue
                paper = published_contrast(reference, target, model, k, part["headline"].iloc[0], {a: 1, b: -1})
                rows.append({"target": target, "method": method, "model": model, "shots": k, "source": a,
                             "baseline": b, **interval_columns(c), "seeds": c["seeds"],
                             "source_seeds": c["pretrain"][a], "baseline_seeds": c["pretrain"][b], "test": c["test"],
                             **(interval_columns(paper, "paper_") if paper and comparable else {})})
    return pd.DataFrame(rows)


def scale_slopes(cells, reference):
    """Per target, method, model, k and scale axis (scale_axis): the least-squares slope of the
    headline metric against log10(pre-training images) over the axis' sources of known size,
    with its 95 % interval (contrast); beside it the same slope from the paper's published cells
    of those sources it has (two or more), on the paper's sizes."""
    rows, sized = [], cells[cells["source"].map(scale_axis).notna() & (cells["source_size"] > 0)]
    paper = paper_sizes()
    for (target, method, model, k), part in by_group(sized):
        for axis, d in part.groupby(part["source"].map(scale_axis), sort=False):
            sizes = d.groupby("source")["source_size"].max()
            if sizes.nunique() < 2:
                continue
            c = contrast(source_grids(d), slope_weights(sizes))
            if c is None:
                continue
            row = {"target": target, "method": method, "model": model, "shots": k, "axis": axis,
                   "transfer": transfer_kind(sizes.index[0], target), "sources": ", ".join(sizes.sort_values().index),
                   "min_images": sizes.min(), "max_images": sizes.max(), **interval_columns(c, words=SLOPE_WORDS),
                   "seeds": c["seeds"], "source_seeds": min(c["pretrain"].values()), "test": c["test"]}
            published = sorted((s for s in sizes.index if s in paper), key=paper.get)
            if len(published) > 1 and paper_comparable(d).all():
                theirs = published_contrast(reference, target, model, k, d["headline"].iloc[0],
                                            slope_weights({s: paper[s] for s in published}))
                if theirs:
                    row.update(interval_columns(theirs, "paper_", SLOPE_WORDS), paper_sources=", ".join(published))
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------
# summary.md

READING = ("How to read it. Tables: mean ± std over the runs of a cell (pre-training seeds x fine-tuning "
           "seeds) [95 % interval of the mean]. Every interval counts pre-training seeds, fine-tuning seeds and test "
           "images (fewshot.contrast_interval: t intervals, so five seeds give wide ones). Comparisons pair "
           "sources by fine-tuning seed (a seed picks the same k-shot subset whatever the source) and by test "
           "image; better / worse: the whole interval lies above / below 0, else not resolved. The slope is "
           "the change of the metric per tenfold more pre-training images (least squares on log10 images).")


def fmt_interval(r, prefix=""):
    """'+0.031 [-0.012, +0.074]' from a row's estimate, low and high (under `prefix`)."""
    estimate, low, high = r[prefix + "estimate"], r[prefix + "low"], r[prefix + "high"]
    return f"{estimate:+.3f} " + (f"[{low:+.3f}, {high:+.3f}]" if np.isfinite(low) else "[one seed: none]")


def fmt_images(n):
    """989, 1,979, 191k, 1.28M; empty when unknown (NaN) or none (scratch)."""
    if not n > 0:
        return ""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e4 else f"{n:,.0f}"


def runs_text(summary):
    """'9', or '3-9': runs (pre-training x fine-tuning seeds) per cell."""
    n = summary["n_cells"]
    return f"{n.min()}" + (f"-{n.max()}" if n.max() > n.min() else "")


def by_k(rows, shots, text):
    """Table cells, one per k in `shots`: text(row) where `rows` has that k, else empty."""
    at = {r["shots"]: r for r in rows.to_dict("records")}
    return " | ".join(text(at[k]) if k in at else "" for k in shots)


def k_header(first, shots):
    return [f"| {' | '.join(first)} | " + " | ".join(f"{shots_label(k)}-shot" if k else "full" for k in shots) + " |",
            "|" + "---|" * (len(first) + len(shots))]


def table_lines(part):
    """A target's paper-style table: a row per (method, source, model), sources in scale order,
    a column per k, cells 'mean ± std [95 % interval]' of the headline metric."""
    metric, target = part["headline"].iloc[0], part["target"].iloc[0]
    shots = sorted(part["shots"].unique(), key=shots_order)
    lines = [f"### {target} ({metric})", "", f"Runs per cell: {runs_text(part)} (pre-training x fine-tuning seeds); "
             "per model, sources in order of pre-training images.", ""]
    lines += k_header(["method", "source", "images", "model"], shots)

    def cell(r):
        std = "" if np.isnan(r[f"{metric}_std"]) else f" ± {r[f'{metric}_std']:.3f}"
        band = f" [{r['headline_low']:.3f}, {r['headline_high']:.3f}]" if np.isfinite(r["headline_low"]) else ""
        return f"{r[f'{metric}_mean']:.3f}{std}{band}"
    for (method, source, model), rows in part.groupby(["method", "source", "model"], sort=False):
        lines.append(f"| {method} | {source} | {fmt_images(rows['source_size'].max())} | {model} | "
                     + by_k(rows, shots, cell) + " |")
    return lines + [""]


def paper_lines(part, metric):
    """Markdown lines setting a target's cells beside the paper's in `metric`, or none."""
    if f"{metric}_paper_mean" not in part.columns:
        return []
    rows = part[part[f"{metric}_paper_mean"].notna()]
    if rows.empty:
        return []
    lines = [f"Beside the paper ({PAPER_TARGETS[rows['target'].iloc[0]]}, {PAPER_METRICS[metric]}; "
             f"mean ± std (seeds); ✓ = within {PAPER_SPREAD} paper stds):", "",
             "| method | source | model | shots | ours | paper | ours - paper | within |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows.to_dict("records"):
        std = r[f"{metric}_std"]
        ours = f"{r[f'{metric}_mean']:.4f}" + ("" if np.isnan(std) else f" ± {std:.4f}") + f" ({r['n_cells']})"
        paper = f"{r[f'{metric}_paper_mean']:.4f} ± {r[f'{metric}_paper_std']:.4f} ({int(r[f'{metric}_paper_seeds'])})"
        mark = "✓" if r[f"{metric}_within"] else "✗"
        lines.append(f"| {r['method']} | {r['source']} | {r['model']} | {shots_label(r['shots'])} | {ours} | "
                     f"{paper} | {r[f'{metric}_diff']:+.4f} | {mark} |")
    return lines + [""]


def interval_rows(rows, shots, ours, paper):
    """Table lines of one comparison or slope: the first cells `ours`, then per k 'estimate
    [95 % interval] verdict'; below it the paper's published one (first cells `paper`), if any."""
    lines = [f"| {' | '.join(ours)} | " + by_k(rows, shots, lambda r: f"{fmt_interval(r)} {r['verdict']}") + " |"]
    if "paper_low" in rows and rows["paper_low"].notna().any():
        lines.append(f"| {' | '.join(paper)} | " + by_k(rows, shots, lambda r: f"{fmt_interval(r, 'paper_')} "
                     f"{r['paper_verdict']}" if np.isfinite(r["paper_estimate"]) else "") + " |")
    return lines


def comparison_lines(comp):
    """A target's comparisons: a row per (method, model, pair of sources), a column per k, cells
    'difference [95 % interval] verdict'; the paper's published difference below where it exists."""
    if comp.empty:
        return []
    shots = sorted(comp["shots"].unique(), key=shots_order)
    lines = ["Comparisons (larger source - smaller; seeds: pre-training seeds of each x paired fine-tuning seeds):", ""]
    lines += k_header(["method", "model", "sources", "seeds"], shots)
    for (method, model, a, b), rows in comp.groupby(["method", "model", "source", "baseline"], sort=False):
        seeds = ", ".join(dict.fromkeys(f"{r.source_seeds}/{r.baseline_seeds} x {r.seeds}" for r in rows.itertuples()))
        pair = f"{a} - {b}"
        lines += interval_rows(rows, shots, [method, model, pair, seeds], ["paper (published)", model, pair, ""])
    return lines + ["", f"Test images: {', '.join(comp['test'].unique())}.", ""]


def slope_lines(slopes):
    """The scale effect of every target, intra- and inter-domain side by side: a row per
    (target, scale axis, method, model), a column per k, cells 'slope [95 % interval]
    verdict'; the paper's slope below where it exists."""
    if slopes.empty:
        return []
    shots = sorted(slopes["shots"].unique(), key=shots_order)
    lines = ["## The scale effect", "", "Slope of the headline metric per tenfold more pre-training images "
             "(least squares along a scale axis: its sources of known size; fewshot.SCALE_AXES), "
             "[95 % interval]; positive / negative: the interval lies above / below 0.", ""]
    lines += k_header(["target", "transfer", "method", "model", "sources"], shots)
    for (target, axis, method, model), rows in slopes.groupby(["target", "axis", "method", "model"], sort=False):
        first = rows.iloc[0]
        transfer = f"{axis} axis -> {target}" + (f" ({first['transfer']}-domain)" if first["transfer"] else "")
        sources = f"{first['sources']} ({fmt_images(first['min_images'])}-{fmt_images(first['max_images'])})"
        theirs = ", ".join(rows.get("paper_sources", pd.Series(dtype=str)).dropna().unique())
        lines += interval_rows(rows, shots, [target, transfer, method, model, sources],
                               [target, transfer, "paper (published)", model, theirs])
    return lines + ["", f"Test images: {', '.join(slopes['test'].unique())}.", ""]


def scale_steps(sources):
    """(larger, smaller) pairs along each scale axis: each source against the next smaller one
    on its axis, the smallest against scratch. `sources` in scale order."""
    axes = {}
    for s in sources:
        if scale_axis(s):
            axes.setdefault(scale_axis(s), []).append(s)
    steps = [(a, b) for axis in axes.values() for b, a in zip(axis, axis[1:])]
    return steps + ([(axis[0], "scratch") for axis in axes.values()] if "scratch" in sources else [])


def verdict_text(rows, words):
    """'better at k = 5, full (intervals above 0); not resolved at k = 1 (intervals include 0)'."""
    why = {words[0]: "intervals above 0", words[1]: "intervals below 0", "not resolved": "intervals include 0"}
    return "; ".join(f"{word} at k = {', '.join(shots_label(k) for k in rows.loc[rows['verdict'] == word, 'shots'])} "
                     f"({why[word]})" for word in dict.fromkeys(rows["verdict"]))


def finding_lines(comp, slopes, rank):
    """A target's findings, no more than its intervals support: each step of each scale axis
    (scale_steps), each slope with its numbers, the paper's slope beside."""
    lines = []
    for (method, model), rows in comp.groupby(["method", "model"], sort=False) if len(comp) else []:
        for a, b in scale_steps(sorted(set(rows["source"]) | set(rows["baseline"]), key=rank.get)):
            pair = rows[(rows["source"] == a) & (rows["baseline"] == b)]
            if len(pair):
                r = pair.iloc[0]
                lines.append(f"- {a} vs {b} ({method} {model}; {r['source_seeds']} and {r['baseline_seeds']} "
                             f"pre-training seeds, {r['seeds']} paired fine-tuning seeds): "
                             f"{verdict_text(pair, ('better', 'worse'))}.")
    for (axis, method, model), rows in slopes.groupby(["axis", "method", "model"], sort=False) if len(slopes) else []:
        r = rows.iloc[0]
        per_k = "; ".join(f"k = {shots_label(x['shots'])}: {fmt_interval(x)} {x['verdict']}" for _, x in rows.iterrows())
        lines.append(f"- Scale effect along the {axis} axis" + (f" ({r['transfer']}-domain)" if r["transfer"] else "")
                     + f", {method} {model}, {r['sources']} ({fmt_images(r['min_images'])}-{fmt_images(r['max_images'])} "
                     f"images), per tenfold more images: {per_k}.")
        if "paper_low" in rows and rows["paper_low"].notna().any():
            per_k = "; ".join(f"k = {shots_label(x['shots'])}: {fmt_interval(x, 'paper_')} {x['paper_verdict']}"
                              for _, x in rows[rows["paper_low"].notna()].iterrows())
            lines.append(f"- The paper's published cells ({model}, {rows['paper_sources'].dropna().iloc[0]}): {per_k}.")
    if len(comp) and ((comp["source_seeds"] == 1) | ((comp["baseline_seeds"] == 1) & (comp["baseline"] != "scratch"))).any():
        lines.append("- One pre-training run per source: its luck is not in these intervals, so a 'better' can be "
                     "that run's luck (run_all.sh PRETRAIN_SEEDS pre-trains each source several times).")
    return ["Findings:", "", *lines, ""] if lines else []


def markdown_summary(summary, comparisons, slopes, left_out=()):
    """summary.md: how to read it, rows left out, the scale effect across targets, then per
    target its table, the paper beside, the comparisons and the findings."""
    lines = ["# Transfer results", "", READING, ""]
    if left_out:
        lines += ["Left out (a non-finite value never enters a mean, comparison or slope):", "",
                  *[f"- {line}" for line in left_out], ""]
    lines += slope_lines(slopes)
    rank = scale_rank(summary)
    for target, part in summary.groupby("target", sort=False):
        comp = comparisons[comparisons["target"] == target] if len(comparisons) else comparisons
        slope = slopes[slopes["target"] == target] if len(slopes) else slopes
        lines += table_lines(part) + paper_lines(part, part["headline"].iloc[0])
        lines += comparison_lines(comp) + finding_lines(comp, slope, rank)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Plots

def _panels(summary, keys=("target",)):
    """A figure with one panel per group of `keys` (3 per row): (figure, [(axes, (key, rows))]).
    Panels left over in the last row are hidden."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(summary.groupby(list(keys) if len(keys) > 1 else keys[0], sort=False))
    cols = min(3, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.8 * cols, 3.6 * rows_n + 1.2), squeeze=False)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return fig, list(zip(axes.flat, groups))


def _caption(fig, title, caption):
    """Title on top and caption under the panels: a figure read alone says what it shows."""
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(caption, int(width * 15))
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height, va="top")
    fig.text(0.01, 0.1 / height, "\n".join(lines), fontsize=7.5, va="bottom")
    fig.tight_layout(rect=(0, (0.2 + 0.14 * len(lines)) / height, 1, 1 - 0.35 / height))


def _save(fig, path):
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paper_curve(reference, target, source, model, metric):
    """The paper's cells of `metric` for our target name, source and model, full last."""
    cells = reference[(reference["target"] == PAPER_TARGETS.get(target)) & (reference["source"] == source)
                      & (reference["model"] == model) & (reference["metric"] == metric)]
    return cells.sort_values("shots", key=lambda s: s.map(shots_order))


def plot_fewshot(summary, path, reference=None):
    """Headline metric against shots, one panel per target, one line per source (and model,
    method); scratch dashed as the baseline. With `reference`, the paper's curve of every
    comparable (source, model) dashed in its colour, over the paper's shots. Returns the number
    of paper curves drawn."""
    fig, panels = _panels(summary)
    drawn = 0
    for ax, (target, part) in panels:
        metric = part["headline"].iloc[0]
        lines = list(part.groupby(["method", "source", "model"], sort=False))
        curves = {}
        for (method, source, model), r in lines:
            if reference is not None and r["paper_comparable"].all():
                curve = paper_curve(reference, target, source, model, metric)
                if len(curve):
                    curves[(source, model)] = curve
        shots = sorted({int(k) for k in part["shots"]} | {int(k) for c in curves.values() for k in c["shots"]},
                       key=shots_order)
        pos = {k: i for i, k in enumerate(shots)}
        colours = {}
        for (method, source, model), r in lines:
            r = r.sort_values("shots", key=lambda s: s.map(shots_order))
            style = {"marker": "s" if method == "linear" else "o"}
            if source == "scratch":
                style.update(linestyle="--", color="black" if method == "linear" else "gray")
            bars = ax.errorbar([pos[k] for k in r["shots"]], r[f"{metric}_mean"], yerr=r[f"{metric}_std"].fillna(0),
                               capsize=3, label=f"{source} {model}" + (" (linear)" if method == "linear" else ""),
                               **style)
            colours.setdefault((source, model), bars[0].get_color())
        for (source, model), c in curves.items():
            ax.errorbar([pos[k] for k in c["shots"]], c["mean"], yerr=c["std"], linestyle="--", marker="x",
                        capsize=2, alpha=0.7, color=colours[(source, model)], label=f"paper {source} {model}")
        drawn += len(curves)
        ax.set_xticks(range(len(shots)), [shots_label(k) for k in shots])
        ax.set_xlabel("examples per class")
        ax.set_ylabel(metric)
        ax.set_title(f"{target}: {metric}")
        ax.legend(fontsize=7)
    _caption(fig, "Transfer against examples per class",
             f"Points: mean over the {runs_text(summary)} runs of a cell (pre-training x fine-tuning seeds); bars: "
             "± one std over them. Dashed grey: from scratch."
             + (" Dashed x: the paper's published cells (± std over its seeds)." if drawn else ""))
    _save(fig, path)
    return drawn


def size_ticks(ax, sizes):
    """Readable ticks of the log size axis: the decades within it, or the sizes themselves when
    it spans fewer than two; labels 989, 20k, 1.28M; no labels on minor ticks."""
    from matplotlib.ticker import NullFormatter
    lo, hi = min(sizes), max(sizes)
    decades = [10.0 ** e for e in range(int(np.ceil(np.log10(lo))), int(np.floor(np.log10(hi))) + 1)]
    ticks = decades if len(decades) >= 2 else sorted(set(sizes))
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xticks(ticks, [fmt_images(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def paper_cells(reference, target, model, k, metric):
    """The paper's published cells of one target, model and k at its source sizes: source,
    size, mean and 95 % t interval (low, high)."""
    sizes = paper_sizes()
    cells = reference[(reference["target"] == PAPER_TARGETS.get(target)) & (reference["model"] == model)
                      & (reference["shots"] == k) & (reference["metric"] == metric) & reference["source"].isin(sizes)]
    half = scipy.stats.t.ppf((1 + LEVEL) / 2, cells["seeds"] - 1) * cells["std"] / np.sqrt(cells["seeds"] - 1)
    return cells.assign(size=cells["source"].map(sizes), low=cells["mean"] - half, high=cells["mean"] + half)


def draw_sources(ax, cells, target, colour, label=None, paper=False):
    """One k's sources (columns source, size, mean, low, high) at their sizes: joined along each
    scale axis with a band of their 95 % intervals (the paper's: dashed, x), off every axis as
    lone points with bars; circles for intra-domain sources, squares for inter-domain."""
    cells = cells.sort_values("size")
    for axis, seg in cells.groupby(cells["source"].map(lambda s: scale_axis(s) or ""), sort=False):
        kind = transfer_kind(seg["source"].iloc[0], target)
        marker = "x" if paper else {"intra": "o", "inter": "s"}.get(kind, "D")
        ax.plot(seg["size"], seg["mean"], marker=marker, color=colour, label=label, alpha=0.7 if paper else 1,
                linestyle=("--" if paper else "-") if axis else "none")
        label = None
        if axis and len(seg) > 1 and not paper:
            ax.fill_between(seg["size"], seg["low"], seg["high"], color=colour, alpha=0.15)
        else:
            ax.vlines(seg["size"], seg["low"], seg["high"], color=colour, alpha=0.5, linestyles="--" if paper else "-")


def plot_scale(summary, path, reference):
    """The scale effect in one figure: headline mean against pre-training images (log axis), a
    panel per target (and method, model), a colour per k, sources drawn by draw_sources;
    scratch dotted; the paper's published cells of the same target, model and k dashed."""
    sized, paper = summary[(summary["source"] != "scratch") & (summary["source_size"] > 0)], False
    fig, panels = _panels(sized, ("target", "method", "model"))
    for ax, ((target, method, model), part) in panels:
        metric, xs = part["headline"].iloc[0], list(part["source_size"])
        scratch = summary[(summary["target"] == target) & (summary["method"] == method) & (summary["model"] == model)
                          & (summary["source"] == "scratch")].set_index("shots")
        for i, (k, r) in enumerate(sorted(part.groupby("shots"), key=lambda g: shots_order(g[0]))):
            ours = r.rename(columns={"source_size": "size", f"{metric}_mean": "mean", "headline_low": "low",
                                     "headline_high": "high"})
            draw_sources(ax, ours, target, f"C{i}", f"k = {shots_label(k)}")
            if k in scratch.index:
                ax.axhline(scratch.at[k, f"{metric}_mean"], color=f"C{i}", linestyle=":", linewidth=1)
            theirs = paper_cells(reference, target, model, k, metric) if r["paper_comparable"].all() else []
            if len(theirs):
                draw_sources(ax, theirs, target, f"C{i}", paper=True)
                xs, paper = xs + list(theirs["size"]), True
        for source, size in part.groupby("source")["source_size"].max().items():
            ax.text(size, 0.02, source, transform=ax.get_xaxis_transform(), rotation=90, fontsize=6, alpha=0.7,
                    ha="center", va="bottom")
        ax.set_xscale("log")
        size_ticks(ax, xs)
        ax.set(xlabel="pre-training images (log scale)", ylabel=metric)
        ax.set_title(f"{target}: {metric}, {model} {method}", fontsize=9)
        ax.legend(fontsize=7)
    _caption(fig, "Transfer against pre-training scale",
                "Lines: mean over the runs of each source (pre-training x fine-tuning seeds), joined along a scale "
                "axis; bands and bars: 95 % intervals (seeds and test images). Circles: sources of the target's domain "
                "(intra-domain); squares: of the other domain (inter-domain). Dotted: from scratch, same colour per k."
                + (" Dashed x: the paper's published cells at the paper's source sizes (95 % t intervals over its seeds)."
                   if paper else ""))
    _save(fig, path)


# ----------------------------------------------------------------------------------------
# Inputs of the summary, and its command

def parse_source_sizes(items):
    sizes = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise models.UserError(f"--source-sizes expects NAME=COUNT, got {item!r}") from None
    return sizes


def authors_results(table):
    """Rows in our results format (method 'authors', shots 0 = full, our target and metric
    names, headline as the paper's figures: mean AUC for PadChest, accuracy otherwise; source
    sizes from reference/source_sizes.csv) from the authors' finetuning_results_<target>_test_
    <metric>.csv tables: metric_value, metric ('test/acc'), seed, shot ('10_shot', 'full_shot'),
    pretrained_model ('<source>_bit50x1', '<source>_bit152x4'), dataset. Runs were resumed, so a
    (dataset, metric, pretrained_model, shot, seed) can appear more than once: its last row counts."""
    t = table.drop_duplicates(["dataset", "metric", "pretrained_model", "shot", "seed"], keep="last")
    metric = t["metric"].astype(str).str.removeprefix("test/").map({p: o for o, p in PAPER_METRICS.items()})
    net = t["pretrained_model"].astype(str).str.extract(r"^(?P<source>.+)_bit(?P<depth>\d+)x(?P<width>\d+)$")
    shots = t["shot"].astype(str).str.extract(r"^(full|\d+)_shot$")[0]
    for bad, what in [(metric.isna(), f"metric (expected test/{', test/'.join(PAPER_METRICS.values())})"),
                      (net["source"].isna(), "pretrained_model (expected SOURCE_bitDEPTHxWIDTH)"),
                      (shots.isna(), "shot (expected K_shot or full_shot)")]:
        if bad.any():
            raise models.UserError(f"authors' results: unknown {what}: {t.loc[bad.to_numpy()].iloc[0].to_dict()}")
    ours = {}
    for name, paper in PAPER_TARGETS.items():
        ours.setdefault(paper, name)
    long = pd.DataFrame({"method": AUTHORS, "source": net["source"], "source_seed": "",
                         "model": "R" + net["depth"] + "x" + net["width"],
                         "target": t["dataset"].astype(str).map(lambda d: ours.get(d, d)),
                         "shots": shots.replace("full", "0").astype(int), "seed": t["seed"].astype(int),
                         "metric": metric, "value": t["metric_value"].astype(float)})
    wide = long.pivot(index=transfer.KEY_COLUMNS, columns="metric", values="value")
    wide = wide.reindex(columns=METRICS).reset_index()
    figure = np.where(wide["target"] == "padchest", "auc", "accuracy")
    known = wide[METRICS].notna()
    has_figure = known.to_numpy()[np.arange(len(wide)), [METRICS.index(f) for f in figure]]
    wide["headline"] = np.where(has_figure, figure, known.idxmax(axis=1))  # else the metric read
    wide["source_size"] = wide["source"].map(paper_sizes())
    return wide


def finished(results):
    """Rows of runs that finished: where results.csv has a `status` column (failed cells are
    recorded too), rows whose status is not 'ok' are dropped; an empty status (a row written
    before the column existed) counts as ok."""
    if "status" not in results.columns:
        return results
    status = results["status"]
    return results[status.isna() | status.astype(str).isin(["ok", ""])]


def summary_inputs(paths):
    """The CSV files behind --summarize: a file as given; a run folder's results.csv; a folder
    without one (the authors' results/) gives its finetuning_results_*_test_<metric>.csv of the
    three metrics."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        ours = os.path.join(path, "results.csv")
        authors = sorted(os.path.join(path, name) for name in os.listdir(path)
                         if name.startswith("finetuning_results_")
                         and any(name.endswith(f"_test_{m}.csv") for m in PAPER_METRICS.values()))
        files += authors if authors and not os.path.exists(ours) else [ours]
    return files


def read_results_file(csv):
    """One results CSV as a table (names and source seeds as text, exactly as written: a source
    called NA or 007 stays so; outcomes paths made absolute); a one-line error when unreadable."""
    if not os.path.exists(csv):
        raise FileNotFoundError(f"no results file at {csv}")
    try:
        table = pd.read_csv(csv, dtype={c: str for c in ("method", "source", "source_seed", "model", "target", "outcomes")},
                            keep_default_na=False, na_values={c: ["", "nan", "NaN"] for c in NUMERIC_COLUMNS})
    except pd.errors.EmptyDataError:
        raise models.UserError(f"{csv} is empty") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise models.UserError(f"{csv}: not a readable results file ({str(e).splitlines()[0]})") from None
    if "outcomes" in table.columns:  # written relative to the results file
        folder = os.path.dirname(os.path.abspath(csv))
        table["outcomes"] = [os.path.join(folder, p) if p else "" for p in table["outcomes"]]
    return table


def read_summary_inputs(files):
    """Our results files (finished rows) and the authors' ones, as one results table."""
    ours, authors = [], []
    for csv in files:
        table = read_results_file(csv)
        if set(AUTHORS_COLUMNS) <= set(table.columns):
            authors.append(table)
            continue
        table = table.reindex(columns=list(dict.fromkeys(["source_seed", *table.columns])), fill_value="")  # older files
        missing = [c for c in transfer.KEY_COLUMNS + METRICS + ["headline"] if c not in table.columns]
        if missing:
            raise models.UserError(f"{csv} is not a results file (missing columns {', '.join(missing)})")
        kept = finished(table)
        if len(kept) < len(table):
            print(f"{csv}: {len(table) - len(kept)} rows whose status is not 'ok' left out")
        ours.append(kept)
    if authors:
        ours.append(authors_results(pd.concat(authors, ignore_index=True)))
    results = pd.concat(ours, ignore_index=True)
    if results.empty:
        raise models.UserError(f"{', '.join(files)}: no results")
    unknown = set(results["headline"]) - set(METRICS)
    if unknown:
        raise models.UserError(f"unknown headline metric {sorted(map(str, unknown))[0]!r} (one of {', '.join(METRICS)})")
    if "source_size" not in results.columns:
        results["source_size"] = np.nan
    return results


def describe(row):
    seed = f" (pre-training seed {row['source_seed']})" if str(row.get("source_seed", "")) else ""
    return (f"{row['target']} {row['method']} {row['source']}{seed} {row['model']} {shots_label(row['shots'])}-shot "
            f"seed {row['seed']}")


def finite_rows(results):
    """(results, notes): a row whose headline metric is not a finite number left out; an
    infinite other metric, or a NaN where the other runs of its cell have a number, blanked; a
    note naming each such row. So a NaN or infinity never enters a mean, comparison or slope unseen."""
    values = results[METRICS].astype(float)
    head = values.to_numpy()[np.arange(len(values)), results["headline"].map(METRICS.index).to_numpy()]
    cell = [results[k] for k in ["target", "method", "source", "model", "shots"]]
    odd = np.isinf(values) | (values.isna() & np.isfinite(values).groupby(cell).transform("any"))
    dropped, notes = ~np.isfinite(head), []
    for i in np.flatnonzero(odd.any(axis=1).to_numpy() | dropped):
        r = results.iloc[i]
        bad = [m for m in METRICS if odd[m].iat[i] or (dropped[i] and m == r["headline"])]
        notes.append(f"{describe(r)}: {', '.join(f'{m} = {r[m]}' for m in bad)} ("
                     + ("row left out" if dropped[i] else f"left out of the {' and '.join(bad)} means") + ")")
    clean = results.assign(**{m: values[m].mask(odd[m]) for m in METRICS})
    return clean[~dropped].reset_index(drop=True), notes


def read_outcomes(path, n):
    """The per-image outcomes transfer.py saved for a cell, or None (no file, or not one finite
    value per test image)."""
    if not isinstance(path, str) or not path or not os.path.exists(path):
        return None
    a = np.load(path)
    return a if a.ndim == 1 and (not n > 0 or len(a) == n) and np.isfinite(a).all() else None


def cell_values(results):
    """The results with what the statistics read: value (the headline metric), se (the cell's
    standard error over test images from its 95 % bootstrap interval: width / 3.92) and outcomes
    (per-image outcomes, or None)."""
    out = results.copy()
    out["value"] = out[METRICS].to_numpy(float)[np.arange(len(out)), out["headline"].map(METRICS.index).to_numpy()]
    out["se"] = (out["ci_high"] - out["ci_low"]) / 3.92 if {"ci_low", "ci_high"} <= set(out.columns) else np.nan
    paths = out["outcomes"] if "outcomes" in out.columns else [""] * len(out)
    sizes = pd.to_numeric(out["num_eval"], errors="coerce") if "num_eval" in out.columns else [np.nan] * len(out)
    out["outcomes"] = [read_outcomes(p, n) for p, n in zip(paths, sizes)]
    return out


def labelled(table):
    """A table to write: shots as '1', '5', ..., 'full'."""
    return table.assign(shots=table["shots"].map(shots_label)) if len(table) else table


def write_summary(out, summary, comparisons, slopes, md, args):
    """summary.csv, comparisons.csv, slopes.csv (those two when there is something to compare),
    summary.md and summary_args.json in `out`; returns the names written."""
    written = []
    for name, table in [("summary.csv", summary), ("comparisons.csv", comparisons), ("slopes.csv", slopes)]:
        if len(table):
            with models.atomic_write(os.path.join(out, name)) as f:
                labelled(table).to_csv(f, index=False)
            written.append(name)
    with models.atomic_write(os.path.join(out, "summary.md")) as f:
        f.write(md)
    with models.atomic_write(os.path.join(out, "summary_args.json")) as f:
        json.dump(vars(args), f, indent=1)
    return written + ["summary.md"]


def run_summary(args):
    files = summary_inputs(args.summarize)
    results = read_summary_inputs(files)
    out = args.summary_dir or os.path.dirname(os.path.abspath(files[0]))
    os.makedirs(out, exist_ok=True)
    for name, size in parse_source_sizes(args.source_sizes).items():
        results.loc[results["source"] == name, "source_size"] = size
    if "args" in results.columns and results["args"].map(google_bit).any():
        print("rows fine-tuned from Google's BiT-S / BiT-M weights are not set beside the paper's "
              "(its ImageNet models are its own)")
    results, left_out = finite_rows(results)
    for note in left_out:
        print(f"left out: {note}")
    cells, reference = cell_values(results), read_paper_reference()
    summary = beside_paper(summarize(cells), reference)
    comparisons, slopes = compare_sources(cells, reference), scale_slopes(cells, reference)
    md = markdown_summary(summary, comparisons, slopes, left_out)
    written = write_summary(out, summary, comparisons, slopes, md, args)
    curves = plot_fewshot(summary, os.path.join(out, "fewshot.png"), reference if args.paper_curves else None)
    written.append("fewshot.png")
    unsized = sorted(set(cells.loc[cells["source"].map(scale_axis).notna() & ~(cells["source_size"] > 0), "source"]))
    if unsized:
        print(f"no pre-training size recorded for {', '.join(unsized)}: left out of the slopes and source_size.png "
              "(--source-size when running, or --source-sizes here)")
    sized = summary.loc[(summary["source"] != "scratch") & (summary["source_size"] > 0), "source_size"]
    if sized.nunique() > 1:  # a curve needs two sizes
        plot_scale(summary, os.path.join(out, "source_size.png"), reference)
        written.append("source_size.png")
    else:
        print("source_size.png not drawn: it needs two or more sources of known size (--source-size "
              "when running, or --source-sizes here)")
    print(md)
    with_outcomes = sum(o is not None for o in cells["outcomes"])
    print(f"per-image outcomes for {with_outcomes} of {len(cells)} runs (test images resampled where every run of a "
          "comparison has them; else the runs' own intervals, else seeds alone: the tables' 'test images' line)")
    head = [(r.get(f"{r['headline']}_paper_mean", np.nan), r.get(f"{r['headline']}_within"))
            for r in summary.to_dict("records")]
    matched = [within for paper, within in head if not np.isnan(paper)]
    print(f"{len(matched)} of {len(summary)} cells have a paper counterpart in their headline metric, "
          f"{sum(matched)} within {PAPER_SPREAD} paper stds"
          + (f"; {curves} paper curves dashed in fewshot.png" if args.paper_curves else ""))
    print(f"wrote {', '.join(os.path.join(out, w) for w in written)}")
    return summary


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
