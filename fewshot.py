"""Few-shot transfer grid: for every k in --shots and every seed in --seeds, fine-tune on k
training examples per class with transfer.py's functions (or fit a linear probe on frozen
features), append the results to OUT/results.csv, then summarise them as tables and plots.

One GPU or CPU (the main use):
    python fewshot.py --data prepared/tuberculosis --init runs/pretrain_all/model.pt \
        --source chexpert_mimic_nih_padchest --model R50x1 --shots 1 5 10 100 full --out runs/fewshot
    python fewshot.py --data prepared/pets --init BiT-M-R50x1.npz --source imagenet21k \
        --model R50x1 --linear-probe --out runs/fewshot        # whole grid in seconds after extraction
    python fewshot.py --summarize runs/fewshot                 # summary.csv, summary.md, fewshot.png
Several GPUs (each run is a DDP run over all ranks):
    torchrun --standalone --nproc_per_node=4 fewshot.py --data prepared/padchest --init model.pt \
        --source all --model R152x4 --batch-split 4 --out runs/fewshot
Quick CPU run:
    python fewshot.py --data runs/demo/prepared/tuberculosis --init runs/demo/pretrain/nih+chexpert/model.pt \
        --source nih+chexpert --model R14x1 --shots 1 5 10 --seeds 0 1 2 --out runs/demo --steps 40 \
        --lr 0.01 --resize 56 --crop 48 --batch-size 16

Subsets are the paper's (finetune.py --examples-per-class): one np.random.RandomState(seed)
shuffles each class's training positions in class order and the first k are kept; a class with
fewer than k images keeps all it has (one line says which; results.csv's num_train is the real
size). Hence a pure function of (labels, k, seed), nested across k for one seed. Multi-label
targets: --multilabel-mode single (the paper's way: keep the images with exactly one positive
label, train and evaluate single-label) or multi (at least k positives per label, or all a label
has, rows taken greedily in a seeded order; training stays multi-label). Shots 0 or "full" use
the whole training split; --oversample applies to those only.

A run whose (method, source, model, target, shots, seed) is already in the results CSV is
skipped. A run that fails (e.g. a non-finite loss) is logged, recorded in failures.csv beside
results.csv (not as a metric row) and the grid goes on. Exit status: 0 all recorded, 1 some
failed (listed at the end), 2 bad input, 130 / 143 stopped by Ctrl-C / SIGTERM (finished rows
kept; a rerun continues).
"""
import argparse
import contextlib
import json
import os
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

import models
import transfer

METRICS = ["accuracy", "auc", "map"]
# Columns of a results file read as numbers when summarising (empty = missing).
NUMERIC_COLUMNS = METRICS + ["source_size", "ci_low", "ci_high", "metric_value"]


# ----------------------------------------------------------------------------------------
# k-shot subsets (pure functions of labels, k and seed)

def parse_shots(value):
    """'full' or a count >= 0 (0 = full) -> int, for argparse."""
    if str(value).lower() == "full":
        return 0
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shots must be a count or 'full', got {value!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"shots must be >= 0, got {k}")
    return k


def single_label(targets):
    """The paper's single-label view of multi-label targets: positions of the rows with exactly
    one positive label (unknown counts as negative) and their one-hot targets."""
    pos = np.nan_to_num(targets) > 0.5
    keep = np.flatnonzero(pos.sum(1) == 1)
    return keep, pos[keep].astype(np.float32)


def select_shots(targets, k, seed):
    """Positions of k examples of every class of one-hot `targets` (all of a class that has
    fewer), sorted: the paper's rule, one RandomState(seed) shuffling each class's positions in
    class order, the first k kept. The shuffles do not depend on k, so the subsets are nested
    across k. k = 0 means all rows."""
    if k == 0:
        return np.arange(len(targets))
    classes = np.asarray(targets).argmax(1)
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(targets.shape[1]):
        members = np.flatnonzero(classes == c)
        rng.shuffle(members)
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen))


def select_shots_multilabel(targets, k, seed):
    """Positions of a subset with at least k positives of every label (all the positives of a
    label that has fewer), sorted. Rows are visited in one seeded order; level j = 1..k extends
    level j-1 by taking, in that order, the rows that are positive for a label still below
    min(j, its positives). Hence nested across k, a function of (labels, k, seed) only."""
    pos = np.nan_to_num(targets) > 0.5
    if k == 0:
        return np.arange(len(targets))
    available = pos.sum(0)
    order = np.random.default_rng(seed).permutation(len(targets))
    pos_ordered = pos[order]
    taken = np.zeros(len(order), bool)
    counts = np.zeros(pos.shape[1], int)
    for level in range(1, k + 1):
        while True:
            below = counts < np.minimum(level, available)
            if not below.any():
                break
            candidates = ~taken & pos_ordered[:, below].any(1)
            first = int(candidates.argmax())  # earliest row in the seeded order
            taken[first] = True
            counts += pos_ordered[first]
    return np.sort(order[taken])


def short_classes(targets, k, names):
    """[(name, count)] of the classes (labels) with fewer than k training examples (positives),
    which keep all they have."""
    counts = (np.nan_to_num(targets) > 0.5).sum(0)
    return [(names[j], int(counts[j])) for j in np.flatnonzero(counts < k)] if k else []


def log_short_classes(train, shots):
    for k in shots:
        short = short_classes(train.targets, k, train.labels)
        if short:
            listed = ", ".join(f"{name!r} {count}" for name, count in short[:5])
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            models.print0(f"{k} shots: {len(short)} of {len(train.labels)} classes have fewer training "
                          f"images and keep all they have: {listed}{more}")


# ----------------------------------------------------------------------------------------
# Linear probe: logistic regression on frozen features, in torch

def fit_logistic(features, targets, multilabel, c=1.0, max_iter=500):
    """L2-regularised logistic regression fitted with L-BFGS: multinomial (softmax) for
    single-label targets, one-vs-rest sigmoids for multi-label ones (unknown targets masked).
    Objective as scikit-learn's LogisticRegression(C=c): sum of losses + ||W||^2 / (2c), the
    bias not penalised. Returns (W (D, L), b (L,)) as float tensors."""
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64)
    n, d = x.shape
    w = torch.zeros(d, y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    known = ~torch.isnan(y)
    y = torch.nan_to_num(y)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        if multilabel:
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
                    * known).sum()
        else:
            loss = -(y * torch.log_softmax(logits, 1)).sum()
        # Divided by n so that L-BFGS tolerances mean the same at every k; same minimiser.
        loss = (loss + (w * w).sum() / (2 * c)) / n
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


# ----------------------------------------------------------------------------------------
# The grid

def subset(train, k, seed, mode):
    """Training positions for k shots and this seed."""
    if train.multilabel and mode == "multi":
        return select_shots_multilabel(train.targets, k, seed)
    return select_shots(train.targets, k, seed)


def single_label_view(dataset):
    keep, onehot = single_label(dataset.targets)
    if len(keep) == 0:
        raise models.UserError(f"{dataset.folder}: no rows with exactly one positive label "
                               "(try --multilabel-mode multi)")
    return transfer.view(dataset, keep, onehot, multilabel=False)


def probe_cells(args, env, base_model, train, evalset, stop):
    """One linear probe per (k, seed) through transfer.run_cell, on features of the train and
    evaluation rows extracted once (at the first probe that needs them)."""
    features = {}

    def extract():
        if not features:
            cfg = transfer.settings(args, len(train), train.meta.get("orig_size", [train.meta["size"]] * 2))
            model, batch, t0 = base_model.to(env.device), transfer.eval_batch_size(cfg, args, env), time.time()
            features["train"], _ = transfer.extract_features(model, train, cfg["crop"], env, batch, args)
            features["eval"] = transfer.extract_features(model, evalset, cfg["crop"], env, batch, args)
            models.print0(f"features {len(train)} train + {len(evalset)} eval at {cfg['crop']}px, "
                          f"dim {features['train'].shape[1]}, {time.time() - t0:.1f}s")
        return features

    for k in args.shots:
        for seed in args.seeds:
            if stop:
                raise transfer.Stopped(stop.signum)
            idx = subset(train, k, seed, args.multilabel_mode)

            def fit():
                f = extract()
                w, b = fit_logistic(f["train"][idx], train.targets[idx], train.multilabel, args.probe_c,
                                    args.probe_iters)
                eval_x, eval_y = f["eval"]
                return (torch.as_tensor(eval_x) @ w + b).numpy(), eval_y, args.probe_iters

            key = transfer.run_key(args, "linear", k, seed)
            yield key, transfer.run_cell(args, env, key, evalset, len(idx), fit)


def finetune_cells(args, env, base_model, train, evalset, stop):
    """One fine-tune per (k, seed) through transfer.run; --oversample in full-shot runs only."""
    for k in args.shots:
        for seed in args.seeds:
            idx = subset(train, k, seed, args.multilabel_mode)
            key = transfer.run_key(args, "finetune", k, seed)
            yield key, transfer.run(args, env, base_model, transfer.view(train, idx), evalset, k, seed, stop,
                                    oversample=args.oversample and k == 0)


def run_grid(args):
    """The whole grid; rows of the finished runs. Failed runs are listed at the end and end the
    process with status 1, a stop signal with 128 + its number."""
    env = models.setup_distributed(args.device)
    try:
        with models.folder_lock(args.out) if env.is_master else contextlib.nullcontext(), \
                models.StopSignals() as stop:
            train, evalset, split = transfer.load_target(args.data)
            if train.multilabel and args.multilabel_mode == "single":
                # A different task (other rows, single-label metrics): recorded under its own name.
                train, evalset = single_label_view(train), single_label_view(evalset)
                args.target = f"{args.target}_single"
            models.print0(f"target {args.target}: {len(train)} train, {len(evalset)} {split}, "
                          f"{'multi-label' if train.multilabel else 'single-label'}, {len(train.labels)} labels, "
                          f"pipeline {args.pipeline}")
            log_short_classes(train, args.shots)
            torch.manual_seed(args.seeds[0])  # one random init (--init scratch) shared by the grid
            base, args.input_norm = transfer.init_model(args, len(train.labels))
            cfg = transfer.settings(args, len(train), train.meta.get("orig_size", [train.meta["size"]] * 2))
            if not args.linear_probe:
                transfer.check_batch(cfg, args, env)
                note = transfer.long_cpu_run_note(env.device, cfg)
                if note:
                    models.print0(note)
            models.save_args(args.out, args)
            cells = (probe_cells if args.linear_probe else finetune_cells)(args, env, base, train, evalset, stop)
            rows, failed = [], []
            try:
                for key, row in cells:
                    if row is None:
                        failed.append(key)
                    elif row:
                        rows.append(row)
            except transfer.Stopped as e:
                transfer.stopped_exit(e, args)
            if failed:
                models.print0(f"{len(failed)} of {len(args.shots) * len(args.seeds)} runs failed "
                              f"(reasons in {transfer.failures_path(args)}): "
                              + "; ".join(transfer.describe(key) for key in failed))
                raise SystemExit(1)
            if env.world_size > 1:
                dist.barrier()  # every rank done before the group goes (no abort at exit)
            return rows
    finally:
        models.cleanup_distributed()


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
    long = pd.DataFrame({"method": AUTHORS, "source": net["source"],
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


def add_summary_arguments(parser):
    """Flags of --summarize (the summary section's own)."""
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


# ----------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    parser = models.ArgumentParser(description="Few-shot transfer grid over shots and seeds, and its summary.")
    transfer.add_common_arguments(parser)
    parser.add_argument("--shots", nargs="+", type=parse_shots, default=[1, 5, 10, 100, 0],
                        help="examples per class (a class with fewer keeps all it has); 0 or 'full' = "
                             "the whole training split")
    parser.add_argument("--seeds", nargs="+", type=models.at_least(0), default=[0, 1, 2, 3, 4],
                        help="seeds of subset choice and training (the paper's 0..4)")
    parser.add_argument("--multilabel-mode", default="single", choices=["single", "multi"],
                        help="multi-label targets: single = images with exactly one positive, trained "
                             "single-label (the paper's way; results under TARGET_single); "
                             "multi = >= k positives per label, trained multi-label")
    parser.add_argument("--linear-probe", action="store_true",
                        help="logistic regression on frozen features instead of fine-tuning")
    parser.add_argument("--probe-c", type=float, default=1.0,
                        help="inverse L2 strength of the linear probe (scikit-learn's C)")
    parser.add_argument("--probe-iters", type=int, default=500, help="L-BFGS iterations of the linear probe")
    add_summary_arguments(parser)
    return parser


def main(args):
    if args.summarize:
        return run_summary(args)
    transfer.finish_args(args)
    if args.probe_c <= 0 or args.probe_iters < 1:
        raise models.UserError("--probe-c must be > 0 and --probe-iters >= 1")
    args.shots = list(dict.fromkeys(args.shots))
    return run_grid(args)


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
