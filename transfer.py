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

BiT-HyperRule (Kolesnikov et al. 2020, bit_hyperrule.py of google-research/big_transfer), from
the number of training images N and the original image size (meta.json "orig_size"):
  steps      [warm-up, decay, decay, decay, total] = [100, 200, 300, 400, 500] for N < 20k,
             [500, 3000, 6000, 9000, 10000] for N < 500k, [500, 6000, 12000, 18000, 20000] else;
             linear warm-up, then x0.1 after each decay step
  MixUp      alpha 0.1 from N = 20k on, none below
  resolution resize 160, random crop 128 when h*w < 96*96, else resize 512, crop 480
SGD with momentum 0.9, no weight decay, zero-initialised head. --recipe paper (Cherti & Jitsev:
batch 128, lr 0.001, Nesterov) or bit (batch 512, lr 0.003, plain momentum). The learning rate is
used as given whatever the batch size: BiT's released fine-tuning code does not rescale it by
batch/512 (bit_pytorch/train.py and bit_tf2/train.py), so neither do we; rescale --lr yourself.
"""
import copy
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import models
from prepare_data import PreparedDataset, read_meta

RECIPES = {"paper": {"batch_size": 128, "lr": 0.001, "nesterov": True},
           "bit": {"batch_size": 512, "lr": 0.003, "nesterov": False}}
KEY_COLUMNS = ["method", "source", "model", "target", "shots", "seed"]
RESULT_COLUMNS = KEY_COLUMNS + ["source_size", "task", "headline", "accuracy", "auc", "map",
                                "ci_low", "ci_high", "num_train", "num_eval", "steps", "wall_s",
                                "commit", "args"]


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
    """BiT's learning rate at `step` (0-based): linear warm-up from 0, then base_lr divided by 10
    after each decay step passed."""
    if step < schedule[0]:
        return base_lr * step / schedule[0]
    return base_lr * 0.1 ** sum(s < step for s in schedule[1:-1])


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


def headline_name(multilabel):
    """The figure a run is judged by: accuracy for single-label targets, mean AUC otherwise."""
    return "auc" if multilabel else "accuracy"


def bootstrap_ci(logits, targets, multilabel, samples=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of the headline metric: rows resampled with replacement
    (seeded); resamples where the metric is undefined (e.g. one class only) are dropped."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets, np.float64)
    n = len(targets)
    if multilabel:
        scores = models.scores_from_logits(logits, True)

        def metric(idx):
            with np.errstate(all="ignore"):
                aucs = models.column_metric(models.roc_auc, scores[idx], targets[idx])
            return np.nan if np.isnan(aucs).all() else np.nanmean(aucs)
    else:
        correct = np.asarray(logits).argmax(1) == targets.argmax(1)

        def metric(idx):
            return correct[idx].mean()
    values = np.array([metric(rng.integers(0, n, n)) for _ in range(samples)], np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


# ----------------------------------------------------------------------------------------
# Data, model, training, evaluation

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


def init_model(args, num_classes):
    """The network of --model with --init weights (or random ones) and a zero head."""
    model = models.create_model(args.model, num_classes)
    if args.init == "scratch":
        model.reset_head(num_classes)
    elif not os.path.exists(args.init):
        raise FileNotFoundError(f"--init {args.init}: no such file")
    else:
        models.load_weights(model, args.init, keep_head=False)
    return model


def settings(args, num_train, orig_hw):
    """HyperRule values with the command-line overrides applied."""
    rule = hyperrule(num_train, orig_hw)
    recipe = RECIPES[args.recipe]
    schedule = rule["schedule"] if args.steps is None else scale_schedule(rule["schedule"], args.steps)
    out = {"schedule": schedule,
           "mixup": rule["mixup"] if args.mixup is None else args.mixup,
           "resize": args.resize or rule["resize"], "crop": args.crop or rule["crop"],
           "batch_size": args.batch_size or recipe["batch_size"],
           "lr": recipe["lr"] if args.lr is None else args.lr, "nesterov": recipe["nesterov"]}
    if out["crop"] > out["resize"]:
        raise models.UserError(f"--crop {out['crop']} is larger than --resize {out['resize']}")
    return out


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


def finetune(model, train, cfg, args, env, seed):
    """Fine-tune `model` (already on env.device, DDP-wrapped under torchrun) on `train` with the
    settings `cfg`. Returns the number of optimiser steps taken."""
    schedule, batch = cfg["schedule"], cfg["batch_size"]
    if batch % (env.world_size * args.batch_split):
        raise models.UserError(f"--batch-size {batch} is not divisible by world size x "
                               f"--batch-split ({env.world_size} x {args.batch_split})")
    weights = oversampling_weights(train.targets) if args.oversample else None
    steps = schedule[-1]
    plan = batch_indices(len(train), batch, steps, seed, weights)
    optimizer = torch.optim.SGD(models.unwrap(model).parameters(), lr=0.0, momentum=0.9,
                                nesterov=cfg["nesterov"], weight_decay=0.0)
    scaler = torch.amp.GradScaler(env.device.type) if args.dtype == "fp16" else None
    # Augmentation differs per rank; batch choice and MixUp factor are shared.
    aug = torch.Generator(device=env.device).manual_seed(seed * 1000 + env.rank)
    mix = np.random.default_rng(seed)
    t0, bar = time.time(), tqdm(total=steps, disable=not (env.is_master and sys.stderr.isatty()))
    for step in range(steps):
        lr = lr_at(step, schedule, cfg["lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = mix.beta(cfg["mixup"], cfg["mixup"]) if cfg["mixup"] > 0 else 1.0
        mine = plan[step][env.rank::env.world_size]
        micro_batches = []
        for part in np.array_split(mine, args.batch_split):
            images, targets = train.__getitems__(part)
            x = models.to_model_input(images.to(env.device, non_blocking=True), out_size=cfg["resize"])
            x = models.random_affine(x, out_size=cfg["crop"], crop=cfg["crop"] / cfg["resize"],
                                     generator=aug)
            y = targets.to(env.device)
            if lam < 1.0:
                perm = torch.randperm(len(x), generator=aug, device=env.device)
                x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
            micro_batches.append((x, y))
        loss = models.train_step(model, optimizer, micro_batches, multilabel=train.multilabel,
                                 device=env.device, dtype=args.dtype, scaler=scaler)
        bar.update()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            rate = (step + 1) * batch / (time.time() - t0)
            models.print0(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {lr:.2e} "
                          f"img/s {rate:.1f}")
    bar.close()
    return steps


def predict_features(model, dataset, size, env, batch_size, dtype, features=False):
    """Logits (or pre-logit features) and targets of every row of `dataset`, in order, on every
    rank: each rank predicts rows r, r + W, ... and the parts are gathered."""
    mine = np.arange(env.rank, len(dataset), env.world_size)
    bare = models.unwrap(model)

    def batches():
        for start in range(0, len(mine), batch_size):
            images, targets = dataset.__getitems__(mine[start:start + batch_size])
            yield models.to_model_input(images.to(env.device), out_size=size), targets

    if len(mine):
        out, targets = models.predict(bare, batches(), env.device, dtype, features)
    else:  # more ranks than rows
        width = bare.num_features if features else bare.head.conv.out_channels
        out = np.zeros((0, width), np.float32)
        targets = np.zeros((0, dataset.targets.shape[1]), np.float32)
    return models.gather_in_order(out, env.world_size), models.gather_in_order(targets, env.world_size)


def eval_batch_size(cfg, args, env):
    """Twice the training micro-batch: without stored activations that fits wherever training
    does, and fewer batches mean fewer weight standardisations of the whole network."""
    return max(1, 2 * cfg["batch_size"] // env.world_size // args.batch_split)


def evaluate(logits, targets, multilabel, names, args, seed):
    """Headline metrics, bootstrap interval and per-class table of one evaluation."""
    metrics = models.headline_metrics(logits, targets, multilabel)
    low, high = bootstrap_ci(logits, targets, multilabel, samples=args.bootstrap, seed=seed)
    return metrics, (low, high), per_class_metrics(logits, targets, multilabel, names)


# ----------------------------------------------------------------------------------------
# Results

def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_path(args):
    return args.results or os.path.join(args.out, "results.csv")


def read_results(path):
    if not os.path.exists(path):
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.read_csv(path, keep_default_na=True)


def find_result(path, key):
    """The stored row of a finished run with this key (dict over KEY_COLUMNS), or None."""
    df = read_results(path)
    if df.empty:
        return None
    match = np.ones(len(df), bool)
    for column, value in key.items():
        match &= df[column].astype(str).to_numpy() == str(value)
    return df[match].iloc[0].to_dict() if match.any() else None


def append_result(path, row):
    """Add one row to the results CSV (written to a temp file, then renamed)."""
    df = read_results(path)
    df = pd.concat([df, pd.DataFrame([row])], ignore_index=True) if not df.empty else pd.DataFrame([row])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    df[RESULT_COLUMNS + [c for c in df.columns if c not in RESULT_COLUMNS]].to_csv(f"{path}.tmp", index=False)
    os.replace(f"{path}.tmp", path)


def run_dir(args, key):
    return os.path.join(args.out, key["target"], f"{key['method']}-{key['source']}-{key['model']}",
                        f"shots{key['shots']}-seed{key['seed']}")


def record(args, key, task, metrics, ci, per_class, num_train, num_eval, steps, wall_s):
    """Write the run's args.json and per-class CSV in its folder and append its results row.
    Returns the row."""
    folder = run_dir(args, key)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    per_class.to_csv(os.path.join(folder, "per_class.csv"), index=False)
    row = {**key, "source_size": args.source_size, "task": task,
           "headline": headline_name(task == "multilabel"), "accuracy": metrics.get("accuracy", float("nan")),
           "auc": metrics["auc"], "map": metrics["map"], "ci_low": ci[0], "ci_high": ci[1],
           "num_train": num_train, "num_eval": num_eval, "steps": steps, "wall_s": round(wall_s, 2),
           "commit": git_commit(), "args": json.dumps(vars(args), sort_keys=True)}
    append_result(results_path(args), row)
    return row


def log_eval(key, metrics, ci):
    figures = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    models.print0(f"eval {' '.join(f'{k}={v}' for k, v in key.items())} {figures} "
                  f"ci95=[{ci[0]:.4f},{ci[1]:.4f}]")


def run(args, env, base_model, train, evalset, shots, seed, method="finetune"):
    """One fine-tuning run: skipped when the results CSV already has its key; otherwise train a
    copy of `base_model`, evaluate, record. Returns the results row (None on ranks > 0)."""
    key = {"method": method, "source": args.source, "model": args.model, "target": args.target,
           "shots": shots, "seed": seed}
    done = find_result(results_path(args), key)
    if done is not None:
        models.print0(f"skip {' '.join(f'{k}={v}' for k, v in key.items())}: already in {results_path(args)}")
        return done
    t0 = time.time()
    cfg = settings(args, len(train), train.meta.get("orig_size", [train.meta["size"]] * 2))
    models.print0(f"run {' '.join(f'{k}={v}' for k, v in key.items())} num_train={len(train)} "
                  f"settings={json.dumps(cfg)}")
    model = copy.deepcopy(base_model).to(env.device)
    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    steps = finetune(model, train, cfg, args, env, seed)
    eval_batch = eval_batch_size(cfg, args, env)
    logits, targets = predict_features(model, evalset, cfg["crop"], env, eval_batch, args.dtype)
    if args.save and env.is_master:
        folder = run_dir(args, key)
        os.makedirs(folder, exist_ok=True)
        models.save_checkpoint(os.path.join(folder, "model.pt"), model, step=steps, args=args)
    if not env.is_master:
        return None
    metrics, ci, per_class = evaluate(logits, targets, evalset.multilabel, evalset.labels, args, seed)
    log_eval(key, metrics, ci)
    task = "multilabel" if evalset.multilabel else "multiclass"
    return record(args, key, task, metrics, ci, per_class, len(train), len(evalset), steps, time.time() - t0)


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
                        help="name of the pre-training source in the results "
                             "(default: 'scratch', or the --init file's folder name)")
    parser.add_argument("--source-size", type=int, default=None,
                        help="number of pre-training images, recorded for the size plot")
    parser.add_argument("--target", default=None,
                        help="name of the target in the results (default: meta.json name or folder name)")
    parser.add_argument("--out", default="runs/transfer", help="output folder")
    parser.add_argument("--results", default=None, help="results CSV (default: OUT/results.csv)")
    parser.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                        help="paper: batch 128, lr 0.001, Nesterov; bit: batch 512, lr 0.003")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch size (default: the recipe's)")
    parser.add_argument("--batch-split", type=int, default=1,
                        help="micro-batches per step (gradient accumulation) so a big model fits")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps; warm-up and decays keep their fractions (default: HyperRule)")
    parser.add_argument("--resize", type=int, default=None, help="train resize side (default: HyperRule)")
    parser.add_argument("--crop", type=int, default=None,
                        help="random crop side for training, eval resize side (default: HyperRule)")
    parser.add_argument("--mixup", type=float, default=None, help="MixUp alpha, 0 = off (default: HyperRule)")
    parser.add_argument("--oversample", action="store_true",
                        help="sample classes equally often (the paper's choice for COVIDx and Flowers)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    parser.add_argument("--device", default=None, help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95%% interval of the headline metric")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--save", action="store_true", help="also save the fine-tuned weights (model.pt)")
    return parser


def get_args_parser():
    parser = models.ArgumentParser(description="BiT-HyperRule transfer of a pre-trained model to a target.")
    add_common_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of batch order, augmentation, MixUp")
    return parser


def finish_args(args):
    """Check --data and fill in the derived defaults (source and target names)."""
    if not args.data:
        raise models.UserError("--data is required")
    meta = read_meta(args.data)
    if args.source is None:
        args.source = "scratch" if args.init == "scratch" else os.path.basename(
            os.path.dirname(os.path.abspath(args.init))) or os.path.splitext(os.path.basename(args.init))[0]
    if args.target is None:
        args.target = meta.get("name") or os.path.basename(os.path.normpath(args.data))
    for flag in ("batch_size", "batch_split", "steps", "resize", "crop", "log_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise models.UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.bootstrap < 0:
        raise models.UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    return args


def main(args):
    finish_args(args)
    env = models.setup_distributed(args.device)
    try:
        train, evalset, split = load_target(args.data)
        models.print0(f"target {args.target}: {len(train)} train, {len(evalset)} {split}, "
                      f"task {train.meta['task']}, labels {len(train.labels)}")
        if env.is_master:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
        torch.manual_seed(args.seed)  # the random init of --init scratch
        base = init_model(args, len(train.labels))
        return run(args, env, base, train, evalset, shots=0, seed=args.seed)
    finally:
        models.cleanup_distributed()


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
