"""Transfer a pre-trained BiT ResNet-v2 to a prepared target with the BiT-HyperRule: fine-tune it
(or fit a linear probe on its frozen features) on k examples per class (--shots, --seed) or the
whole training split, evaluate on the test split (valid when there is none) and append one row to
a results CSV. fewshot.py runs the grid of (shots, seed) cells through run().

One GPU or CPU:
    python transfer.py --data prepared/tuberculosis --init runs/R50x1/chexpert/best.pt \
        --source chexpert --model R50x1 --shots 10 --seed 0 --out runs/transfer
Several GPUs (DDP: the global batch is split over the ranks, evaluation is exact):
    torchrun --standalone --nproc_per_node=4 transfer.py --data prepared/covidx \
        --init BiT-M-R50x1.npz --source bit-m --model R50x1 --oversample --out runs/transfer

Recipes (RECIPES): paper, the authors' fine-tuning (SGD Nesterov with AGC, the classifier weight
excluded; lr 0.001, batch 128, a default-initialised head), and bit, BiT's (plain momentum, no
clipping, lr 0.003, batch 512, a zero head). The lr is used as given whatever the batch size, as
in both codes. Schedule, MixUp and resolution follow the HyperRule (hyperrule()); --pipeline chest
is the paper's PadChest target instead (224 px and the chest augmentation of pre-training).

k-shot subsets are the authors' two rules, as the target's meta.json shot_rule says: per_class
(select_shots; PadChest): one RandomState(seed) shuffles each class's training rows in class
order and the first k are kept, nested across k; loader (select_shots_loader; CIFAR, Pets,
Flowers, COVIDx, Tuberculosis): one seeded shuffled pass, the last k seen of each class once
every class has k. A class with fewer keeps all it has. The subsets equal the authors' where the
training rows are in their dataset's order (prepare_data keeps it; README). Multi-label targets:
--multilabel-mode single keeps the images with exactly one positive label and trains
single-label (the paper's few-shot PadChest; results under TARGET_single), multi keeps >= k
positives per label (select_shots_multilabel) and trains multi-label.

A cell whose (method, source, model, target, shots, seed) is already in the results CSV is
skipped. A cell whose loss becomes non-finite, or that fails otherwise, is recorded in
failures.csv beside the results CSV (never as a metric row) and the others go on. Exit status:
0 done, 1 some cell failed, 2 bad input, 128 + signal number when stopped (130 Ctrl-C, 143 SIGTERM).
"""
import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

import models
from prepare_data import PreparedDataset, read_meta

RECIPES = {"paper": {"batch_size": 128, "lr": 0.001, "nesterov": True, "agc": 0.01, "zero_head": False},
           "bit": {"batch_size": 512, "lr": 0.003, "nesterov": False, "agc": 0.0, "zero_head": True}}
CHEST_SIZE = 224        # the paper's PadChest target: models.CHEST_AUGMENT at 224 px
LONG_CPU_PIXELS = 1e8   # training pixels (crop^2 x batch x steps) above which a CPU run takes long
LOG_SECONDS = 60        # a log line at least this often, whatever --log-every says
KEY_COLUMNS = ["method", "source", "source_seed", "model", "target", "shots", "seed"]
# What produced a cell: a short content hash of the --init file, and of the arguments that change
# a cell's result (all but NOT_SETTINGS). A cell is skipped only when both match.
IDENTITY_COLUMNS = ["weights", "settings"]
NOT_SETTINGS = {"data", "init", "source", "source_seed", "source_size", "target", "out", "results", "device",
                "log_every", "save", "shots", "seed", "seeds", "summarize", "summary_dir", "paper_curves",
                "source_sizes"}
RESULT_COLUMNS = KEY_COLUMNS + IDENTITY_COLUMNS + ["source_size", "task", "headline", "accuracy", "auc", "map", "ci_low",
                                "ci_high", "outcomes", "num_train", "num_eval", "steps", "input_norm", "pipeline",
                                "wall_s", "commit", "args"]
FAILURE_COLUMNS = KEY_COLUMNS + ["reason", "num_train", "commit", "time"]
# What to lower when a run is out of memory (models.run_cli); fewshot.py shares it.
MEMORY_HINT = "--batch-size (or raise --batch-split), --crop or --resize"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: this cell stops and counts as failed."""


# ----------------------------------------------------------------------------------------
# Rules (pure functions): BiT-HyperRule, the run's settings, sampling, k-shot subsets

def hyperrule(num_train, orig_hw):
    """BiT-HyperRule (Kolesnikov et al. 2020, big_transfer's bit_hyperrule.py) for a training set
    of `num_train` images of original size orig_hw = (h, w): the schedule [warm-up, three decays,
    total steps], MixUp alpha, resize and crop."""
    if num_train < 20_000:
        schedule = [100, 200, 300, 400, 500]
    elif num_train < 500_000:
        schedule = [500, 3000, 6000, 9000, 10_000]
    else:
        schedule = [500, 6000, 12_000, 18_000, 20_000]
    resize, crop = (160, 128) if orig_hw[0] * orig_hw[1] < 96 * 96 else (512, 480)
    return {"schedule": schedule, "mixup": 0.0 if num_train < 20_000 else 0.1, "resize": resize, "crop": crop}


def scale_schedule(schedule, steps):
    """The schedule stretched to `steps` total steps, warm-up and decays at the same fractions."""
    return [max(1, round(s * steps / schedule[-1])) for s in schedule[:-1]] + [steps]


def lr_at(step, schedule, base_lr):
    """The lr at `step` (0-based) of a schedule [warm-up, decays..., total]: linear warm-up from 0,
    then x0.1 from each decay step on (BiT's code decays one step later, a negligible shift)."""
    return models.step_lr(step, base_lr, schedule[0], schedule[1:-1])


def settings(args, num_train, orig_hw):
    """The HyperRule's values with the recipe, the pipeline and the command-line overrides."""
    rule, recipe = hyperrule(num_train, orig_hw), RECIPES[args.recipe]
    schedule = rule["schedule"] if args.steps is None else scale_schedule(rule["schedule"], args.steps)
    if args.pipeline == "chest":  # one size; --resize > --crop gives BiT-style random crops
        crop = args.crop or CHEST_SIZE
        resize, augment = args.resize or crop, models.CHEST_AUGMENT
    else:
        crop, resize, augment = args.crop or rule["crop"], args.resize or rule["resize"], {}
    out = {"schedule": schedule, "mixup": rule["mixup"] if args.mixup is None else args.mixup,
           "resize": resize, "crop": crop, "augment": augment, "batch_size": args.batch_size or recipe["batch_size"],
           "lr": recipe["lr"] if args.lr is None else args.lr, "nesterov": recipe["nesterov"], "agc": recipe["agc"]}
    if args.min_epochs:  # a larger subset gets more steps, so that it is seen this many times
        steps = math.ceil(args.min_epochs * num_train / out["batch_size"])
        if steps > schedule[-1]:
            out["schedule"] = scale_schedule(schedule, steps)
    if out["crop"] > out["resize"]:
        raise models.UserError(f"--crop {out['crop']} is larger than --resize {out['resize']}")
    return out


def long_cpu_run_note(device, cfg):
    """One line saying that these settings train for hours on a CPU, and how to shorten it; or None."""
    steps, batch, crop = cfg["schedule"][-1], cfg["batch_size"], cfg["crop"]
    if torch.device(device).type == "cpu" and crop * crop * batch * steps > LONG_CPU_PIXELS:
        return (f"note: {steps} steps of batch {batch} at {crop} px on a CPU take hours for a BiT model; "
                "shorten with --steps, --resize/--crop, --batch-size")
    return None


def oversampling_weights(targets):
    """Per-example sampling weights that make every class equally likely (the paper's
    oversampling for COVIDx and Flowers): 1 / size of the example's class. Multi-label rows use
    their rarest positive label; rows without a positive count as their own class."""
    pos = np.nan_to_num(targets) > 0.5
    rarest = np.where(pos, pos.sum(0)[None, :], np.inf).min(1)
    rarest[~pos.any(1)] = (~pos.any(1)).sum()
    return 1.0 / rarest


def batch_indices(num_train, batch_size, steps, seed, weights=None):
    """The training positions of every step, (steps, batch): reshuffled passes over the data, or
    weighted draws with replacement when oversampling. The same on every rank."""
    g = torch.Generator().manual_seed(seed)
    total = steps * batch_size
    if weights is not None:
        idx = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), total, True, generator=g)
    else:
        idx = torch.cat([torch.randperm(num_train, generator=g) for _ in range(math.ceil(total / num_train))])
    return idx[:total].view(steps, batch_size).numpy()


def select_shots(targets, k, seed):
    """Positions of k examples of every class of one-hot `targets` (all of a class that has fewer),
    sorted: the paper's rule, one RandomState(seed) shuffling each class's positions in class
    order, the first k kept. The shuffles do not depend on k, so the subsets are nested across k.
    k = 0 means all rows."""
    if k == 0:
        return np.arange(len(targets))
    classes, rng = np.asarray(targets).argmax(1), np.random.RandomState(seed)
    chosen = []
    for c in range(targets.shape[1]):
        members = np.flatnonzero(classes == c)
        rng.shuffle(members)
        chosen.append(members[:k])
    return np.sort(np.concatenate(chosen))


def loader_order(n, seed):
    """The order in which the authors' few-shot search (fs.find_fewshot_indices) visits n rows:
    torch's DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed)), whose
    iterator first draws its base seed from the generator, then RandomSampler's randperm(n)."""
    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g).numpy()


def select_shots_loader(targets, k, seed):
    """Positions of k examples of every class of one-hot `targets`, sorted: the authors' rule for
    their torchvision-style targets, a pass in loader_order(seed) until every class has k, the
    last k seen of each class kept. A class with fewer keeps all it has (the authors' search
    fails there). Not nested across k. k = 0 means all rows."""
    if k == 0:
        return np.arange(len(targets))
    classes, order = np.asarray(targets).argmax(1), loader_order(len(targets), seed)
    place = np.empty(len(order), int)
    place[order] = np.arange(len(order))  # each row's place in the pass
    members = [np.sort(place[classes == c]) for c in range(targets.shape[1])]
    stop = max(m[k - 1] if len(m) >= k else len(order) for m in members)  # where every class has k
    return np.sort(np.concatenate([order[m[m <= stop][-k:]] for m in members]))


def select_shots_multilabel(targets, k, seed):
    """Positions of a subset with at least k positives of every label (all the positives of a
    label that has fewer), sorted. Rows are visited in one seeded order; level j = 1..k extends
    level j-1 by taking, in that order, the rows positive for a label still below min(j, its
    positives). So nested across k, and a function of (labels, k, seed) only."""
    pos = np.nan_to_num(targets) > 0.5
    if k == 0:
        return np.arange(len(targets))
    available, order = pos.sum(0), np.random.default_rng(seed).permutation(len(targets))
    pos_ordered, taken, counts = pos[order], np.zeros(len(order), bool), np.zeros(pos.shape[1], int)
    for level in range(1, k + 1):
        while (below := counts < np.minimum(level, available)).any():
            first = int((~taken & pos_ordered[:, below].any(1)).argmax())  # earliest in the seeded order
            taken[first] = True
            counts += pos_ordered[first]
    return np.sort(order[taken])


def single_label(targets):
    """The paper's single-label view of multi-label targets: positions of the rows with exactly
    one positive label (unknown counts as negative) and their one-hot targets."""
    pos = np.nan_to_num(targets) > 0.5
    keep = np.flatnonzero(pos.sum(1) == 1)
    return keep, pos[keep].astype(np.float32)


def short_classes(targets, k, names):
    """[(name, count)] of the classes (labels) with fewer than k training examples (positives)."""
    counts = (np.nan_to_num(targets) > 0.5).sum(0)
    return [(names[j], int(counts[j])) for j in np.flatnonzero(counts < k)] if k else []


# ----------------------------------------------------------------------------------------
# Metrics of the final evaluation

def headline_name(multilabel, pipeline="bit"):
    """The figure a run is judged by: mean ROC AUC for multi-label targets and for the chest
    pipeline (the paper's PadChest figures, also single-label few-shot), else accuracy."""
    return "auc" if multilabel or pipeline == "chest" else "accuracy"


def per_class_metrics(logits, targets, multilabel, names):
    """One row per label: support (positives), precision, recall, F1 (0 when undefined, as
    scikit-learn's zero_division=0), ROC AUC and average precision. Single-label predictions are
    the argmax, multi-label ones sigmoid > 0.5; unknown (NaN) targets are skipped."""
    scores, targets = models.scores_from_logits(logits, multilabel), np.asarray(targets, np.float64)
    pred = scores > 0.5 if multilabel else np.eye(scores.shape[1], dtype=bool)[scores.argmax(1)]
    rows = []
    for j, name in enumerate(names):
        known = ~np.isnan(targets[:, j])
        y, p = targets[known, j] > 0.5, pred[known, j]
        tp, fp, fn = (y & p).sum(), (~y & p).sum(), (y & ~p).sum()
        rows.append({"label": name, "support": int(y.sum()), "precision": tp / (tp + fp) if tp + fp else 0.0,
                     "recall": tp / (tp + fn) if tp + fn else 0.0,
                     "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                     "auc": models.roc_auc(scores[known, j], y), "ap": models.average_precision(scores[known, j], y)})
    return pd.DataFrame(rows)


def bootstrap_ci(logits, targets, multilabel, samples=1000, seed=0, level=0.95, metric="auto"):
    """Percentile bootstrap interval of the headline metric ("accuracy" or "auc"; auto: by the
    task): rows resampled with replacement (seeded); resamples where the metric is undefined (one
    class only) are dropped."""
    rng, targets = np.random.default_rng(seed), np.asarray(targets, np.float64)
    if metric == "auc" or (metric == "auto" and multilabel):
        scores = models.scores_from_logits(logits, multilabel)

        def value(idx):
            with np.errstate(all="ignore"):
                aucs = models.column_metric(models.roc_auc, scores[idx], targets[idx])
            return np.nan if np.isnan(aucs).all() else np.nanmean(aucs)
    else:
        correct = np.asarray(logits).argmax(1) == targets.argmax(1)

        def value(idx):
            return correct[idx].mean()
    values = np.array([models.stop_point() or value(rng.integers(0, len(targets), len(targets)))
                       for _ in range(samples)], np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def image_outcomes(logits, targets, multilabel, metric):
    """Each test image's share of the headline metric, so that their mean is the metric: 1 or 0
    (correct) for accuracy; for mean ROC AUC, the image's pseudo-value (DeLong's linearisation:
    AUC + n / n_class x (its placement among the other class - AUC), averaged over the labels
    that have both classes). The summary resamples test images from these (fewshot.contrast)."""
    targets = np.asarray(targets, np.float64)
    if metric == "accuracy":
        return (np.asarray(logits).argmax(1) == targets.argmax(1)).astype(np.float32)
    scores, n, per_label = models.scores_from_logits(logits, multilabel), len(targets), []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        pos, neg = known & (targets[:, j] > 0.5), known & ~(targets[:, j] > 0.5)
        if not pos.any() or not neg.any():
            continue
        s = scores[:, j]
        # share of the other class scored below each image (ties count half)
        below_neg, below_pos = ((np.searchsorted(o, s, "left") + np.searchsorted(o, s, "right")) / 2 / len(o)
                                for o in (np.sort(s[neg]), np.sort(s[pos])))
        auc = below_neg[pos].mean()
        z = np.full(n, auc)
        z[pos] += n / pos.sum() * (below_neg[pos] - auc)
        z[neg] += n / neg.sum() * (1 - below_pos[neg] - auc)
        per_label.append(z)
    return np.mean(per_label, 0).astype(np.float32) if per_label else np.full(n, np.nan, np.float32)


# ----------------------------------------------------------------------------------------
# Data and model

def view(dataset, idx=None, targets=None, multilabel=None):
    """A PreparedDataset restricted to positions `idx`, optionally with other targets and task
    (e.g. single-label ones); the images stay memory-mapped."""
    out = copy.copy(dataset)
    if idx is not None:
        out.rows, out.targets = dataset.rows[idx], dataset.targets[idx]
    if targets is not None:
        out.targets = np.asarray(targets, np.float32)
    out.multilabel = dataset.multilabel if multilabel is None else multilabel
    return out


def load_target(args):
    """(train split, evaluation split) of the prepared target: 'test', else 'valid'. With
    --multilabel-mode single, a multi-label target's rows with one positive label, single-label
    (recorded as TARGET_single: other rows, other metrics)."""
    train = PreparedDataset(args.data, "train")
    if len(train) == 0:
        raise models.UserError(f"{args.data} has no rows with split 'train'")
    split = next((s for s in ("test", "valid") if (train.table["split"] == s).any()), None)
    if split is None:
        raise models.UserError(f"{args.data} has neither a 'test' nor a 'valid' split to evaluate on")
    evalset = PreparedDataset(args.data, split)
    if train.multilabel and args.multilabel_mode == "single":
        (keep, onehot), (keep_eval, onehot_eval) = single_label(train.targets), single_label(evalset.targets)
        if len(keep) == 0 or len(keep_eval) == 0:
            raise models.UserError(f"{args.data}: no rows with exactly one positive label (try --multilabel-mode multi)")
        train, evalset = view(train, keep, onehot, False), view(evalset, keep_eval, onehot_eval, False)
        args.target += "_single"
    models.print0(f"target {args.target}: {len(train)} train, {len(evalset)} {split}, "
                  f"{'multi-label' if train.multilabel else 'single-label'}, {len(train.labels)} labels, "
                  f"pipeline {args.pipeline}")
    return train, evalset


def orig_hw(dataset):
    return dataset.meta.get("orig_size", [dataset.meta["size"]] * 2)


def init_model(args, num_classes):
    """(--model with --init weights or random ones and the recipe's new head, the input
    normalisation those weights expect)."""
    model = models.create_model(args.model, num_classes)
    if args.init == "scratch":
        norm = args.input_norm or "bit"
    elif os.path.isdir(args.init):
        raise models.UserError(f"--init {args.init} is a folder; give the weights file in it (e.g. best.pt)")
    elif not os.path.exists(args.init):
        raise FileNotFoundError(f"--init {args.init}: no such file")
    else:
        norm = models.load_weights(model, args.init, keep_head=False, input_norm=args.input_norm)
    return models.new_head(model, RECIPES[args.recipe]["zero_head"]), norm


# ----------------------------------------------------------------------------------------
# Fine-tuning, prediction and the linear probe

def check_step(loss, stop, env):
    """Raise NonFiniteLoss or Stopped after a step, alike on every rank (under DDP the loss and
    the stop request are all-reduced, so that no rank waits alone in a collective)."""
    flags = torch.stack([loss.detach().float(), torch.tensor(float(bool(stop)), device=loss.device)])
    if env.world_size > 1:
        dist.all_reduce(flags)
    loss_sum, stopping = flags.tolist()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(f"non-finite loss ({loss_sum})")
    if stopping:  # a rank that saw no signal itself stops as if terminated
        raise models.Stopped(stop.signum or signal.SIGTERM)


def finetune(model, train, cfg, args, env, seed, stop, oversample=False):
    """Fine-tune `model` (on env.device; DDP-wrapped under torchrun) on `train` with the settings
    `cfg`. Returns the steps taken; raises NonFiniteLoss or Stopped (checked after every step)."""
    schedule, batch = cfg["schedule"], cfg["batch_size"]
    steps = schedule[-1]
    plan = batch_indices(len(train), batch, steps, seed, oversampling_weights(train.targets) if oversample else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=cfg["nesterov"], weight_decay=0.0)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.dtype == "fp16")
    agc_params = models.agc_parameters(model, len(train.labels))
    aug = torch.Generator(device=env.device).manual_seed(seed * 1000 + env.rank)  # augmentation: per rank
    mix = np.random.default_rng(seed)  # batch choice and MixUp factor: shared by the ranks
    t0 = last_log = time.time()
    with models.progress(steps) as bar, stop.at_once(False):  # ranks stop after the same step
        for step in range(steps):
            # -- set the lr; this rank's share of the step's batch in micro-batches, augmented, mixed
            lr = lr_at(step, schedule, cfg["lr"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            lam = mix.beta(cfg["mixup"], cfg["mixup"]) if cfg["mixup"] > 0 else 1.0
            micro = []
            for part in np.array_split(plan[step][env.rank::env.world_size], args.batch_split):
                images, y, scale = train.__getitems__(part)
                x = models.to_model_input(images.to(env.device, non_blocking=True), cfg["resize"], norm=args.input_norm,
                                          scale=scale, chest=args.pipeline == "chest")
                x = models.random_affine(x, cfg["crop"], crop=cfg["crop"] / cfg["resize"], generator=aug,
                                         aspect=torch.from_numpy(train.aspect[train.rows[part]]), **cfg["augment"])
                y = y.to(env.device)
                if lam < 1.0:
                    perm = torch.randperm(len(x), generator=aug, device=env.device)
                    x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
                micro.append((x, y))
            # -- forward, loss and backward per micro-batch, AGC, optimizer step; then check and log
            loss = models.train_step(model, optimizer, scaler, micro, train.multilabel, args.dtype, agc_params, cfg["agc"])
            check_step(loss, stop, env)
            bar.update()
            if (step + 1) % args.log_every == 0 or step + 1 == steps or time.time() - last_log > LOG_SECONDS:
                last_log = time.time()
                models.print0(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {lr:.2e} "
                              f"img/s {(step + 1) * batch / (last_log - t0):.1f}")
    return steps


def predict(model, dataset, cfg, args, env, features=False):
    """(logits, or pre-logit features; targets) of every row of `dataset` in order, on every rank,
    the whole stored image resized to the training crop's size (of a squashed target, the
    authors' Resize((crop, crop))), in batches of twice the training micro-batch."""
    batch = max(1, 2 * cfg["batch_size"] // env.world_size // args.batch_split)

    def to_input(x, scale):
        return models.to_model_input(x, cfg["crop"], norm=args.input_norm, scale=scale, chest=args.pipeline == "chest")
    return models.predict_dataset(model, dataset, to_input, batch, env, args.dtype, features=features)


def fit_logistic(features, targets, multilabel, c=1.0, max_iter=500):
    """L2-regularised logistic regression fitted with L-BFGS: multinomial (softmax) for
    single-label targets, one-vs-rest sigmoids for multi-label ones (unknown targets masked).
    Objective as scikit-learn's LogisticRegression(C=c): sum of losses + ||W||^2 / (2c), the bias
    not penalised. Returns (W (D, L), b (L,)) as float tensors."""
    x, y = torch.as_tensor(features, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.float64)
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    known, y = ~torch.isnan(y), torch.nan_to_num(y)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        models.stop_point()
        opt.zero_grad()
        logits = x @ w + b
        if multilabel:
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * known).sum()
        else:
            loss = -(y * torch.log_softmax(logits, 1)).sum()
        loss = (loss + (w * w).sum() / (2 * c)) / len(x)  # / n: tolerances mean the same at every k
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def fit_cell(args, env, base, train, evalset, idx, key, stop, features):
    """(evaluation logits, targets, steps) of one cell: a fine-tune of a copy of `base` on the rows
    `idx` of `train`, or a linear probe on features extracted once per grid (kept in `features`)."""
    cfg = settings(args, len(idx), orig_hw(train))
    if args.linear_probe:
        if not features:
            t0, model = time.time(), base.to(env.device)
            features["train"] = predict(model, train, cfg, args, env, features=True)[0]
            features["eval"] = predict(model, evalset, cfg, args, env, features=True)
            models.print0(f"features {len(train)} train + {len(evalset)} eval at {cfg['crop']}px, dim "
                          f"{features['train'].shape[1]}, {time.time() - t0:.1f}s")
        w, b = fit_logistic(features["train"][idx], train.targets[idx], train.multilabel, args.probe_c, args.probe_iters)
        eval_x, eval_y = features["eval"]
        return (torch.as_tensor(eval_x) @ w + b).numpy(), eval_y, args.probe_iters
    models.print0(f"run {describe(key)} num_train={len(idx)} settings={json.dumps(cfg)}")
    torch.manual_seed(key["seed"])  # each seed its own new head, as each of the paper's runs
    model = models.new_head(copy.deepcopy(base), RECIPES[args.recipe]["zero_head"])
    model = models.wrap_ddp(model.to(env.device), env)
    steps = finetune(model, view(train, idx), cfg, args, env, key["seed"], stop, args.oversample and key["shots"] == 0)
    logits, targets = predict(model, evalset, cfg, args, env)
    if args.save:
        os.makedirs(run_dir(args, key), exist_ok=True)
        models.save_checkpoint(os.path.join(run_dir(args, key), "model.pt"), model, steps, args,
                               input_norm=args.input_norm)
    return logits, targets, steps


# ----------------------------------------------------------------------------------------
# Results: results.csv (one row per finished cell) and failures.csv beside it

def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_path(args):
    return args.results or os.path.join(args.out, "results.csv")


def failures_path(args):
    return os.path.join(os.path.dirname(os.path.abspath(results_path(args))), "failures.csv")


def read_table(path):
    """A results or failures CSV as text, exactly as written (a source named NA or 007 stays so);
    an empty frame when there is none. One that cannot be read is a one-line error, left as it is."""
    if not os.path.exists(path):
        return pd.DataFrame()
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise models.UserError(f"{path}: not a readable results file ({str(e).splitlines()[0]}); move it "
                               "away or choose another --results") from None


def identity(args):
    """{"weights": short sha256 of the --init file or "scratch", "settings": short sha256 of the
    arguments that change a cell's result}: what produced a row."""
    digest = "scratch"
    if args.init != "scratch":
        h = hashlib.sha256()
        with open(args.init, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()[:16]
    settings = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}, default=str)
    return {"weights": digest, "settings": hashlib.sha256(settings.encode()).hexdigest()[:16]}


def matching(df, key):
    """Rows of a text table whose columns equal `key` (as text; a column the table lacks is empty)."""
    if df.empty:
        return np.zeros(0, bool)
    return (df.reindex(columns=list(key), fill_value="").to_numpy() == np.array([str(v) for v in key.values()])).all(1)


def _typed(text):
    """A CSV text cell as int or float where it is one (the figures of a row read back)."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def find_result(path, key):
    """The stored row of the finished cell `key`, or None; key cells as text, figures as numbers."""
    df = read_table(path)
    if not matching(df, key).any():
        return None
    text = KEY_COLUMNS + IDENTITY_COLUMNS
    return {c: v if c in text else _typed(v) for c, v in df[matching(df, key)].iloc[0].items()}


def append_row(path, row, columns, key=None):
    """Append `row` to the CSV at `path` under an exclusive lock on PATH.lock (grids sharing one
    results file never lose each other's rows): re-read, written whole. With `key`, a row of that
    key and the same identity there already means another run recorded the cell first: nothing
    is added (returns False); a row of that key from other weights or settings is replaced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        df = read_table(path)
        if key is not None and not df.empty:
            same = matching(df, key)
            if (same & matching(df, {c: row.get(c, "") for c in IDENTITY_COLUMNS})).any():
                return False
            df = df[~same]
        new = pd.DataFrame([{c: "" if v is None else v for c, v in row.items()}]).astype(str)
        df = pd.concat([df, new], ignore_index=True) if not df.empty else new
        df = df[[c for c in columns if c in df] + [c for c in df.columns if c not in columns]].fillna("")
        with models.atomic_write(path) as f:
            df.to_csv(f, index=False)
        return True


def run_dir(args, key):
    """Folder of one cell's files (one per pre-training seed too), its names made safe
    (models.safe_name: the source, by default a path, is one folder name)."""
    folder = models.safe_name(f"{key['method']}-{key['source']}-{key['model']}")
    source_seed = "" if key["source_seed"] == "" else f"-source_seed{key['source_seed']}"
    return os.path.join(args.out, models.safe_name(key["target"]), folder,
                        f"shots{key['shots']}-seed{key['seed']}{source_seed}")


def describe(key):
    return " ".join(f"{k}={'full' if k == 'shots' and v == 0 else v}" for k, v in key.items())


def duration(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_cell(args, env, key, made_by, evalset, num_train, fit):
    """Skip the cell when the results CSV has `key` made by the same weights and settings
    (`made_by`, see identity()); else fit() -> (evaluation logits, targets, steps), score, log and
    record: one results row (replacing one of other weights or settings), per_class.csv and
    args.json in the cell's folder. A failure is logged and recorded in failures.csv and gives
    None, so that a grid goes on; Stopped and KeyboardInterrupt pass. Returns the row ({} on
    ranks > 0)."""
    done = find_result(results_path(args), key)
    if done is not None and all(done.get(c) == v for c, v in made_by.items()):
        models.print0(f"skip {describe(key)}: already in {results_path(args)}")
        return done
    if done is not None:
        models.print0(f"{describe(key)}: the row in {results_path(args)} came from other weights or settings; "
                      "running the cell again to replace it")
    t0 = time.time()
    try:
        logits, targets, steps = fit()
    except Exception as e:  # noqa: BLE001 - one cell's failure must not end the grid
        if models.out_of_memory(e):  # a setting every cell shares (run_cli: one line naming it)
            raise
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")
        models.print0(f"failed {describe(key)}: {reason}")
        if env.is_master:
            append_row(failures_path(args), {**key, "reason": reason, "num_train": num_train,
                                             "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                       FAILURE_COLUMNS)
        return None
    if not env.is_master:
        return {}
    metrics = models.headline_metrics(logits, targets, evalset.multilabel)
    headline = headline_name(evalset.multilabel, args.pipeline)
    ci = bootstrap_ci(logits, targets, evalset.multilabel, args.bootstrap, key["seed"], metric=headline)
    models.save_args(run_dir(args, key), args)
    with models.atomic_write(os.path.join(run_dir(args, key), "per_class.csv")) as f:
        per_class_metrics(logits, targets, evalset.multilabel, evalset.labels).to_csv(f, index=False)
    # each test image's outcome, for the summary's paired resampling of test images
    outcomes = os.path.join(run_dir(args, key), "outcomes.npy")
    with models.atomic_write(outcomes, "wb") as f:
        np.save(f, image_outcomes(logits, targets, evalset.multilabel, headline))
    row = {**key, **made_by, "source_size": args.source_size, "task": "multilabel" if evalset.multilabel else "multiclass",
           "headline": headline, "accuracy": metrics.get("accuracy", math.nan), "auc": metrics["auc"],
           "map": metrics["map"], "ci_low": ci[0], "ci_high": ci[1], "num_train": num_train,
           "outcomes": os.path.relpath(outcomes, os.path.dirname(os.path.abspath(results_path(args)))),
           "num_eval": len(evalset), "steps": steps, "input_norm": args.input_norm, "pipeline": args.pipeline,
           "wall_s": round(time.time() - t0, 2), "commit": git_commit(), "args": json.dumps(vars(args), sort_keys=True)}
    if not append_row(results_path(args), row, RESULT_COLUMNS, key):
        models.print0(f"{describe(key)}: another run recorded it first; this row is not added")
    models.print0(f"eval {describe(key)} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                  + f" ci95=[{ci[0]:.4f},{ci[1]:.4f}]")  # last: a stop after it keeps the row
    return row


# ----------------------------------------------------------------------------------------
# Command line, and the start-up every transfer shares (one cell here, a grid in fewshot.py)

def add_arguments(parser):
    """The flags of transfer.py that fewshot.py shares (all but --shots and --seed)."""
    add, num = parser.add_argument, models.number
    add("--data", help="prepared target dataset folder (prepare_data.py output)")
    add("--init", default="scratch", help="'scratch' or weights to start from: a pretrain.py checkpoint, an "
        "official BiT .npz, the paper's .pth.tar or timm weights (models.load_weights)")
    add("--model", default="R50x1", choices=models.MODEL_NAMES, help="network")
    add("--source", default=None, help="name of the pre-training source in the results (default: 'scratch', or "
        "the --init path relative to the working directory, so two weight files never share a name)")
    add("--source-seed", type=models.SEED, default=None, help="the pre-training seed of the --init weights, "
        "recorded so that the summary counts pre-training seeds as a source of variation (run_all.sh sets it)")
    add("--source-size", type=num("[0, 1e12]", int), default=None,
        help="number of pre-training images (0: none, from scratch), recorded for the size plot")
    add("--target", default=None, help="name of the target in the results (default: meta.json name or folder name)")
    add("--out", default="runs/transfer", help="output folder, one run or grid at a time (for grids at the "
        "same time: one --out each and a shared --results)")
    add("--results", default=None, help="results CSV (default: OUT/results.csv); failures.csv is written beside it")
    add("--recipe", default="paper", choices=sorted(RECIPES), help="paper: SGD Nesterov + AGC, lr 0.001, batch "
        "128, default-initialised head; bit: plain momentum, no clipping, lr 0.003, batch 512, zero head")
    add("--pipeline", default="auto", choices=["auto", "bit", "chest"], help="bit: HyperRule resolution, crop, "
        "flip; chest: 224 px and the chest augmentation (the paper's PadChest target); auto: the target's meta.json")
    add("--input-norm", default=None, choices=sorted(models.INPUT_NORMS),
        help="input normalisation (default: what the weights record or imply; bit = [-1, 1] for scratch)")
    add("--multilabel-mode", default="multi", choices=["single", "multi"], help="multi-label targets: single = "
        "images with exactly one positive, trained single-label (results under TARGET_single); multi = >= k "
        "positives per label, trained multi-label")
    add("--batch-size", type=models.COUNT, default=None, help="global batch size (default: the recipe's)")
    add("--batch-split", type=models.COUNT, default=1,
        help="micro-batches per step (gradient accumulation) so a big model fits")
    add("--lr", type=num("(0, inf)"), default=None, help="learning rate (default: the recipe's)")
    add("--steps", type=models.COUNT, default=None, help="total steps; warm-up and decays keep their "
        "fractions (default: HyperRule)")
    add("--min-epochs", type=num("[0, 1e6]"), default=None, help="at least this many passes over the training "
        "subset: more steps than the schedule's where needed, same fractions (default: none)")
    add("--resize", type=models.SIDE, default=None,
        help="train resize side (default: HyperRule; chest pipeline: the crop)")
    add("--crop", type=models.SIDE, default=None, help="random crop side for training, eval resize side "
        "(default: HyperRule; chest pipeline: 224)")
    add("--mixup", type=num("[0, 100]"), default=None, help="MixUp alpha, 0 = off (default: HyperRule)")
    add("--oversample", action="store_true", help="sample classes equally often in full-shot runs (the paper's "
        "choice for COVIDx and Flowers; k-shot subsets are balanced already)")
    add("--linear-probe", action="store_true", help="logistic regression on frozen features instead of fine-tuning")
    add("--probe-c", type=num("(0, inf)"), default=1.0,
        help="inverse L2 strength of the linear probe (scikit-learn's C)")
    add("--probe-iters", type=models.COUNT, default=500, help="L-BFGS iterations of the linear probe")
    add("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
        help="autocast precision (default: bf16 on CUDA, fp32 on a CPU)")
    add("--device", default=None, help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    add("--bootstrap", type=num("[0, 1e6]", int), default=1000,
        help="bootstrap resamples for the 95%% interval of the headline metric")
    add("--log-every", type=models.COUNT, default=50,
        help="steps between log lines (and one at least every minute)")
    add("--save", action="store_true", help="also save the fine-tuned weights (model.pt in the cell's folder)")
    return parser


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


def get_args_parser():
    parser = add_arguments(models.ArgumentParser(description=__doc__.split("\n\n")[0], memory_hint=MEMORY_HINT))
    parser.add_argument("--shots", type=parse_shots, default=0,
                        help="examples per class (a class with fewer keeps all it has); 0 or 'full': all")
    parser.add_argument("--seed", type=models.SEED, default=0,
                        help="seed of the subset, the new head, batch order, augmentation and MixUp")
    return parser


def finish_args(args):
    """Check the flags and fill in the derived defaults (source, target, pipeline, dtype)."""
    if not args.data:
        raise models.UserError("--data is required")
    meta = read_meta(args.data)
    check_device(args.device)
    args.source = args.source or default_source(args.init)
    args.target = args.target or meta.get("name") or os.path.basename(os.path.normpath(args.data))
    models.check_out(args.out, {"--data": args.data, "--init": None if args.init == "scratch" else args.init},
                     {"--results": results_path(args), "failures.csv": failures_path(args),
                      "the target's folder": os.path.join(args.out, models.safe_name(args.target))}, owned=False)
    if args.results:
        models.check_path(args.results, "--results", folder=False)
    args.pipeline = meta.get("pipeline", "bit") if args.pipeline == "auto" else args.pipeline
    if args.pipeline not in ("bit", "chest"):
        raise models.UserError(f"{args.data}/meta.json: unknown pipeline {args.pipeline!r} (bit or chest)")
    args.dtype = args.dtype or models.default_dtype(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def default_source(init):
    """'scratch', or the weights' path relative to the working directory (absolute when it lies
    outside): unique per file, unlike its folder name."""
    if init == "scratch":
        return "scratch"
    rel = os.path.relpath(os.path.abspath(init))
    return os.path.abspath(init) if rel.startswith("..") else rel


def check_device(device):
    """A usable --device, else a one-line error."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise models.UserError(f"--device {device!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise models.UserError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise models.UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")


def run(args, cells):
    """Every (shots, seed) of `cells` in turn on one target, model and source, sharing the
    start-up: target, weights, settings, folder lock, stop signals. Failed cells are listed at the
    end and the process ends with status 1; a stop signal ends it with 128 + its number. Returns
    the rows of the finished cells."""
    finish_args(args)
    with models.distributed(args.device) as env, \
            models.folder_lock(args.out) if env.is_master else contextlib.nullcontext(), \
            models.StopSignals(at_once=True) as stop:
        train, evalset = load_target(args)
        torch.manual_seed(cells[0][1])  # the random init of --init scratch, shared by a grid
        base, args.input_norm = init_model(args, len(train.labels))
        cfg = settings(args, len(train), orig_hw(train))
        if not args.linear_probe:
            if cfg["batch_size"] % (env.world_size * args.batch_split):
                raise models.UserError(f"--batch-size {cfg['batch_size']} is not divisible by world size x "
                                       f"--batch-split ({env.world_size} x {args.batch_split})")
            if long_cpu_run_note(env.device, cfg):
                models.print0(long_cpu_run_note(env.device, cfg))
        for k in dict.fromkeys(shots for shots, _ in cells):
            short = short_classes(train.targets, k, train.labels)
            if short:
                models.print0(f"{k} shots: {len(short)} of {len(train.labels)} classes have fewer training images and "
                              "keep all they have: " + ", ".join(f"{name!r} {n}" for name, n in short[:5])
                              + (f" and {len(short) - 5} more" if len(short) > 5 else ""))
        rows, failed, features, made_by, t_grid = [], [], {}, identity(args), time.time()
        keys = [{"method": "linear" if args.linear_probe else "finetune", "source": args.source,
                 "source_seed": "" if args.source_seed is None else args.source_seed, "model": args.model,
                 "target": args.target, "shots": shots, "seed": seed} for shots, seed in cells]
        select = select_shots_multilabel if train.multilabel else \
            select_shots_loader if train.meta.get("shot_rule") == "loader" else select_shots
        try:
            models.save_args(args.out, args)
            for i, key in enumerate(keys):
                if len(cells) > 1:  # the time left from the cells so far (skipped ones included)
                    left = f", about {duration((time.time() - t_grid) / i * (len(cells) - i))} left" if i else ""
                    models.print0(f"cell {i + 1} of {len(cells)}{left}")
                idx = select(train.targets, key["shots"], key["seed"])
                row = run_cell(args, env, key, made_by, evalset, len(idx),
                               lambda: fit_cell(args, env, base, train, evalset, idx, key, stop, features))
                if row is None:
                    failed.append(key)
                else:
                    rows.append(row)
        except models.Stopped as e:  # counted from the file: a cell may be recorded just before the signal
            finished = sum(all((find_result(results_path(args), k) or {}).get(c) == v for c, v in made_by.items())
                           for k in keys)
            kept = f"{finished} of {len(cells)} cells finished (in {results_path(args)})" if finished else \
                f"none of {len(cells)} cells finished"
            models.print0(f"stopped by {signal.Signals(e.signum).name}: {kept}; the same command continues"
                          + (" (finished cells are skipped)" if finished else ""))
            raise SystemExit(128 + int(e.signum))
        if failed:
            models.print0(f"{len(failed)} of {len(cells)} cells failed (reasons in {failures_path(args)}): "
                          + "; ".join(describe(key) for key in failed))
            raise SystemExit(1)
        return rows


def main(args):
    rows = run(args, [(args.shots, args.seed)])
    return rows[0] if rows else None


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
