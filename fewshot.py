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
        with models.StopSignals() as stop:
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

def shots_label(k):
    return "full" if k == 0 else str(int(k))


def shots_order(k):
    return np.inf if k == 0 else k


def summarize(results):
    """Mean and (sample) std over seeds of every metric per method, source, model, target and
    shots, ordered by target, method, source, model and k (full last)."""
    df = results.copy()
    df["shots"] = df["shots"].astype(int)
    keys = ["target", "method", "source", "model", "shots"]
    groups = df.groupby(keys, sort=False)
    out = groups[METRICS].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out.insert(0, "n_seeds", groups["seed"].nunique())
    out["headline"] = groups["headline"].first()
    out["source_size"] = groups["source_size"].max()
    out = out.reset_index()
    out["_order"] = out["shots"].map(shots_order)
    out = out.sort_values(["target", "method", "source", "model", "_order"]).drop(columns="_order")
    return out.reset_index(drop=True)


def markdown_table(summary):
    """Paper-style tables: one per target, a row per (method, source, model), a column per k,
    cells 'mean ± std' of the target's headline metric."""
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


def plot_fewshot(summary, path):
    """Headline metric against shots, one panel per target, one line per source (and model,
    method); scratch dashed as the baseline."""
    fig, panels = _panels(summary)
    for ax, (target, part) in panels:
        metric = part["headline"].iloc[0]
        shots = sorted(part["shots"].unique(), key=shots_order)
        pos = {k: i for i, k in enumerate(shots)}
        for (method, source, model), r in part.groupby(["method", "source", "model"], sort=False):
            r = r.sort_values("shots", key=lambda s: s.map(shots_order))
            style = {"marker": "s" if method == "linear" else "o"}
            if source == "scratch":
                style.update(linestyle="--", color="black" if method == "linear" else "gray")
            ax.errorbar([pos[k] for k in r["shots"]], r[f"{metric}_mean"], yerr=r[f"{metric}_std"].fillna(0),
                        capsize=3, label=f"{source} {model}" + (" (linear)" if method == "linear" else ""),
                        **style)
        ax.set_xticks(range(len(shots)), [shots_label(k) for k in shots])
        ax.set_xlabel("examples per class")
        ax.set_ylabel(metric)
        ax.set_title(target)
        ax.legend(fontsize=7)
    _save(fig, path)


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


def add_summary_arguments(parser):
    """Flags of --summarize (the summary section's own)."""
    parser.add_argument("--summarize", metavar="RESULTS_DIR_OR_CSV", default=None,
                        help="only summarise a results CSV (or OUT folder) into summary.csv, "
                             "summary.md, fewshot.png, source_size.png")
    parser.add_argument("--source-sizes", nargs="+", metavar="NAME=COUNT", default=None,
                        help="with --summarize: pre-training set sizes per source for source_size.png")
    return parser


def run_summary(args):
    path = args.summarize
    csv = os.path.join(path, "results.csv") if os.path.isdir(path) else path
    if not os.path.exists(csv):
        raise FileNotFoundError(f"no results file at {csv}")
    out = os.path.dirname(os.path.abspath(csv))
    results = pd.read_csv(csv)
    missing = [c for c in transfer.KEY_COLUMNS + METRICS + ["headline"] if c not in results.columns]
    if missing:
        raise models.UserError(f"{csv} is not a results file (missing columns {', '.join(missing)})")
    if results.empty:
        raise models.UserError(f"{csv} has no results")
    if "source_size" not in results.columns:
        results["source_size"] = np.nan
    for name, size in parse_source_sizes(args.source_sizes).items():
        results.loc[results["source"] == name, "source_size"] = size
    summary = summarize(results)
    summary.to_csv(os.path.join(out, "summary.csv"), index=False)
    table = markdown_table(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "summary_args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    plot_fewshot(summary, os.path.join(out, "fewshot.png"))
    written = ["summary.csv", "summary.md", "fewshot.png"]
    if (summary["source_size"] > 0).any():
        plot_source_size(summary, os.path.join(out, "source_size.png"))
        written.append("source_size.png")
    else:
        print("no source sizes known (--source-size when running, or --source-sizes here): "
              "source_size.png not drawn")
    print(table)
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
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
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
    transfer.finish_args(args, args.seeds)
    if args.probe_c <= 0 or args.probe_iters < 1:
        raise models.UserError("--probe-c must be > 0 and --probe-iters >= 1")
    args.shots = list(dict.fromkeys(args.shots))
    return run_grid(args)


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
