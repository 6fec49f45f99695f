"""Supervised pre-training of a BiT ResNet-v2 on prepared chest X-ray datasets (Cherti & Jitsev,
arXiv 2106.00116), from scratch or from natural-image weights, on one device or many (DDP).
The defaults are the paper's chest recipe (`--recipe paper`; every recipe value is in RECIPES).

One GPU (or a CPU), the paper's global batch of 1024 reached by accumulating 8 micro-batches:
    python pretrain.py --data data/chexpert_mimic_nih_padchest --views PA AP "AP Supine" L COSTAL \
        --model R50x1 --accum-steps 8 --out runs/r50x1_all
One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 pretrain.py --data ... --model R50x1 --out runs/r50x1_all --resume
Several nodes (env:// rendezvous), e.g. in a SLURM batch script, one torchrun per node:
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=4 \
        --rdzv_backend=c10d --rdzv_endpoint=$head:29500 --rdzv_id=$SLURM_JOB_ID --max-restarts=1 \
        pretrain.py --data ... --model R50x1 --out runs/r50x1_all --resume

--batch-size is the global batch: the data order depends on (seed, epoch, global batch) only
(models.GlobalBatchSampler), so the same command trains the same model on 1 GPU with
accumulation or on 8 without. Several --data folders are trained on together with their labels
united (a label a source lacks is unknown, masked in the loss); prepare_data.py --dataset merge
instead keeps the intersection, as the paper's combined sources did.

Outputs in --out: args.json (the resolved recipe); checkpoint.pt (the latest state, every
--save-every steps, at the end and on Ctrl-C / SIGTERM, after which the run exits with 128 +
the signal number; a signal during a validation ends it at once, the previous checkpoint kept);
best.pt (the weights with the lowest validation loss, the paper's `save_best`, which its
transfer used); model.pt (the final weights). With --resume a run
continues from checkpoint.pt (optimizer, scaler, schedule, data order, RNG, best loss); a
checkpoint of other training arguments, model or labels is refused.
Log lines: `step S/T epoch E loss L lr LR img/s N data P%` and `eval step S epoch E ...`.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import models
from prepare_data import PreparedDataset

# The recipes: every flag marked (recipe) that is not given takes its value from here. lr is per
# 256 images (the lr is lr x batch_size / 256); warm-up and decays in epochs (or "_steps"); the
# warm-up ramps from lr x warmup_from; crop_area: the random crop's share of the image area
# (RandomResizedCrop; [1, 1] = none); eval_crop: the centre crop's share of the side at
# validation. Sources: ../shared/paper/recipes.md (the authors' configs).
_CHEST = dict(batch_size=1024, lr=0.01, epochs=90, warmup_epochs=15, warmup_steps=None,
              # the paper ramps from lr / K, K = its 64 workers; ours is fixed, not our world size
              warmup_from=1 / 64, decay_epochs=[30, 60, 80], decay_steps=None, agc=0.01,
              weight_decay=1e-4, image_size=224, rotate=models.CHEST_AUGMENT["rotate"],
              shift=models.CHEST_AUGMENT["translate"], zoom=models.CHEST_AUGMENT["scale"],
              padding=models.CHEST_AUGMENT["padding"], crop_area=[1.0, 1.0], views=["PA", "AP"],
              input_norm="bit", eval_crop=1.0)
_IMAGENET = dict(_CHEST, batch_size=2048, lr=0.1, warmup_epochs=5, agc=0.0, rotate=0.0, shift=0.0,
                 zoom=0.0, padding="zeros", crop_area=[0.08, 1.0], views=None, input_norm="imagenet",
                 eval_crop=224 / 256)
RECIPES = {
    # the paper's chest sources: SGD_AGC, global batch 1024 (16 x 64 GPUs), fp16 in the paper
    "paper": _CHEST,
    # BiT's upstream ImageNet recipe (Kolesnikov et al. 2019) with the chest augmentation
    "bit": dict(_CHEST, batch_size=4096, lr=0.03, warmup_epochs=None, warmup_steps=5000,
                warmup_from=0.0, agc=0.0, shift=0.1, padding="zeros", views=None),
    # the paper's own ImageNet sources (configs/imagenet*_bit*.yaml, 64 GPUs): RandomResizedCrop
    # 224 + flip, ImageNet mean / std, evaluation resize 256 / centre crop 224; R50x1 32 images a
    # GPU, R152x4 16; plain SGD for ImageNet-1k R50x1, SGD_AGC for the others
    "imagenet1k-r50x1": _IMAGENET,
    "imagenet1k-r152x4": dict(_IMAGENET, batch_size=1024, lr=0.03, warmup_epochs=15, agc=0.01),
    "imagenet21k-r50x1": dict(_IMAGENET, lr=0.01, warmup_epochs=2, agc=0.01),
    "imagenet21k-r152x4": dict(_IMAGENET, batch_size=1024, lr=0.01, warmup_epochs=2, agc=0.01),
}
# Arguments that do not change the trained weights: a resume may change them freely (the data
# order and gradients do not depend on the split of the global batch into accum_steps).
NOT_TRAINING = {"out", "resume", "resume_changed", "workers", "log_every", "save_every", "eval_every",
                "device", "compile", "channels_last", "deterministic", "allow_any_schedule", "accum_steps"}
LOG_SECONDS = 60  # a log line at least this often, however slow the steps
LONG_CPU_RUN_HOURS = 1


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog="Flags marked (recipe) default to the value of --recipe (RECIPES).",
                              memory_hint="--batch-size (or raise --accum-steps) or --image-size")
    add, recipe = p.add_argument, lambda help: help + " (recipe)"
    add("--data", action="append", required=True, metavar="PREPARED",
        help="prepared dataset folder (prepare_data.py); repeat to train on several at once, their "
             "labels united (a label a source lacks is unknown, masked in the loss, for its images)")
    add("--out", required=True, help="output folder (args.json, checkpoint.pt, best.pt, model.pt)")
    add("--model", default="R50x1", help=f"one of {', '.join(models.MODEL_NAMES)}")
    add("--recipe", choices=list(RECIPES), default="paper",
        help="paper: the paper's chest recipe; bit: BiT's upstream recipe; imagenet1k-r50x1, imagenet1k-r152x4, "
             "imagenet21k-r50x1, imagenet21k-r152x4: the paper's ImageNet recipes (values: RECIPES in pretrain.py)")
    add("--init", default=None, metavar="PATH",
        help="start from these weights (official BiT .npz or a checkpoint) instead of from scratch; "
             "the head starts at zero, the input normalisation is the weights' own")
    add("--image-size", type=models.SIDE, default=None,
        help=recipe("training resolution in pixels"))
    add("--batch-size", type=models.COUNT, default=None, help=recipe("global batch (all ranks and accumulation steps)"))
    add("--accum-steps", type=models.COUNT, default=1, help="gradient accumulation micro-steps per optimizer step")
    add("--epochs", type=models.COUNT, default=None, help=recipe("training epochs"))
    add("--lr", type=models.number("(0, inf)"), default=None, help=recipe("base learning rate per 256 images"))
    warmup, decay = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-epochs", type=models.number("[0, 1e6]"), default=None,
                        help=recipe("linear lr warm-up, in epochs"))
    warmup.add_argument("--warmup-steps", type=models.number("[0, 1e9]", int), default=None,
                        help=recipe("linear lr warm-up, in steps"))
    decay.add_argument("--decay-epochs", type=models.number("[0, 1e6]"), nargs="*", default=None,
                       help=recipe("epochs at which the lr is multiplied by 0.1"))
    decay.add_argument("--decay-steps", type=models.number("[0, 1e9]", int), nargs="*", default=None,
                       help=recipe("optimizer steps at which the lr is multiplied by 0.1"))
    add("--allow-any-schedule", action="store_true", help="accept a warm-up past the first decay, or no decay")
    add("--momentum", type=models.number("[0, 1)"), default=0.9, help="SGD Nesterov momentum")
    add("--weight-decay", type=models.number("[0, inf)"), default=None,
        help=recipe("L2 weight decay on all parameters, as in BiT (GroupNorm and biases included)"))
    add("--agc", type=models.number("[0, inf)"), default=None,
        help=recipe("Adaptive Gradient Clipping factor (unit-wise, eps 1e-3, classifier weight excluded); 0: off"))
    add("--rotate", type=models.number("[0, 180]"), default=None, help=recipe("random rotation up to +-degrees"))
    add("--shift", type=models.number("[0, 1)"), default=None,
        help=recipe("random shift up to this fraction of the side"))
    add("--zoom", type=models.number("[0, 1)"), default=None, help=recipe("random scale in [1 - zoom, 1 + zoom]"))
    add("--views", nargs="+", default=None,
        help=recipe("X-ray views to train on (e.g. PA AP \"AP Supine\" L COSTAL); 'all': no filter"))
    add("--device", default=None, help="cuda, cuda:N or cpu (default: the local rank's GPU if any, else cpu)")
    add("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
        help="autocast precision, fp16 with a GradScaler (default: bf16 on CUDA, fp32 on a CPU; the paper: fp16)")
    add("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--deterministic", action="store_true", help="deterministic algorithms (bitwise-exact resumes; slower on GPUs)")
    add("--workers", type=models.number("[0, 1024]", int), default=None,
        help="DataLoader worker processes per rank (default: up to 8, fewer than the CPUs)")
    add("--seed", type=models.SEED, default=42, help="seed of the init, data order and augmentation (paper: 42)")
    add("--log-every", type=models.COUNT, default=20,
        help=f"steps between log lines (and one at least every {LOG_SECONDS} s)")
    add("--eval-every", type=models.number("[0, 1e9]", int), default=0,
        help="steps between validations; 0: after every epoch (paper)")
    add("--save-every", type=models.COUNT, default=1000, help="steps between checkpoints")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt if any (without: it is an error)")
    add("--resume-changed", action="store_true", help="with --resume, accept a checkpoint of other training flags")
    return p


# ----------------------------------------------------------------------------------------
# Rules (pure functions)

def resolve_recipe(args):
    """args with every recipe value left at None taken from RECIPES[args.recipe] (a warm-up or
    decays given in one unit replace the recipe's in the other)."""
    out = argparse.Namespace(**vars(args))
    for key, value in RECIPES[args.recipe].items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    for given, other in [("warmup_steps", "warmup_epochs"), ("warmup_epochs", "warmup_steps"),
                         ("decay_steps", "decay_epochs"), ("decay_epochs", "decay_steps")]:
        if getattr(args, given) is not None:
            setattr(out, other, None)
    out.views = None if out.views == ["all"] else out.views
    return out


def schedule_steps(args, steps_per_epoch):
    """(warm-up steps, decay steps, total steps) of the resolved args, in optimizer steps."""
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    decays = list(args.decay_steps) if args.decay_steps is not None else \
        [round(e * steps_per_epoch) for e in args.decay_epochs]
    return warmup, decays, args.epochs * steps_per_epoch


def check_schedule(warmup, decays, total):
    """Refuse a warm-up that does not end before the first decay, or a run that never decays
    before its end: with a recipe meant for another dataset size, both happen."""
    hint = "; change the schedule or pass --allow-any-schedule"
    if decays and warmup >= min(decays):
        raise models.UserError(f"the warm-up ({warmup} steps) does not end before the first lr decay "
                               f"(step {min(decays)}){hint}")
    if not any(0 < d < total for d in decays):
        raise models.UserError(f"the lr never decays before the end of the run ({total} steps; decays "
                               f"at steps {decays or 'none'}){hint}")


def learning_rate(step, args, warmup, decays):
    """lr of optimizer step `step`: peak lr x batch / 256, linear warm-up from warmup_from x peak,
    x0.1 from each decay step on."""
    return models.step_lr(step, args.lr * args.batch_size / 256, warmup, decays, args.warmup_from)


def augmentation_seed(seed, step):
    """Augmentation randomness of one global batch, drawn whole (random_affine's rows): a function
    of these numbers only, so resumes and any split over ranks / accumulation steps draw the
    same transform for each image."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def first_difference(saved, args, saved_labels, labels):
    """The first difference between a checkpoint's training (arguments, labels) and this run's,
    as text, or None. Arguments in NOT_TRAINING are free to change."""
    if saved_labels != labels:
        return f"its labels are {saved_labels} but the data's are {labels}"
    now = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING}
    for key in sorted(set(now) | {k for k in saved if k not in NOT_TRAINING}):
        if key not in saved or key not in now or saved[key] != now[key]:
            return (f"--{key.replace('_', '-')} is {saved.get(key, 'not recorded')!r} in the checkpoint "
                    f"but {now.get(key, 'not given')!r} now")
    return None


# ----------------------------------------------------------------------------------------
# Data: several prepared folders as one, the device-side augmentation

class SourceDataset(torch.utils.data.Dataset):
    """One split of several prepared folders as one dataset, rows of the given views only (None:
    all). Labels are the union in first-seen order; a label a folder lacks is unknown (NaN).
    Batches are (images, targets, intensity scales), as PreparedDataset's."""

    def __init__(self, folders, split, views=None):
        self.parts = [PreparedDataset(f, split, views=views) for f in folders]
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.meta["task"], part.meta["size"], part.meta["channels"]) != \
                    (first.meta["task"], first.meta["size"], first.meta["channels"]):
                raise models.UserError(f"{part.folder} ({part.meta['task']}, {part.meta['size']} px x "
                                       f"{part.meta['channels']}) does not fit {first.folder} ({first.meta['task']}, "
                                       f"{first.meta['size']} px x {first.meta['channels']})")
            if not first.multilabel and part.labels != first.labels:
                raise models.UserError("single-label sources must have the same classes")
        self.multilabel, self.meta = first.multilabel, first.meta
        self.labels = list(dict.fromkeys(label for part in self.parts for label in part.labels))
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])
        self.columns = [np.array([self.labels.index(label) for label in part.labels]) for part in self.parts]

    def __len__(self):
        return int(self.offsets[-1])

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        images = torch.empty((len(indices), self.meta["size"], self.meta["size"], self.meta["channels"]),
                             dtype=torch.uint8)
        targets = torch.full((len(indices), len(self.labels)), float("nan"))
        scale = torch.empty(len(indices))
        for p in np.unique(which):
            rows = np.flatnonzero(which == p)
            images[rows], targets[np.ix_(rows, self.columns[p])], scale[rows] = \
                self.parts[p].__getitems__(indices[rows] - self.offsets[p])
        return images, targets, scale


def training_data(args, env):
    """The train split, its sampler, and the split validated on: 'valid', else 'test' (as the
    paper validated NIH and PadChest), else none."""
    train_set = SourceDataset(args.data, "train", args.views)
    if len(train_set) == 0:
        views = "every view" if args.views is None else "views " + ", ".join(args.views)
        raise models.UserError(f"no train images with {views} in {', '.join(args.data)}; pass --views all, "
                               "or the views the data has")
    sampler = models.GlobalBatchSampler(len(train_set), args.batch_size, env.world_size, env.rank,
                                        args.accum_steps, args.seed)
    if sampler.steps_per_epoch == 0:
        raise models.UserError(f"the train split has {len(train_set)} images, fewer than one global batch "
                               f"of {args.batch_size}")
    for split in ("valid", "test"):
        val_set = SourceDataset(args.data, split, args.views)
        if len(val_set):
            if split == "test":
                models.print0(f"no 'valid' split: validating on the 'test' split ({len(val_set)} images)")
            return train_set, sampler, val_set
    models.print0("no 'valid' or 'test' split: no validation, no best.pt")
    return train_set, sampler, None


def augment(images, step, micro_batch, args, scale=None):
    """uint8 NHWC batch on the device (and its intensity scales) -> augmented model input: the
    recipe's random crop, shift, scale, rotation and flip in one resampling. Grey images are
    normalised as the authors' chest transforms did for every X-ray source (chest=True)."""
    gen = torch.Generator(images.device).manual_seed(augmentation_seed(args.seed, step))
    x = models.random_affine(models.to_model_input(images, norm=args.input_norm, scale=scale, chest=True),
                             args.image_size, rotate=args.rotate, translate=args.shift, scale=args.zoom,
                             crop_area=args.crop_area, padding=args.padding, generator=gen,
                             rows=(args.batch_size, micro_batch * len(images)))
    return x.contiguous(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


def eval_input(images, args, scale=None):
    """uint8 NHWC batch on the device -> model input: the centre eval_crop of the side, resized."""
    keep = round(images.shape[1] * args.eval_crop)
    start = (images.shape[1] - keep) // 2
    return models.to_model_input(images[:, start:start + keep, start:start + keep], args.image_size,
                                 args.channels_last, args.input_norm, scale, chest=True)


# ----------------------------------------------------------------------------------------
# Training: main, setup, resume, validation, the loop

def main(args):
    args = resolve_recipe(args)
    if args.model not in models.MODEL_NAMES:
        raise models.UserError(f"unknown model {args.model!r}; choose from {', '.join(models.MODEL_NAMES)}")
    if args.init is not None and not os.path.isfile(args.init):
        raise FileNotFoundError(f"--init {args.init} does not exist or is not a file")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise models.UserError(f"--device {args.device}: no CUDA GPU is available here")
    models.check_out(args.out, {"--data": args.data, "--init": args.init})
    models.check_distinct(args.data, "--data")
    with models.distributed(args.device) as env:
        args.dtype = args.dtype or models.default_dtype(env.device)
        args.workers = models.default_workers() if args.workers is None else args.workers
        # The folder is this run's (rank 0 writes every file in it): a second run exits 2.
        with models.folder_lock(args.out) if env.is_master else contextlib.nullcontext():
            return train(args, env)


def setup(args, env, labels, checkpoint):
    """The model (compiled and DDP-wrapped as asked; --init weights unless resuming), optimizer,
    scaler, and where training starts: resumed from `checkpoint` when it exists. Returns (model,
    optimizer, scaler, step, best validation loss, input normalisation)."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.deterministic
    if os.path.exists(checkpoint) and not args.resume:
        raise models.UserError(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    torch.manual_seed(args.seed)
    model = models.create_model(args.model, len(labels))
    input_norm = args.input_norm
    if args.init is not None and not os.path.exists(checkpoint):
        input_norm = models.load_weights(model, args.init)
        if input_norm != args.input_norm:
            models.print0(f"input normalisation {input_norm!r}: that of the --init weights")
    model.to(env.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.dtype == "fp16")
    step, best_loss = 0, math.inf
    if os.path.exists(checkpoint):
        step, best_loss, input_norm = resume(checkpoint, args, labels, model, optimizer, scaler)
    models.save_args(args.out, args)
    model = models.wrap_ddp(torch.compile(model) if args.compile else model, env)
    return model, optimizer, scaler, step, best_loss, input_norm


def resume(path, args, labels, model, optimizer, scaler):
    """Load OUT/checkpoint.pt into model, optimizer, scaler and the RNGs, refusing one of other
    training (one line). Returns (step, best validation loss, input normalisation)."""
    state = models.load_checkpoint(path)
    if not all(isinstance(state.get(k), t) for k, t in [("model", dict), ("args", dict), ("step", int),
                                                         ("optimizer", dict)]):
        raise models.UserError(f"{path} is not a pretrain.py checkpoint; move it away or choose another --out")
    difference = first_difference(state["args"], args, state.get("labels"), labels)
    if difference and not args.resume_changed:
        raise models.UserError(f"{path} is of another training: {difference}; pass --resume-changed to "
                               "continue with the change, or choose another --out")
    if difference:
        models.print0(f"resuming with a change: {difference}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise models.UserError(f"{path} does not fit {args.model} with {len(labels)} labels") from None
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    models.restore_rng(state["rng"])
    models.print0(f"resumed from {path} at step {state['step']}")
    return state["step"], state.get("best_loss", math.inf), state.get("input_norm", args.input_norm)


def validate(model, dataset, args, env, batch_size, stop):
    """Loss and headline metrics on the whole dataset, each rank predicting a strided shard; None
    when a stop signal ends it, at once (checkpoint.pt stays before this step: a resume validates it)."""
    try:
        with stop.at_once():
            logits, targets = models.predict_dataset(model, dataset, lambda x, scale: eval_input(x, args, scale),
                                                     batch_size, env, args.dtype, args.workers)
    except models.Stopped:
        return None
    out = {"loss": models.loss_fn(torch.from_numpy(logits), torch.from_numpy(targets), dataset.multilabel).item()}
    return out | models.headline_metrics(logits, targets, dataset.multilabel)


def agree(flags, group):
    """Each flag True on every rank if it is True on any (one all-reduce on a CPU group, no GPU
    sync), so that all ranks log, save and stop after the same step."""
    if group is None:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags])
    dist.all_reduce(t, group=group)
    return [bool(v) for v in t.tolist()]


def mean_loss(loss_sum, steps, model, env, checkpoint, last_saved):
    """The mean loss over the last `steps` steps. A non-finite loss or weight exits 1 with one
    line, so that a broken state is never saved (all ranks decide alike: the weights are shared)."""
    loss_sum = loss_sum.clone()
    if env.world_size > 1:
        dist.all_reduce(loss_sum)
    loss = loss_sum.item() / env.world_size / max(steps, 1)
    if not (math.isfinite(loss) and all(p.isfinite().all() for p in model.parameters())):
        where = f"the last good checkpoint is {checkpoint} (step {last_saved})" if last_saved else \
            "no checkpoint was saved"
        models.print0(f"pretrain.py: error: non-finite loss ({loss}) or weights in the last {steps} steps; "
                      f"stopped, {where}", file=sys.stderr)
        raise SystemExit(1)
    return loss


def next_micro_batches(loader, n, stop):
    """The next n micro-batches, or None when a stop signal has ended the loader's workers (a
    scancel signals every process): the state is then still that of a completed step."""
    try:
        return [next(loader) for _ in range(n)]
    except RuntimeError:
        if not stop:
            raise
        return None


def train(args, env):
    train_set, sampler, val_set = training_data(args, env)
    labels, per_epoch = train_set.labels, sampler.steps_per_epoch
    warmup, decays, total = schedule_steps(args, per_epoch)
    if not args.allow_any_schedule:
        check_schedule(warmup, decays, total)
    paths = {name: os.path.join(args.out, f"{name}.pt") for name in ("checkpoint", "best", "model")}
    model, optimizer, scaler, start, best_loss, input_norm = setup(args, env, labels, paths["checkpoint"])
    agc_params = models.agc_parameters(model, len(labels))
    cpu_group = dist.new_group(backend="gloo") if env.world_size > 1 else None  # for agree()
    models.print0(f"pretrain {args.model} ({args.recipe} recipe): {len(train_set)} train / "
                  f"{len(val_set) if val_set else 0} validation images, {len(labels)} labels, {env.world_size} "
                  f"rank(s) x {args.accum_steps} micro-step(s) x {sampler.micro_batch} images, {per_epoch} "
                  f"steps/epoch, {total} steps, warm-up {warmup}, lr decays at {decays}")

    def save(name, **extra):  # OUT/<name>.pt on rank 0, with what transfer.py needs to know
        models.save_checkpoint(paths[name], model, done, args, labels=labels, task=train_set.meta["task"],
                               model_name=args.model, input_norm=input_norm, **extra)

    done, last_saved, loss_sum, logged, wait = start, start, torch.zeros((), device=env.device), 0, 0.0
    stopping = interrupted = False  # interrupted: stopped during a validation
    warn_if_long_cpu_run(model, total - start, args, env)
    t0, last_log = time.perf_counter(), time.monotonic()
    with models.StopSignals() as stop, models.progress(total, start) as bar:
        for step in range(start, total):
            if step == start or step % per_epoch == 0:  # each epoch its own order; a resume starts mid-epoch
                sampler.set_epoch(step // per_epoch, step % per_epoch)
                loader = iter(models.batch_loader(train_set, sampler, args.workers, env.device))
            # -- the next global batch: this rank's micro-batches, augmented on the device
            t = time.perf_counter()
            micro = next_micro_batches(loader, args.accum_steps, stop)
            if micro is None:  # a stop signal ended the loader's workers: `done` steps are complete
                save("checkpoint", optimizer=optimizer, scaler=scaler, best_loss=best_loss)
                stopping = True
                break
            micro = [(augment(x.to(env.device, non_blocking=True), step, m * env.world_size + env.rank, args, scale),
                      y.to(env.device, non_blocking=True)) for m, (x, y, scale) in enumerate(micro)]
            wait += time.perf_counter() - t
            # -- set the lr; forward, loss and backward per micro-batch (DDP syncs gradients on the
            #    last one only), AGC, optimizer step: models.train_step
            lr = learning_rate(step, args, warmup, decays)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum += models.train_step(model, optimizer, scaler, micro, train_set.multilabel, args.dtype,
                                          agc_params, args.agc)
            done, logged = step + 1, logged + 1
            bar.update()
            # -- log, validate and keep the best, save, stop: every rank after the same step
            stopping, late = agree([stop and done < total, time.monotonic() - last_log >= LOG_SECONDS], cpu_group)
            log = done % args.log_every == 0 or done == total or late
            save_now = done % args.save_every == 0 or done == total or stopping
            if log or save_now:
                loss = mean_loss(loss_sum, logged, model, env, paths["checkpoint"], last_saved)
            if log:
                elapsed = time.perf_counter() - t0
                models.print0(f"step {done}/{total} epoch {done / per_epoch:.2f} loss {loss:.4f} lr {lr:.6f} "
                              f"img/s {logged * args.batch_size / elapsed:.1f} data {100 * wait / elapsed:.1f}%")
                loss_sum.zero_()
                logged, wait, t0, last_log = 0, 0.0, time.perf_counter(), time.monotonic()
            if val_set is not None and not stopping and (done % (args.eval_every or per_epoch) == 0 or done == total):
                t_eval = time.perf_counter()
                r = validate(model, val_set, args, env, sampler.micro_batch, stop)
                if r is None:  # stopped during the validation
                    interrupted = stopping = True
                    break
                models.print0(f"eval step {done} epoch {done / per_epoch:.2f} "
                              + " ".join(f"{k} {v:.4f}" for k, v in r.items()) + f" n {len(val_set)}")
                if r["loss"] < best_loss:
                    best_loss = r["loss"]
                    save("best", val_loss=best_loss)
                t0 += time.perf_counter() - t_eval  # img/s and data % count training only
            if save_now:
                save("checkpoint", optimizer=optimizer, scaler=scaler, best_loss=best_loss)
                last_saved = done
            if stopping:
                break
    if stopping:
        where = f"saved {paths['checkpoint']}"
        if interrupted:  # the checkpoint stays before this step, if one was saved
            where = f"{paths['checkpoint']} holds step {last_saved}" if os.path.exists(paths["checkpoint"]) else \
                "no checkpoint saved yet"
        models.print0(f"stopped by signal {stop.signum or 'on another rank'} after step {done}"
                      f"{' during validation' if interrupted else ''}; {where}; rerun with --resume to continue")
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    save("model")
    models.print0(f"done: {total} steps; final weights {paths['model']}" + (
        f", best validation loss {best_loss:.4f} in {paths['best']}" if val_set is not None else ""))


def warn_if_long_cpu_run(model, steps, args, env):
    """On a CPU, before the first step: one line when the run would take hours, from one image's
    warm forward timed, x2 for the backward (within 1.6x of a batched step's cost per image for
    R14x0.5 and R50x1), times the images this rank trains on."""
    if env.device.type != "cpu":
        return
    with torch.no_grad():  # zeros: no RNG drawn, no state changed (GroupNorm), so resume stays exact
        for _ in range(2):  # the first, cold, is slower
            t = time.perf_counter()
            models.unwrap(model)(torch.zeros(1, 3, args.image_size, args.image_size))
    hours = 2 * (time.perf_counter() - t) * steps * args.batch_size / env.world_size / 3600
    if hours > LONG_CPU_RUN_HOURS:
        models.print0(f"note: the {steps} remaining steps take about {hours:.0f} h on this CPU; shorten the run "
                      f"with --epochs, --image-size, --batch-size or a smaller --model (recipe {args.recipe})")


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
