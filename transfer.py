"""Fine-tune a pre-trained BiT ResNet-v2 on a prepared target dataset with the BiT-HyperRule,
evaluate it on the test split (valid when there is none) and append one row to a results CSV.

One GPU or CPU (the main use):
    python transfer.py --data prepared/tuberculosis --init runs/pretrain_all/model.pt \
        --source chexpert_mimic_nih_padchest --model R50x1 --out runs/transfer
Several GPUs (DDP: the global batch is split over the ranks, evaluation is exact):
    torchrun --standalone --nproc_per_node=4 transfer.py --data prepared/covidx \
        --init BiT-M-R50x1.npz --source imagenet21k --model R50x1 --oversample --out runs/transfer
Quick CPU run:
    python transfer.py --data runs/demo/prepared/tuberculosis --init scratch --model R14x1 --steps 40 \
        --lr 0.01 --resize 56 --crop 48 --batch-size 16 --out runs/demo

Recipes (--recipe):
  paper  (default) Cherti & Jitsev's fine-tuning (finetune.py, optim/sgd_agc.py, models/builder.py):
         SGD momentum 0.9 Nesterov with Adaptive Gradient Clipping (0.01, eps 1e-3; the
         classifier weight excluded, as their SGD_AGC skips the tensor with one row per class),
         lr 0.001, batch 128, weight decay 0, a new head with PyTorch's default Conv2d init.
  bit    BiT's (bit_pytorch/train.py): SGD momentum 0.9 (plain), no clipping, lr 0.003,
         batch 512, weight decay 0, a zero-initialised head.
The learning rate is used as given whatever the batch size: neither code rescales it.

BiT-HyperRule (Kolesnikov et al. 2020, bit_hyperrule.py of google-research/big_transfer), from
the number of training images N and the original image size (meta.json "orig_size"):
  steps      [warm-up, decay, decay, decay, total] = [100, 200, 300, 400, 500] for N < 20k,
             [500, 3000, 6000, 9000, 10000] for N < 500k, [500, 6000, 12000, 18000, 20000] else;
             linear warm-up from 0, then x0.1 from each decay step on (models.step_lr: the
             decay takes effect AT the boundary step; BiT's code decays one step later, a
             negligible shift)
  MixUp      alpha 0.1 from N = 20k on, none below
  resolution resize 160, random crop 128 when h*w < 96*96, else resize 512, crop 480
Input pipeline (--pipeline, default: the prepared target's meta.json "pipeline", else bit):
  bit    the HyperRule resolution above, random crop and horizontal flip
  chest  the paper's PadChest target: 224 px (the prepared square image resized), the chest
         augmentation of pre-training (cohen_aug: shift 0.25, scale 0.1, rotate 45, flip);
         the schedule stays the HyperRule's; headline metric mean ROC AUC.
Inputs are normalised as the weights expect (--input-norm; default what the weights record or
imply, "bit" = [-1, 1] for scratch).

A fine-tune whose loss becomes non-finite stops and is recorded as a failure in failures.csv
beside the results CSV (never as a metric row). Exit status: 0 done (or already recorded),
1 the run failed, 2 bad input, 128 + signal number when stopped by Ctrl-C (130) or SIGTERM (143).
"""
import contextlib
import copy
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

import models
from prepare_data import PreparedDataset, read_meta

RECIPES = {"paper": {"batch_size": 128, "lr": 0.001, "nesterov": True, "agc": True, "zero_head": False},
           "bit": {"batch_size": 512, "lr": 0.003, "nesterov": False, "agc": False, "zero_head": True}}
AGC_CLIPPING, AGC_EPS = 0.01, 1e-3  # the paper's SGD_AGC defaults
CHEST_SIZE = 224  # the paper's PadChest target: models.CHEST_AUGMENT at 224 px
LONG_CPU_PIXELS = 1e8  # training pixels (crop^2 x batch x steps) above which a CPU run takes long
LOG_SECONDS = 60       # a log line at least this often, whatever --log-every says
KEY_COLUMNS = ["method", "source", "model", "target", "shots", "seed"]
RESULT_COLUMNS = KEY_COLUMNS + ["source_size", "task", "headline", "accuracy", "auc", "map",
                                "ci_low", "ci_high", "num_train", "num_eval", "steps", "input_norm",
                                "pipeline", "wall_s", "commit", "args"]
FAILURE_COLUMNS = KEY_COLUMNS + ["reason", "num_train", "commit", "time"]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: this fine-tune stops and counts as failed."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM: stop after the current step; finished rows are kept."""

    def __init__(self, signum):
        super().__init__(f"signal {signum}")
        self.signum = signum


# ----------------------------------------------------------------------------------------
# BiT-HyperRule (pure functions)

def hyperrule(num_train, orig_hw):
    """BiT-HyperRule settings for a training set of `num_train` images whose original size is
    orig_hw = (h, w): schedule (warm-up, three decays, total steps), MixUp alpha, resize, crop."""
    if num_train < 20_000:
        schedule = [100, 200, 300, 400, 500]
    elif num_train < 500_000:
        schedule = [500, 3000, 6000, 9000, 10_000]
    else:
        schedule = [500, 6000, 12_000, 18_000, 20_000]
    resize, crop = (160, 128) if orig_hw[0] * orig_hw[1] < 96 * 96 else (512, 480)
    return {"schedule": schedule, "mixup": 0.0 if num_train < 20_000 else 0.1,
            "resize": resize, "crop": crop}


def scale_schedule(schedule, steps):
    """The schedule stretched to `steps` total steps (for --steps): same fractions for the
    warm-up and the decays."""
    return [max(1, round(s * steps / schedule[-1])) for s in schedule[:-1]] + [steps]


def lr_at(step, schedule, base_lr):
    """The learning rate at `step` (0-based) of a HyperRule schedule [warm-up, decays..., total]."""
    return models.step_lr(step, base_lr, schedule[0], schedule[1:-1])


def oversampling_weights(targets):
    """Per-example sampling weights that make every class equally likely (the paper's
    oversampling for COVIDx and Flowers): 1 / size of the example's class. Multi-label rows use
    their rarest positive label; rows without a positive count as their own class."""
    pos = np.nan_to_num(targets) > 0.5
    counts = pos.sum(0)
    none = ~pos.any(1)
    rarest = np.where(pos, counts[None, :], np.inf).min(1)
    rarest[none] = none.sum()
    return 1.0 / rarest


def long_cpu_run_note(device, cfg):
    """One line warning that these settings train for long on a CPU (and how to shorten it),
    or None."""
    steps, batch, crop = cfg["schedule"][-1], cfg["batch_size"], cfg["crop"]
    if torch.device(device).type != "cpu" or crop * crop * batch * steps <= LONG_CPU_PIXELS:
        return None
    return (f"note: {steps} steps of batch {batch} at {crop} px on a CPU take hours for a BiT model; "
            "shorten with --steps, --resize/--crop, --batch-size")


# ----------------------------------------------------------------------------------------
# Metrics of the final evaluation

def per_class_metrics(logits, targets, multilabel, names):
    """One row per label: support (positives), precision, recall, F1 (0 when undefined, as
    scikit-learn's zero_division=0), ROC AUC and average precision. Single-label predictions are
    the argmax, multi-label ones sigmoid > 0.5; unknown (NaN) targets are skipped."""
    scores = models.scores_from_logits(logits, multilabel)
    targets = np.asarray(targets, np.float64)
    if multilabel:
        pred = scores > 0.5
    else:
        pred = np.eye(scores.shape[1], dtype=bool)[scores.argmax(1)]
    rows = []
    for j, name in enumerate(names):
        known = ~np.isnan(targets[:, j])
        y, p = targets[known, j] > 0.5, pred[known, j]
        tp, fp, fn = (y & p).sum(), (~y & p).sum(), (y & ~p).sum()
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        rows.append({"label": name, "support": int(y.sum()), "precision": precision,
                     "recall": recall, "f1": f1, "auc": models.roc_auc(scores[known, j], y),
                     "ap": models.average_precision(scores[known, j], y)})
    return pd.DataFrame(rows)


def headline_name(multilabel, pipeline="bit"):
    """The figure a run is judged by: mean ROC AUC for multi-label targets and for the chest
    pipeline (the paper's PadChest figures, also single-label few-shot), else accuracy."""
    return "auc" if multilabel or pipeline == "chest" else "accuracy"


def bootstrap_ci(logits, targets, multilabel, samples=1000, seed=0, level=0.95, metric="auto"):
    """Percentile bootstrap interval of the headline metric ("accuracy" or "auc"; auto: by the
    task): rows resampled with replacement (seeded); resamples where the metric is undefined
    (e.g. one class only) are dropped."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets, np.float64)
    n = len(targets)
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
    values = np.array([value(rng.integers(0, n, n)) for _ in range(samples)], np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def score_predictions(logits, targets, multilabel, names, args, seed):
    """Headline metrics, bootstrap interval of the headline and per-class table of one set of
    test predictions."""
    metrics = models.headline_metrics(logits, targets, multilabel)
    low, high = bootstrap_ci(logits, targets, multilabel, samples=args.bootstrap, seed=seed,
                             metric=headline_name(multilabel, args.pipeline))
    return metrics, (low, high), per_class_metrics(logits, targets, multilabel, names)


# ----------------------------------------------------------------------------------------
# Data, model, training, prediction

def view(dataset, idx=None, targets=None, multilabel=None):
    """A PreparedDataset restricted to positions `idx`, optionally with other targets (e.g.
    single-label ones) and task; the images stay memory-mapped."""
    out = copy.copy(dataset)
    if idx is not None:
        out.rows = dataset.rows[idx]
        out.targets = dataset.targets[idx]
    if targets is not None:
        out.targets = np.asarray(targets, np.float32)
    if multilabel is not None:
        out.multilabel = multilabel
    return out


def load_target(folder):
    """(train split, evaluation split, name of the evaluation split) of a prepared dataset."""
    train = PreparedDataset(folder, "train")
    if len(train) == 0:
        raise models.UserError(f"{folder} has no rows with split 'train'")
    for split in ("test", "valid"):
        evalset = PreparedDataset(folder, split)
        if len(evalset):
            return train, evalset, split
    raise models.UserError(f"{folder} has neither a 'test' nor a 'valid' split to evaluate on")


def new_head(model, zero):
    """A fresh classifier of the model's number of classes: zero-initialised (BiT) or with
    PyTorch's default Conv2d init (the paper's models/builder.py)."""
    conv = model.head.conv
    if zero:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    else:
        conv.reset_parameters()
    return model


def init_model(args, num_classes):
    """(network of --model with --init weights or random ones and the recipe's new head, the
    input normalisation those weights expect)."""
    model = models.create_model(args.model, num_classes)
    if args.init == "scratch":
        norm = args.input_norm or "bit"
    elif os.path.isdir(args.init):
        raise models.UserError(f"--init {args.init} is a folder; give the weights file in it (e.g. model.pt)")
    elif not os.path.exists(args.init):
        raise FileNotFoundError(f"--init {args.init}: no such file")
    else:
        norm = models.load_weights(model, args.init, keep_head=False, input_norm=args.input_norm)
    return new_head(model, RECIPES[args.recipe]["zero_head"]), norm


def settings(args, num_train, orig_hw):
    """HyperRule values with the recipe, the pipeline and the command-line overrides applied."""
    rule = hyperrule(num_train, orig_hw)
    recipe = RECIPES[args.recipe]
    schedule = rule["schedule"] if args.steps is None else scale_schedule(rule["schedule"], args.steps)
    if args.pipeline == "chest":  # one size; --resize > --crop gives BiT-style random crops
        crop = args.crop or CHEST_SIZE
        resize, augment = args.resize or crop, models.CHEST_AUGMENT
    else:
        crop, resize, augment = args.crop or rule["crop"], args.resize or rule["resize"], {}
    out = {"schedule": schedule, "mixup": rule["mixup"] if args.mixup is None else args.mixup,
           "resize": resize, "crop": crop, "augment": augment,
           "batch_size": args.batch_size or recipe["batch_size"],
           "lr": recipe["lr"] if args.lr is None else args.lr,
           "nesterov": recipe["nesterov"], "agc": recipe["agc"]}
    if args.min_epochs:  # a larger subset gets more steps, so that it is seen this many times
        steps = math.ceil(args.min_epochs * num_train / out["batch_size"])
        if steps > schedule[-1]:
            out["schedule"] = scale_schedule(schedule, steps)
    if out["crop"] > out["resize"]:
        raise models.UserError(f"--crop {out['crop']} is larger than --resize {out['resize']}")
    return out


def check_batch(cfg, args, env):
    if cfg["batch_size"] % (env.world_size * args.batch_split):
        raise models.UserError(f"--batch-size {cfg['batch_size']} is not divisible by world size x "
                               f"--batch-split ({env.world_size} x {args.batch_split})")


def batch_indices(num_train, batch_size, steps, seed, weights=None):
    """The training example positions of every step, (steps, batch): reshuffled passes over the
    data (or weighted draws with replacement when oversampling). Same on every rank."""
    g = torch.Generator().manual_seed(seed)
    total = steps * batch_size
    if weights is not None:
        idx = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), total, True, generator=g)
    else:
        passes = math.ceil(total / num_train)
        idx = torch.cat([torch.randperm(num_train, generator=g) for _ in range(passes)])[:total]
    return idx.view(steps, batch_size).numpy()


def agc_clipper(model):
    """The paper's AGC as a train_step clip callable: every parameter but the classifier weight
    (their SGD_AGC skips the tensor with one row per class; the head's bias is clipped)."""
    bare = models.unwrap(model)
    params = [p for name, p in bare.named_parameters() if name != "head.conv.weight"]
    return lambda: models.adaptive_clip_grad(params, AGC_CLIPPING, AGC_EPS)


def make_optimizer(model, cfg):
    """(SGD with momentum 0.9, no weight decay, Nesterov per the recipe; the recipe's gradient
    clipping as a train_step clip callable, or None)."""
    optimizer = torch.optim.SGD(models.unwrap(model).parameters(), lr=0.0, momentum=0.9,
                                nesterov=cfg["nesterov"], weight_decay=0.0)
    return optimizer, agc_clipper(model) if cfg["agc"] else None


def check_step(loss, stop, env):
    """Raise NonFiniteLoss or Stopped after a step, the same on every rank (under DDP the loss
    and the stop request are all-reduced, so no rank waits alone in a collective)."""
    flags = torch.stack([loss.detach().float(), torch.tensor(float(bool(stop)), device=loss.device)])
    if env.world_size > 1:
        dist.all_reduce(flags)
    loss_sum, stopping = flags.tolist()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(f"non-finite loss ({loss_sum})")
    if stopping:  # a rank that saw no signal itself stops as if terminated
        raise Stopped(stop.signum or signal.SIGTERM)


def finetune(model, train, cfg, args, env, seed, stop, oversample=False):
    """Fine-tune `model` (already on env.device, DDP-wrapped under torchrun) on `train` with the
    settings `cfg`. Returns the number of optimiser steps taken; raises NonFiniteLoss or
    Stopped (checked after every step)."""
    schedule, batch = cfg["schedule"], cfg["batch_size"]
    weights = oversampling_weights(train.targets) if oversample else None
    steps = schedule[-1]
    plan = batch_indices(len(train), batch, steps, seed, weights)
    optimizer, clip = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(env.device.type) if args.dtype == "fp16" else None
    # Augmentation differs per rank; batch choice and MixUp factor are shared.
    aug = torch.Generator(device=env.device).manual_seed(seed * 1000 + env.rank)
    mix = np.random.default_rng(seed)
    t0 = last_log = time.time()
    with tqdm(total=steps, disable=not (env.is_master and sys.stderr.isatty())) as bar:
        for step in range(steps):
            lr = lr_at(step, schedule, cfg["lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            lam = mix.beta(cfg["mixup"], cfg["mixup"]) if cfg["mixup"] > 0 else 1.0
            mine = plan[step][env.rank::env.world_size]
            micro_batches = []
            for part in np.array_split(mine, args.batch_split):
                images, targets = train.__getitems__(part)
                x = models.to_model_input(images.to(env.device, non_blocking=True), out_size=cfg["resize"],
                                          norm=args.input_norm)
                x = models.random_affine(x, out_size=cfg["crop"], crop=cfg["crop"] / cfg["resize"],
                                         generator=aug, **cfg["augment"])
                y = targets.to(env.device)
                if lam < 1.0:
                    perm = torch.randperm(len(x), generator=aug, device=env.device)
                    x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
                micro_batches.append((x, y))
            loss = models.train_step(model, optimizer, micro_batches, multilabel=train.multilabel,
                                     device=env.device, dtype=args.dtype, scaler=scaler, clip=clip)
            check_step(loss, stop, env)
            bar.update()
            now = time.time()
            if (step + 1) % args.log_every == 0 or step + 1 == steps or now - last_log > LOG_SECONDS:
                last_log = now
                models.print0(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {lr:.2e} "
                              f"img/s {(step + 1) * batch / (now - t0):.1f}")
    return steps


def _predict_rows(model, dataset, size, env, batch_size, args, features):
    """Outputs and targets of every row of `dataset`, in order, on every rank: each rank
    predicts rows r, r + W, ... and the parts are gathered. A line at least every minute."""
    mine = np.arange(env.rank, len(dataset), env.world_size)
    bare = models.unwrap(model)

    def batches():
        last_log = time.time()
        for start in range(0, len(mine), batch_size):
            images, targets = dataset.__getitems__(mine[start:start + batch_size])
            yield models.to_model_input(images.to(env.device), out_size=size, norm=args.input_norm), targets
            if time.time() - last_log > LOG_SECONDS:
                last_log = time.time()
                models.print0(f"predict {min(start + batch_size, len(mine))}/{len(mine)} rows")

    if len(mine):
        out, targets = models.predict(bare, batches(), env.device, args.dtype, features)
    else:  # more ranks than rows
        width = bare.num_features if features else bare.head.conv.out_channels
        out = np.zeros((0, width), np.float32)
        targets = np.zeros((0, dataset.targets.shape[1]), np.float32)
    return models.gather_in_order(out, env.world_size), models.gather_in_order(targets, env.world_size)


def predict_logits(model, dataset, size, env, batch_size, args):
    """(logits, targets) of every row of `dataset` in order, on every rank."""
    return _predict_rows(model, dataset, size, env, batch_size, args, features=False)


def extract_features(model, dataset, size, env, batch_size, args):
    """(pre-logit features, targets) of every row of `dataset` in order, on every rank."""
    return _predict_rows(model, dataset, size, env, batch_size, args, features=True)


def eval_batch_size(cfg, args, env):
    """Twice the training micro-batch: without stored activations that fits wherever training
    does, and fewer batches mean fewer weight standardisations of the whole network."""
    return max(1, 2 * cfg["batch_size"] // env.world_size // args.batch_split)


# ----------------------------------------------------------------------------------------
# Results: results.csv (one row per finished run) and failures.csv beside it

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
    """failures.csv beside the results CSV: runs that failed (reason, time), never metric rows."""
    return os.path.join(os.path.dirname(os.path.abspath(results_path(args))), "failures.csv")


def read_table(path):
    """A results or failures CSV as text, exactly as written (a source named NA or 007 stays
    so); an empty frame when there is none. One that cannot be read is a one-line error, and
    is left as it is."""
    if not os.path.exists(path):
        return pd.DataFrame()
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise models.UserError(f"{path}: not a readable results file ({str(e).splitlines()[0]}); "
                               "move it away or choose another --results") from None


def _typed(value):
    """A CSV text cell as int or float where it is one (metrics of a row read back)."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def find_result(path, key):
    """The stored row of a finished run with this key (dict over KEY_COLUMNS), or None. Key
    cells are compared as text, the others come back as numbers where they are numbers."""
    df = read_table(path)
    if df.empty:
        return None
    match = np.ones(len(df), bool)
    for column, value in key.items():
        match &= df[column].to_numpy() == str(value)
    if not match.any():
        return None
    return {c: (v if c in KEY_COLUMNS else _typed(v)) for c, v in df[match].iloc[0].items()}


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on PATH.lock for a read-modify-write of PATH, so that runs appending
    to one CSV at the same time (two grids on one --out) never lose each other's rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def append_row(path, row, columns, key=None):
    """Append `row` to the CSV at `path` under its lock: re-read inside the lock, written to a
    temp file, fsync'd and renamed. With `key`, nothing is added when a row with that key is
    already there (another run finished it first); returns whether the row was added."""
    with locked(path):
        df = read_table(path)
        if key is not None and not df.empty and \
                (df[list(key)].to_numpy() == np.array([str(v) for v in key.values()])).all(1).any():
            return False
        new = pd.DataFrame([{c: "" if v is None else v for c, v in row.items()}]).astype(str)
        df = pd.concat([df, new], ignore_index=True) if not df.empty else new
        df = df[[c for c in columns if c in df] + [c for c in df.columns if c not in columns]].fillna("")
        with models.atomic_write(path) as f:
            df.to_csv(f, index=False)
        return True


def run_dir(args, key):
    """Folder of one run's files; the source (by default a path) quoted into one folder name."""
    source = urllib.parse.quote(key["source"], safe="+=@,-_.")
    return os.path.join(args.out, key["target"], f"{key['method']}-{source}-{key['model']}",
                        f"shots{key['shots']}-seed{key['seed']}")


def describe(key):
    return " ".join(f"{k}={v}" for k, v in key.items())


def record(args, key, task, metrics, ci, per_class, num_train, num_eval, steps, wall_s):
    """Write the run's args.json and per-class CSV in its folder and append its results row.
    Returns the row."""
    folder = run_dir(args, key)
    models.save_args(folder, args)
    with models.atomic_write(os.path.join(folder, "per_class.csv")) as f:
        per_class.to_csv(f, index=False)
    row = {**key, "source_size": args.source_size, "task": task,
           "headline": headline_name(task == "multilabel", args.pipeline),
           "accuracy": metrics.get("accuracy", float("nan")), "auc": metrics["auc"], "map": metrics["map"],
           "ci_low": ci[0], "ci_high": ci[1], "num_train": num_train, "num_eval": num_eval, "steps": steps,
           "input_norm": args.input_norm, "pipeline": args.pipeline, "wall_s": round(wall_s, 2),
           "commit": git_commit(), "args": json.dumps(vars(args), sort_keys=True)}
    if not append_row(results_path(args), row, RESULT_COLUMNS, key):
        models.print0(f"{describe(key)}: another run recorded it first; this row is not added")
    return row


def record_failure(args, key, reason, num_train):
    """One line naming the run and why, and a row in failures.csv."""
    models.print0(f"failed {describe(key)}: {reason}")
    if models.is_master():
        append_row(failures_path(args), {**key, "reason": reason, "num_train": num_train,
                                         "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                   FAILURE_COLUMNS)


def log_eval(key, metrics, ci):
    figures = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    models.print0(f"eval {describe(key)} {figures} ci95=[{ci[0]:.4f},{ci[1]:.4f}]")


# ----------------------------------------------------------------------------------------
# One run: the path every fine-tune and linear probe takes

def run_key(args, method, shots, seed):
    return {"method": method, "source": args.source, "model": args.model, "target": args.target,
            "shots": shots, "seed": seed}


def run_cell(args, env, key, evalset, num_train, fit):
    """Skip when the results CSV has `key`; else fit() -> (test logits, targets, steps), score,
    log and record. A failure (non-finite loss, or any error of this run) is logged and
    recorded in failures.csv and gives None, so that a grid goes on; Stopped and
    KeyboardInterrupt pass through. Returns the results row (an empty dict on ranks > 0), or
    None when the run failed."""
    done = find_result(results_path(args), key)
    if done is not None:
        models.print0(f"skip {describe(key)}: already in {results_path(args)}")
        return done
    t0 = time.time()
    try:
        logits, targets, steps = fit()
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - one cell's failure must not end the grid
        record_failure(args, key, f"{type(e).__name__}: {e}".replace("\n", " "), num_train)
        return None
    if not env.is_master:
        return {}
    metrics, ci, per_class = score_predictions(logits, targets, evalset.multilabel, evalset.labels, args,
                                               key["seed"])
    log_eval(key, metrics, ci)
    task = "multilabel" if evalset.multilabel else "multiclass"
    return record(args, key, task, metrics, ci, per_class, num_train, len(evalset), steps, time.time() - t0)


def run(args, env, base_model, train, evalset, shots, seed, stop, oversample):
    """One fine-tuning run of a copy of `base_model` through run_cell."""
    key = run_key(args, "finetune", shots, seed)

    def fit():
        cfg = settings(args, len(train), train.meta.get("orig_size", [train.meta["size"]] * 2))
        models.print0(f"run {describe(key)} num_train={len(train)} settings={json.dumps(cfg)}")
        model = copy.deepcopy(base_model)
        torch.manual_seed(seed)  # each seed its own new head, as each of the paper's runs
        model = models.wrap_ddp(new_head(model, RECIPES[args.recipe]["zero_head"]).to(env.device), env)
        steps = finetune(model, train, cfg, args, env, seed, stop, oversample)
        logits, targets = predict_logits(model, evalset, cfg["crop"], env, eval_batch_size(cfg, args, env), args)
        if args.save and env.is_master:
            os.makedirs(run_dir(args, key), exist_ok=True)
            models.save_checkpoint(os.path.join(run_dir(args, key), "model.pt"), model, step=steps, args=args,
                                   extra={"input_norm": args.input_norm})
        return logits, targets, steps

    return run_cell(args, env, key, evalset, len(train), fit)


# ----------------------------------------------------------------------------------------
# Command line

def add_common_arguments(parser):
    """Flags shared by transfer.py and fewshot.py."""
    parser.add_argument("--data", help="prepared target dataset folder (prepare_data.py output)")
    parser.add_argument("--init", default="scratch",
                        help="'scratch' or weights to start from: a pretrain.py checkpoint, an official "
                             "BiT .npz, the paper's .pth.tar or timm weights (models.load_weights)")
    parser.add_argument("--model", default="R50x1", choices=models.MODEL_NAMES, help="network")
    parser.add_argument("--source", default=None,
                        help="name of the pre-training source in the results (default: 'scratch', or "
                             "the --init path relative to the working directory, so two weight files "
                             "never share a name)")
    parser.add_argument("--source-size", type=int, default=None,
                        help="number of pre-training images, recorded for the size plot")
    parser.add_argument("--target", default=None,
                        help="name of the target in the results (default: meta.json name or folder name)")
    parser.add_argument("--out", default="runs/transfer",
                        help="output folder, one run or grid at a time (for grids at the same time: one "
                             "--out each and a shared --results)")
    parser.add_argument("--results", default=None,
                        help="results CSV (default: OUT/results.csv); failures.csv is written beside it")
    parser.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                        help="paper: SGD Nesterov + AGC (0.01, eps 1e-3, classifier weight excluded), "
                             "lr 0.001, batch 128, default-initialised head; bit: plain momentum, no "
                             "clipping, lr 0.003, batch 512, zero head")
    parser.add_argument("--pipeline", default="auto", choices=["auto", "bit", "chest"],
                        help="input pipeline: bit = HyperRule resolution, crop, flip; chest = 224 px and "
                             "the chest augmentation (the paper's PadChest target); auto = the prepared "
                             "target's meta.json 'pipeline', else bit")
    parser.add_argument("--input-norm", default=None, choices=sorted(models.INPUT_NORMS),
                        help="input normalisation (default: what the weights record or imply; bit = "
                             "[-1, 1] for scratch)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch size (default: the recipe's)")
    parser.add_argument("--batch-split", type=int, default=1,
                        help="micro-batches per step (gradient accumulation) so a big model fits")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps; warm-up and decays keep their fractions (default: HyperRule)")
    parser.add_argument("--min-epochs", type=float, default=None,
                        help="at least this many passes over the training subset: more steps than the "
                             "schedule's where needed, same fractions (default: none: the HyperRule's 500 "
                             "steps at the paper's batch 128 are 3 or more passes over any subset under 20k "
                             "images)")
    parser.add_argument("--resize", type=int, default=None,
                        help="train resize side (default: HyperRule; chest pipeline: the crop side)")
    parser.add_argument("--crop", type=int, default=None,
                        help="random crop side for training, eval resize side (default: HyperRule; "
                             "chest pipeline: 224)")
    parser.add_argument("--mixup", type=float, default=None, help="MixUp alpha, 0 = off (default: HyperRule)")
    parser.add_argument("--oversample", action="store_true",
                        help="sample classes equally often in full-shot runs (the paper's choice for "
                             "COVIDx and Flowers; k-shot subsets are balanced already)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="autocast precision (default: bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--device", default=None, help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95%% interval of the headline metric")
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between log lines (and one at least every minute)")
    parser.add_argument("--save", action="store_true", help="also save the fine-tuned weights (model.pt)")
    return parser


def get_args_parser():
    parser = models.ArgumentParser(description="BiT-HyperRule transfer of a pre-trained model to a target.")
    add_common_arguments(parser)
    parser.add_argument("--seed", type=models.at_least(0), default=0,
                        help="seed of batch order, augmentation, MixUp")
    return parser


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


def finish_args(args):
    """Check the flags and fill in the derived defaults (source, target, pipeline, dtype)."""
    if not args.data:
        raise models.UserError("--data is required")
    models.check_out(args.out, [args.data], "--data")
    meta = read_meta(args.data)
    check_device(args.device)
    for flag in ("batch_size", "batch_split", "steps", "resize", "crop", "log_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise models.UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.bootstrap < 0:
        raise models.UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.lr is not None and not args.lr > 0:
        raise models.UserError(f"--lr must be > 0, got {args.lr}")
    if args.mixup is not None and args.mixup < 0:
        raise models.UserError(f"--mixup must be >= 0, got {args.mixup}")
    if args.source is None:
        args.source = default_source(args.init)
    if args.target is None:
        args.target = meta.get("name") or os.path.basename(os.path.normpath(args.data))
    if args.pipeline == "auto":
        args.pipeline = meta.get("pipeline", "bit")
    if args.pipeline not in ("bit", "chest"):
        raise models.UserError(f"{args.data}/meta.json: unknown pipeline {args.pipeline!r} (bit or chest)")
    if args.dtype is None:
        args.dtype = models.default_dtype(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def stopped_exit(e, args):
    """One line, and the exit status of a process ended by that signal (130 Ctrl-C, 143 SIGTERM)."""
    models.print0(f"stopped by {signal.Signals(e.signum).name}; finished runs are in {results_path(args)}")
    raise SystemExit(128 + int(e.signum))


def main(args):
    finish_args(args)
    env = models.setup_distributed(args.device)
    try:
        with models.folder_lock(args.out) if env.is_master else contextlib.nullcontext(), \
                models.StopSignals() as stop:
            train, evalset, split = load_target(args.data)
            models.print0(f"target {args.target}: {len(train)} train, {len(evalset)} {split}, "
                          f"task {train.meta['task']}, labels {len(train.labels)}, pipeline {args.pipeline}")
            torch.manual_seed(args.seed)  # the random init of --init scratch and of the paper's head
            base, args.input_norm = init_model(args, len(train.labels))
            cfg = settings(args, len(train), train.meta.get("orig_size", [train.meta["size"]] * 2))
            check_batch(cfg, args, env)
            note = long_cpu_run_note(env.device, cfg)
            if note:
                models.print0(note)
            models.save_args(args.out, args)
            try:
                row = run(args, env, base, train, evalset, shots=0, seed=args.seed, stop=stop,
                          oversample=args.oversample)
            except Stopped as e:
                stopped_exit(e, args)
            if row is None:
                raise SystemExit(1)  # the failure line is printed, the reason in failures.csv
            if env.world_size > 1:
                dist.barrier()  # every rank done before the group goes (no abort at exit)
            return row
    finally:
        models.cleanup_distributed()


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
