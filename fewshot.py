"""The few-shot grid and its summary. For every k in --shots and every seed in --seeds, one
transfer.py cell on k training examples per class (fine-tuned, or with --linear-probe a
logistic regression on frozen features, extracted once for the grid), appended to
OUT/results.csv; then --summarize turns results into tables and plots beside the paper's numbers.

One GPU or CPU:
    python fewshot.py --data prepared/tuberculosis --init runs/R50x1/chexpert/best.pt --source chexpert \
        --model R50x1 --shots 1 5 10 100 full --out runs/fewshot
    python fewshot.py --data prepared/pets --init BiT-M-R50x1.npz --source bit-m --model R50x1 \
        --linear-probe --out runs/fewshot
    python fewshot.py --summarize runs/fewshot          # summary.csv, summary.md, fewshot.png, source_size.png
Several GPUs (each cell is a DDP run over all ranks):
    torchrun --standalone --nproc_per_node=4 fewshot.py --data prepared/padchest --init best.pt \
        --source chexpert_mimic_nih_padchest --model R152x4 --batch-split 4 --out runs/fewshot
The demo's grid: bash run_all.sh (its plan prints each fewshot.py command).

Subsets, recipes, skipping of finished cells, failures and exit status are transfer.py's (its
docstring). Multi-label targets default to --multilabel-mode single here, the paper's few-shot way.
"""
import json
import os

import numpy as np
import pandas as pd

import models
import transfer

METRICS = ["accuracy", "auc", "map"]
# Columns of a results file read as numbers when summarising (empty = missing).
NUMERIC_COLUMNS = METRICS + ["source_size", "ci_low", "ci_high", "metric_value"]


def get_args_parser():
    parser = transfer.add_arguments(models.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.set_defaults(multilabel_mode="single")
    parser.add_argument("--shots", nargs="+", type=transfer.parse_shots, default=[1, 5, 10, 100, 0],
                        help="examples per class (a class with fewer keeps all it has); 0 or 'full' = "
                             "the whole training split")
    parser.add_argument("--seeds", nargs="+", type=models.at_least(0), default=[0, 1, 2, 3, 4],
                        help="seeds of subset choice and training (the paper's 0..4)")
    parser.add_argument("--summarize", nargs="+", metavar="RESULTS", default=None,
                        help="only summarise results into summary.csv, summary.md, fewshot.png, "
                             "source_size.png, the paper's published numbers beside matching cells: "
                             "results CSVs or OUT folders, or the authors' finetuning_results_*.csv "
                             "files or their results/ folder")
    parser.add_argument("--summary-dir", default=None,
                        help="with --summarize: folder for its outputs (default: the first input's folder)")
    parser.add_argument("--paper-curves", action="store_true",
                        help="with --summarize: draw the paper's curve of every matching source and "
                             "model dashed in fewshot.png")
    parser.add_argument("--source-sizes", nargs="+", metavar="NAME=COUNT", default=None,
                        help="with --summarize: pre-training set sizes per source for source_size.png")
    return parser


def main(args):
    if args.summarize:
        return run_summary(args)
    return transfer.run(args, [(k, seed) for k in dict.fromkeys(args.shots) for seed in args.seeds])


# ----------------------------------------------------------------------------------------
# Summary: tables and plots

PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "paper_results.csv")
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


def summarize(results):
    """Mean and std over seeds of every metric per method, source, model, target and shots,
    ordered by target, method, source, model and k (full last). The std is the sample std for
    our runs; rows read from the authors' files get the paper's population std (ddof 0), so that
    their summary is the published table."""
    df = results.copy()
    df["shots"] = df["shots"].astype(int)
    df["paper_comparable"] = paper_comparable(df)
    keys = ["target", "method", "source", "model", "shots"]
    groups = df.groupby(keys, sort=False)
    mean, std = groups[METRICS].mean(), groups[METRICS].std()
    authors = mean.index.get_level_values("method") == AUTHORS
    std[authors] = groups[METRICS].std(ddof=0)[authors]
    out = pd.DataFrame({"n_seeds": groups["seed"].nunique()})
    for m in METRICS:
        out[f"{m}_mean"], out[f"{m}_std"] = mean[m], std[m]
    out["headline"] = groups["headline"].first()
    out["source_size"] = groups["source_size"].max()
    out["paper_comparable"] = groups["paper_comparable"].all()
    out = out.reset_index()
    out["_order"] = out["shots"].map(shots_order)
    out = out.sort_values(["target", "method", "source", "model", "_order"]).drop(columns="_order")
    return out.reset_index(drop=True)


def read_paper_reference(path=PAPER_RESULTS):
    """The paper's published cells with shots as our counts (0 = full) and our metric names;
    targets keep the paper's names."""
    ref = pd.read_csv(path)
    ref["shots"] = [0 if s == "full" else int(s) for s in ref["shots"]]
    ref["metric"] = ref["metric"].map({paper: ours for ours, paper in PAPER_METRICS.items()})
    return ref


def beside_paper(summary, reference):
    """The summary plus, per metric M, the paper's cell matching (target, source, model, shots,
    M): M_paper_mean, M_paper_std, M_paper_seeds, M_diff (ours - paper) and M_within (|diff| <=
    PAPER_SPREAD paper stds). Empty where no paper cell matches or the row is not comparable."""
    out = summary.copy()
    keys = pd.DataFrame({"target": out["target"].map(PAPER_TARGETS).where(out["paper_comparable"]),
                         "source": out["source"], "model": out["model"], "shots": out["shots"]})
    for m in METRICS:
        cells = keys.assign(metric=m).merge(reference, how="left", on=list(keys.columns) + ["metric"])
        diff = out[f"{m}_mean"].to_numpy(float) - cells["mean"].to_numpy(float)
        within = np.abs(diff) <= PAPER_SPREAD * cells["std"].to_numpy(float)
        out[f"{m}_paper_mean"] = cells["mean"].to_numpy(float)
        out[f"{m}_paper_std"] = cells["std"].to_numpy(float)
        out[f"{m}_paper_seeds"] = cells["seeds"].astype("Int64").array
        out[f"{m}_diff"] = diff
        out[f"{m}_within"] = pd.array(np.where(np.isnan(diff), None, within), dtype="boolean")
    return out


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
        ours = f"{r[f'{metric}_mean']:.4f}" + ("" if np.isnan(std) else f" ± {std:.4f}") + f" ({r['n_seeds']})"
        paper = f"{r[f'{metric}_paper_mean']:.4f} ± {r[f'{metric}_paper_std']:.4f} ({int(r[f'{metric}_paper_seeds'])})"
        mark = "✓" if r[f"{metric}_within"] else "✗"
        lines.append(f"| {r['method']} | {r['source']} | {r['model']} | {shots_label(r['shots'])} | {ours} | "
                     f"{paper} | {r[f'{metric}_diff']:+.4f} | {mark} |")
    return lines + [""]


def markdown_table(summary):
    """Paper-style tables: one per target, a row per (method, source, model), a column per k,
    cells 'mean ± std' of the target's headline metric; below it, the cells that the paper
    also reports, beside its numbers."""
    lines = []
    for target, part in summary.groupby("target", sort=False):
        metric = part["headline"].iloc[0]
        shots = sorted(part["shots"].unique(), key=shots_order)
        lines += [f"### {target} ({metric})", "",
                  "| method | source | model | " + " | ".join(f"{shots_label(k)}-shot" if k else "full"
                                                            for k in shots) + " |",
                  "|---|---|---|" + "---|" * len(shots)]
        for (method, source, model), rows in part.groupby(["method", "source", "model"], sort=False):
            cells = []
            for k in shots:
                r = rows[rows["shots"] == k]
                if r.empty:
                    cells.append("")
                    continue
                mean, std = r[f"{metric}_mean"].iloc[0], r[f"{metric}_std"].iloc[0]
                cells.append(f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}")
            lines.append(f"| {method} | {source} | {model} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += paper_lines(part, metric)
    return "\n".join(lines)


def _panels(summary):
    """A figure with one panel per target (3 per row): (figure, [(axes, (target, rows))]).
    Panels left over in the last row are hidden."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(summary.groupby("target", sort=False))
    cols = min(3, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.5 * rows_n), squeeze=False)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return fig, list(zip(axes.flat, groups))


def _save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
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
        ax.set_title(target)
        ax.legend(fontsize=7)
    _save(fig, path)
    return drawn


def plot_source_size(summary, path):
    """Headline metric against pre-training set size (log scale), one panel per target, one
    line per (method, model, shots). Only sources with a known size (scratch, 0, is left out)."""
    fig, panels = _panels(summary[summary["source_size"] > 0])
    for ax, (target, part) in panels:
        metric = part["headline"].iloc[0]
        for (method, model, k), r in part.groupby(["method", "model", "shots"], sort=False):
            r = r.sort_values("source_size")
            ax.errorbar(r["source_size"], r[f"{metric}_mean"], yerr=r[f"{metric}_std"].fillna(0), marker="o",
                        capsize=3, label=f"{model} {shots_label(k)}{'-shot' if k else ''}" + (" (linear)" if method == "linear" else ""))
        ax.set_xscale("log")
        ax.set_xlabel("pre-training images")
        ax.set_ylabel(metric)
        ax.set_title(target)
        ax.legend(fontsize=7)
    _save(fig, path)


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
    names, headline as the paper's figures: mean AUC for PadChest, accuracy otherwise) from the
    authors' finetuning_results_<target>_test_<metric>.csv tables: metric_value, metric
    ('test/acc'), seed, shot ('10_shot', 'full_shot'), pretrained_model ('<source>_bit50x1',
    '<source>_bit152x4'), dataset. Runs were resumed, so a (dataset, metric, pretrained_model,
    shot, seed) can appear more than once: its last row counts."""
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


def read_summary_inputs(files):
    """Our results files (finished rows) and the authors' ones, as one results table."""
    ours, authors = [], []
    for csv in files:
        if not os.path.exists(csv):
            raise FileNotFoundError(f"no results file at {csv}")
        try:
            # Names as text, exactly as written: a source called NA or 007 stays so.
            table = pd.read_csv(csv, dtype={c: str for c in ("method", "source", "model", "target")},
                                keep_default_na=False, na_values={c: ["", "nan", "NaN"] for c in NUMERIC_COLUMNS})
        except pd.errors.EmptyDataError:
            raise models.UserError(f"{csv} is empty") from None
        except (UnicodeDecodeError, pd.errors.ParserError) as e:
            raise models.UserError(f"{csv}: not a readable results file ({str(e).splitlines()[0]})") from None
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
    if "source_size" not in results.columns:
        results["source_size"] = np.nan
    return results


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
    reference = read_paper_reference()
    summary = beside_paper(summarize(results), reference)
    with models.atomic_write(os.path.join(out, "summary.csv")) as f:
        summary.to_csv(f, index=False)
    table = markdown_table(summary)
    with models.atomic_write(os.path.join(out, "summary.md")) as f:
        f.write(table)
    with models.atomic_write(os.path.join(out, "summary_args.json")) as f:
        json.dump(vars(args), f, indent=1)
    curves = plot_fewshot(summary, os.path.join(out, "fewshot.png"), reference if args.paper_curves else None)
    written = ["summary.csv", "summary.md", "fewshot.png"]
    if summary.loc[summary["source_size"] > 0, "source_size"].nunique() > 1:  # a curve needs two sizes
        plot_source_size(summary, os.path.join(out, "source_size.png"))
        written.append("source_size.png")
    else:
        print("source_size.png not drawn: it needs two or more sources of known size (--source-size "
              "when running, or --source-sizes here)")
    print(table)
    head = [(r[f"{r['headline']}_paper_mean"], r[f"{r['headline']}_within"]) for r in summary.to_dict("records")]
    matched = [within for paper, within in head if not np.isnan(paper)]
    print(f"{len(matched)} of {len(summary)} cells have a paper counterpart in their headline metric, "
          f"{sum(matched)} within {PAPER_SPREAD} paper stds"
          + (f"; {curves} paper curves dashed in fewshot.png" if args.paper_curves else ""))
    print(f"wrote {', '.join(os.path.join(out, w) for w in written)}")
    return summary


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
