"""Supervised pre-training of a BiT ResNet-v2 on prepared chest X-ray datasets (Cherti & Jitsev,
arXiv 2106.00116), from scratch or from natural-image weights, on one device or many (DDP).
The defaults are the paper's chest recipe (`--recipe paper`, see RECIPES and --help).

One GPU (or a CPU), the paper's global batch of 1024 reached by accumulating 8 micro-batches:
    python pretrain.py --data data/prepared/chexpert --data data/prepared/mimic \
        --data data/prepared/nih --data data/prepared/padchest --model R50x1 \
        --accum-steps 8 --out runs/r50x1_chest

One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 pretrain.py --data ... --model R50x1 \
        --out runs/r50x1_chest --resume

Several nodes (env:// rendezvous), e.g. in a SLURM batch script, one torchrun per node:
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=4 \
        --rdzv_backend=c10d --rdzv_endpoint=$head:29500 --rdzv_id=$SLURM_JOB_ID --max-restarts=1 \
        pretrain.py --data ... --model R50x1 --out runs/r50x1_chest --resume

--batch-size is the global batch: each of the W ranks computes batch-size / (W x accum-steps)
images per micro-step, and the data order depends on (seed, epoch, global batch) only, so the
same command trains the same model on 1 GPU with accumulation or on 8 without. Several --data
folders are pre-trained on together with their labels united (a label a source lacks is
unknown, masked in the loss, for its images); prepare_data.py --dataset merge instead keeps the
intersection, as the paper's combined sources did.

Outputs in --out: args.json (the resolved recipe); checkpoint.pt, the latest state, written
every --save-every steps, on SIGTERM/SIGINT (the run then exits 0) and at the end; best.pt, the
weights with the lowest validation loss so far (the paper's `save_best`, which its transfer
used); model.pt, the final weights. Weights files hold the label names, task, model name and
the input normalisation (load with models.load_weights or transfer.py --init). With --resume a
run continues from checkpoint.pt when it exists (optimizer, scaler, schedule, data order, RNG
state, best validation loss), so a killed or preempted job, or a torchrun restart, resumes
where it stopped; a checkpoint of other training arguments, model or labels is refused.
Log lines: `step S/T epoch E loss L lr LR img/s N data P%` and `eval step S epoch E ...`.
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import models
from prepare_data import PreparedDataset

# The recipes: every recipe flag left at None takes its value from here. base lr is per 256
# images (lr = lr x batch-size / 256). Warm-up and decays in epochs (or steps, "_steps").
# warmup_from: the warm-up starts at lr x warmup_from. crop_area: the random crop's share of the
# image area (RandomResizedCrop), [1, 1] = the whole image. eval_crop: centre crop's share of
# the side at evaluation. Sources: ../shared/paper/recipes.md (the authors' configs).
_CHEST = dict(batch_size=1024, lr=0.01, epochs=90, warmup_epochs=15, warmup_steps=None,
              # the paper ramps from lr / K, K = its 64 workers; ours is fixed, not our world size
              warmup_from=1 / 64, decay_epochs=[30, 60, 80], decay_steps=None, agc=0.01,
              weight_decay=1e-4, image_size=224, rotate=models.CHEST_AUGMENT["rotate"],
              shift=models.CHEST_AUGMENT["translate"], zoom=models.CHEST_AUGMENT["scale"],
              padding=models.CHEST_AUGMENT["padding"], crop_area=[1.0, 1.0], views=["PA", "AP"], input_norm="bit",
              eval_crop=1.0)
_IMAGENET = dict(_CHEST, batch_size=2048, lr=0.1, warmup_epochs=5, agc=0.0, rotate=0.0,
                 shift=0.0, zoom=0.0, padding="zeros", crop_area=[0.08, 1.0], views=None,
                 input_norm="imagenet", eval_crop=224 / 256)
RECIPES = {
    # the paper's chest sources: SGD_AGC, global batch 1024 (16 x 64 GPUs), fp16 in the paper
    "paper": _CHEST,
    # BiT's upstream ImageNet recipe (Kolesnikov et al. 2019) with the chest augmentation
    "bit": dict(_CHEST, batch_size=4096, lr=0.03, warmup_epochs=None, warmup_steps=5000,
                warmup_from=0.0, agc=0.0, shift=0.1, padding="zeros", views=None),
    # the paper's own ImageNet sources: 32 x 64 GPUs, RandomResizedCrop 224 + flip,
    # ImageNet mean / std, evaluation resize 256 / centre crop 224
    "imagenet1k-r50x1": _IMAGENET,
    "imagenet1k-r152x4": dict(_IMAGENET, lr=0.03, agc=0.01),
    "imagenet21k": dict(_IMAGENET, lr=0.01, agc=0.01, warmup_epochs=2),
}
# Arguments that do not change the trained weights: a resume may change them freely.
# (accum_steps: the data order and gradients do not depend on the split of the global batch.)
NOT_TRAINING = {"out", "resume", "resume_changed", "workers", "log_every", "save_every",
                "eval_every", "device", "compile", "channels_last", "deterministic",
                "allow_any_schedule", "accum_steps"}
LOG_SECONDS = 60  # a log line at least this often, however slow the steps
LONG_CPU_RUN_HOURS = 1


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog="Flags marked (recipe) default to the value of --recipe.")
    recipe = lambda help: help + " (recipe)"  # noqa: E731
    p.add_argument("--data", action="append", required=True, metavar="PREPARED",
                   help="prepared dataset folder (prepare_data.py); repeat to pre-train on several "
                        "sources at once: their labels are united, and a label a source lacks is "
                        "unknown (masked in the loss) for its images")
    p.add_argument("--out", required=True, help="output folder (args.json, checkpoint.pt, best.pt, model.pt)")
    p.add_argument("--model", default="R50x1", help=f"one of {', '.join(models.MODEL_NAMES)}")
    p.add_argument("--recipe", choices=list(RECIPES), default="paper",
                   help="paper: the paper's chest recipe (SGD_AGC 0.01, lr 0.01/256 x batch 1024, "
                        "warm-up 15 epochs from lr/64, x0.1 at epochs 30/60/80 of 90, 224 px, "
                        "shift 25%%, scale 10%%, rotation 45, flip, reflect padding, views PA AP); "
                        "bit: BiT's upstream recipe (batch 4096, lr 0.03/256, warm-up 5000 steps "
                        "from 0, no AGC, x0.1 at 30/60/80 of 90, every view); imagenet1k-r50x1: "
                        "the paper's ImageNet-1k R50x1 (plain SGD, lr 0.1/256 x 2048, warm-up 5 "
                        "epochs, RandomResizedCrop + flip, ImageNet mean/std); imagenet1k-r152x4: "
                        "the same with SGD_AGC and lr 0.03/256; imagenet21k: SGD_AGC, lr 0.01/256, "
                        "warm-up 2 epochs")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these weights (official BiT .npz or a checkpoint) instead of "
                        "from scratch; the classifier head starts at zero, and the input "
                        "normalisation is the weights' own")
    p.add_argument("--image-size", type=int, default=None, help=recipe("training resolution in pixels"))
    p.add_argument("--batch-size", type=int, default=None,
                   help=recipe("global batch (all ranks and accumulation steps together)"))
    p.add_argument("--accum-steps", type=int, default=1,
                   help="gradient accumulation micro-steps per optimizer step")
    p.add_argument("--epochs", type=int, default=None, help=recipe("training epochs"))
    p.add_argument("--lr", type=float, default=None,
                   help=recipe("base learning rate per 256 images; the lr is lr x batch-size / 256"))
    warmup = p.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-epochs", type=float, default=None,
                        help=recipe("linear lr warm-up, in epochs"))
    warmup.add_argument("--warmup-steps", type=int, default=None,
                        help=recipe("linear lr warm-up, in optimizer steps"))
    decay = p.add_mutually_exclusive_group()
    decay.add_argument("--decay-epochs", type=float, nargs="*", default=None,
                       help=recipe("epochs at which the lr is multiplied by 0.1"))
    decay.add_argument("--decay-steps", type=int, nargs="*", default=None,
                       help=recipe("optimizer steps at which the lr is multiplied by 0.1"))
    p.add_argument("--allow-any-schedule", action="store_true",
                   help="accept a schedule whose warm-up does not end before the first decay, or "
                        "that never decays before the end (refused otherwise)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=recipe("L2 weight decay, applied to all parameters as in BiT (GroupNorm "
                               "and biases included)"))
    p.add_argument("--agc", type=float, default=None,
                   help=recipe("Adaptive Gradient Clipping factor, unit-wise, head excluded, "
                               "eps 1e-3; 0 disables it"))
    p.add_argument("--rotate", type=float, default=None, help=recipe("random rotation up to +-degrees"))
    p.add_argument("--shift", type=float, default=None,
                   help=recipe("random shift up to this fraction of the side"))
    p.add_argument("--zoom", type=float, default=None, help=recipe("random scale in [1 - zoom, 1 + zoom]"))
    p.add_argument("--views", nargs="+", default=None,
                   help=recipe("X-ray views to train on (e.g. PA AP \"AP Supine\" L COSTAL); "
                               "'all': no filter"))
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: the local rank's GPU if there is one, else cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast precision, fp16 with a GradScaler (default: bf16 on CUDA, fp32 "
                        "on a CPU, where bf16 autocast is slower; the paper used fp16)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (bitwise-reproducible resumes; slower on GPUs)")
    p.add_argument("--workers", type=models.at_least(0), default=None,
                   help="DataLoader worker processes per rank (default: up to 8, fewer than the CPUs)")
    p.add_argument("--seed", type=models.at_least(0), default=42,
                   help="seed of the initialisation, data order and augmentation (paper: 42)")
    p.add_argument("--log-every", type=int, default=20,
                   help=f"steps between log lines (and at least one line every {LOG_SECONDS} s)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between validations; 0: after every epoch (paper)")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists (else start); without it an "
                        "existing checkpoint is an error, so nothing is overwritten by accident")
    p.add_argument("--resume-changed", action="store_true",
                   help="with --resume, accept a checkpoint whose training arguments differ from "
                        "this command's (the new ones apply from the resumed step on)")
    return p


# ----------------------------------------------------------------------------------------
# Rules

def resolve_recipe(args):
    """args with every recipe value the user left at None filled in from RECIPES[args.recipe]
    (a warm-up or decays given in one unit replace the recipe's in the other)."""
    out = argparse.Namespace(**vars(args))
    for key, value in RECIPES[args.recipe].items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    for given, other in [("warmup_steps", "warmup_epochs"), ("warmup_epochs", "warmup_steps"),
                         ("decay_steps", "decay_epochs"), ("decay_epochs", "decay_steps")]:
        if getattr(args, given) is not None:
            setattr(out, other, None)
    if out.views == ["all"]:
        out.views = None
    return out


def schedule_steps(args, steps_per_epoch):
    """(warm-up steps, decay steps, total steps) of the resolved args, in optimizer steps."""
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    else:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    if args.decay_steps is not None:
        decays = list(args.decay_steps)
    else:
        decays = [round(e * steps_per_epoch) for e in args.decay_epochs]
    return warmup, decays, args.epochs * steps_per_epoch


def check_schedule(warmup, decays, total):
    """Refuse (UserError) a warm-up that does not end before the first decay, or a run that
    never decays before its end: with the recipe of another dataset size, both happen."""
    hint = "; change the schedule or pass --allow-any-schedule"
    if decays and warmup >= min(decays):
        raise models.UserError(f"the warm-up ({warmup} steps) does not end before the first lr "
                               f"decay (step {min(decays)}){hint}")
    if not any(0 < d < total for d in decays):
        raise models.UserError(f"the lr never decays before the end of the run ({total} steps; "
                               f"decays at steps {decays or 'none'}){hint}")


def learning_rate(step, args, warmup, decays):
    """The lr of optimizer step `step` (0-based): peak lr x batch / 256, linear warm-up from
    warmup_from x peak, x0.1 at each decay step (from that step on)."""
    return models.step_lr(step, args.lr * args.batch_size / 256, warmup, decays, args.warmup_from)


def augmentation_seed(seed, step, micro_batch):
    """Augmentation randomness of one global micro-batch: a function of these numbers only,
    so resumes and any split over ranks / accumulation steps draw the same transforms."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1)[0])


def first_difference(saved, args, saved_labels, labels):
    """The first difference between a checkpoint's training (arguments, labels) and this run's,
    as text, or None. Arguments in NOT_TRAINING are free to change."""
    if saved_labels != labels:
        return f"its labels are {saved_labels} but the data's are {labels}"
    now = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING}
    for key in sorted(set(now) | {k for k in saved if k not in NOT_TRAINING}):
        if key not in saved or key not in now or saved[key] != now[key]:
            return (f"--{key.replace('_', '-')} is {saved.get(key, 'not recorded')!r} in the "
                    f"checkpoint but {now.get(key, 'not given')!r} now")
    return None


# ----------------------------------------------------------------------------------------
# Data

class SourceDataset(torch.utils.data.Dataset):
    """One split of several prepared folders as one dataset, rows of the given views only
    (None: all). Labels are the union in first-seen order; a label a folder does not have is
    unknown (NaN) for its rows."""

    def __init__(self, folders, split, views=None):
        self.parts = [PreparedDataset(f, split, views=views) for f in folders]
        first = self.parts[0]
        self.multilabel = first.multilabel
        for part in self.parts[1:]:
            if part.multilabel != first.multilabel:
                raise models.UserError(f"{part.folder} is {part.meta['task']} but "
                                       f"{first.folder} is {first.meta['task']}")
            if (part.meta["size"], part.meta["channels"]) != (first.meta["size"], first.meta["channels"]):
                raise models.UserError(f"{part.folder} has {part.meta['size']} px x "
                                       f"{part.meta['channels']} channels but {first.folder} has "
                                       f"{first.meta['size']} x {first.meta['channels']}")
            if not self.multilabel and part.labels != first.labels:
                raise models.UserError("single-label sources must have the same classes")
        self.labels = list(dict.fromkeys(l for part in self.parts for l in part.labels))
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])
        self.columns = [np.array([self.labels.index(l) for l in part.labels]) for part in self.parts]

    def __len__(self):
        return int(self.offsets[-1])

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        first = self.parts[0].meta
        images = torch.empty((len(indices), first["size"], first["size"], first["channels"]), dtype=torch.uint8)
        targets = torch.full((len(indices), len(self.labels)), float("nan"))
        for p in np.unique(which):
            rows = np.flatnonzero(which == p)
            x, y = self.parts[p].__getitems__(indices[rows] - self.offsets[p])
            images[rows] = x
            targets[np.ix_(rows, self.columns[p])] = y
        return images, targets


def training_data(args):
    """The train split, and the split validated on ('valid', else 'test', else None)."""
    train_set = SourceDataset(args.data, "train", args.views)
    if len(train_set) == 0:
        views = "every view" if args.views is None else "views " + ", ".join(args.views)
        raise models.UserError(f"no train images with {views} in {', '.join(args.data)}; "
                               "pass --views all, or the views the data has")
    for split in ("valid", "test"):
        val_set = SourceDataset(args.data, split, args.views)
        if len(val_set):
            if split == "test":  # as the paper validated PadChest on its held-out 10 %
                models.print0(f"no 'valid' split: validating on the 'test' split ({len(val_set)} images)")
            return train_set, val_set
    models.print0("no 'valid' or 'test' split: no validation, no best.pt")
    return train_set, None


def augment(images, step, micro_batch, args):
    """uint8 NHWC batch already on the device -> augmented float model input: the recipe's
    random crop, shift, scale, rotation and horizontal flip, in one resampling on the device."""
    gen = torch.Generator(images.device).manual_seed(augmentation_seed(args.seed, step, micro_batch))
    x = models.random_affine(models.to_model_input(images, norm=args.input_norm), args.image_size,
                             rotate=args.rotate, translate=args.shift, scale=args.zoom, hflip=True,
                             crop_area=args.crop_area, padding=args.padding, generator=gen)
    return x.contiguous(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


def eval_input(images, args):
    """uint8 NHWC batch on the device -> model input: the centre eval_crop of the side,
    resized to image-size."""
    side = images.shape[1]
    keep = round(side * args.eval_crop)
    start = (side - keep) // 2
    images = images[:, start:start + keep, start:start + keep]
    return models.to_model_input(images, args.image_size, args.channels_last, args.input_norm)


@torch.no_grad()
def validate(model, dataset, env, args, batch_size):
    """Loss and headline metrics on the whole dataset, each rank predicting a strided shard."""
    batches = models.shard_batches(len(dataset), batch_size, env.world_size, env.rank)
    inputs = ((eval_input(x.to(env.device, non_blocking=True), args), y)
              for x, y in models.batch_loader(dataset, batches, args.workers, env.device))
    if batches:
        logits, targets = models.predict(model, inputs, env.device, args.dtype)
    else:  # more ranks than rows
        logits = targets = np.zeros((0, len(dataset.labels)), np.float32)
    logits = models.gather_in_order(logits, env.world_size)
    targets = models.gather_in_order(targets, env.world_size)
    out = {"loss": models.loss_fn(torch.from_numpy(logits), torch.from_numpy(targets),
                                  dataset.multilabel).item()}
    out.update(models.headline_metrics(logits, targets, dataset.multilabel))
    return out


# ----------------------------------------------------------------------------------------
# Training: setup / resume, one step, bookkeeping, the loop

def main(args):
    args = resolve_recipe(args)
    for name in ("batch_size", "accum_steps", "epochs", "log_every", "save_every", "image_size"):
        if getattr(args, name) < 1:
            raise models.UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.model not in models.MODEL_NAMES:
        raise models.UserError(f"unknown model {args.model!r}; choose from {', '.join(models.MODEL_NAMES)}")
    if args.init is not None and not os.path.isfile(args.init):
        raise FileNotFoundError(f"--init {args.init} does not exist or is not a file")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise models.UserError(f"--device {args.device}: no CUDA GPU is available here")
    models.check_out(args.out, args.data, "--data")
    env = models.setup_distributed(args.device)
    args.dtype = args.dtype or models.default_dtype(env.device)
    args.workers = models.default_workers() if args.workers is None else args.workers
    try:
        # The folder is this run's (rank 0 writes every file in it): a second run exits 2.
        with models.folder_lock(args.out) if env.is_master else contextlib.nullcontext():
            return train(args, env)
    finally:
        models.cleanup_distributed()


class Run:
    """Everything one training run holds: data, model, optimizer, schedule, position."""


def setup(args, env):
    """Data, model (compiled and DDP-wrapped as asked), optimizer, scaler and schedule, resumed
    from OUT/checkpoint.pt when there is one."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.deterministic
    run = Run()
    run.train_set, run.val_set = training_data(args)
    run.sampler = models.GlobalBatchSampler(len(run.train_set), args.batch_size, env.world_size,
                                            env.rank, args.accum_steps, args.seed)
    run.steps_per_epoch = run.sampler.steps_per_epoch
    if run.steps_per_epoch == 0:
        raise models.UserError(f"the train split has {len(run.train_set)} images, fewer than one "
                               f"global batch of {args.batch_size}")
    run.warmup, run.decays, run.total_steps = schedule_steps(args, run.steps_per_epoch)
    if not args.allow_any_schedule:
        check_schedule(run.warmup, run.decays, run.total_steps)
    run.paths = {name: os.path.join(args.out, f"{name}.pt") for name in ("checkpoint", "best", "model")}
    resuming = os.path.exists(run.paths["checkpoint"])
    if resuming and not args.resume:
        raise models.UserError(f"{run.paths['checkpoint']} exists: pass --resume to continue that "
                               "run, or choose another --out")
    run.labels = run.train_set.labels
    torch.manual_seed(args.seed)
    bare = models.create_model(args.model, len(run.labels))
    run.input_norm = args.input_norm
    if args.init is not None and not resuming:
        run.input_norm = models.load_weights(bare, args.init)
        if run.input_norm != args.input_norm:
            models.print0(f"input normalisation {run.input_norm!r}: that of the --init weights")
    bare.to(env.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    run.optimizer = torch.optim.SGD(bare.parameters(), lr=0.0, momentum=args.momentum, nesterov=True,
                                    weight_decay=args.weight_decay)
    run.scaler = torch.amp.GradScaler(env.device.type) if args.dtype == "fp16" else None
    run.step, run.last_saved, run.best_loss = 0, 0, float("inf")
    if resuming:
        resume(run, bare, args)
    models.save_args(args.out, args)
    head = set(bare.head.conv.parameters())
    agc_params = [p for p in bare.parameters() if p not in head]
    run.clip = (lambda: models.adaptive_clip_grad(agc_params, args.agc)) if args.agc > 0 else None
    run.model = models.wrap_ddp(torch.compile(bare) if args.compile else bare, env)
    # Stop and log requests are agreed on over a CPU group each step, so that every rank acts
    # after the same step without a GPU sync.
    run.agree_group = dist.new_group(backend="gloo") if env.world_size > 1 else None
    return run


def resume(run, bare, args):
    """Load OUT/checkpoint.pt into the run, refusing one of other training (one line)."""
    path = run.paths["checkpoint"]
    state = models.load_checkpoint(path)
    if not all(isinstance(state.get(k), t) for k, t in [("model", dict), ("args", dict), ("step", int),
                                                         ("optimizer", dict)]):
        raise models.UserError(f"{path} is not a pretrain.py checkpoint; move it away or choose another --out")
    difference = first_difference(state["args"], args, state.get("labels"), run.labels)
    if difference and not args.resume_changed:
        raise models.UserError(f"{path} is of another training: {difference}; pass --resume-changed "
                               "to continue with the change, or choose another --out")
    if difference:
        models.print0(f"resuming with a change: {difference}")
    try:
        bare.load_state_dict(state["model"])
    except RuntimeError:
        raise models.UserError(f"{path} does not fit {args.model} with {len(run.labels)} labels") from None
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.step = run.last_saved = state["step"]
    run.best_loss = state.get("best_loss", float("inf"))
    run.input_norm = state.get("input_norm", run.input_norm)
    models.restore_rng(state["rng"])
    models.print0(f"resumed from {path} at step {run.step}")


def save(run, args, env, name, **extra):
    """Write OUT/<name>.pt on rank 0: checkpoint (with optimizer and scaler), best or model."""
    if env.is_master:
        full = name == "checkpoint"
        info = {"labels": run.labels, "task": "multilabel" if run.train_set.multilabel else "multiclass",
                "model_name": args.model, "input_norm": run.input_norm, **extra}
        if full:
            info["best_loss"] = run.best_loss
        models.save_checkpoint(run.paths[name], run.model, run.optimizer if full else None,
                               run.scaler if full else None, run.step, args, info)
    if name == "checkpoint":
        run.last_saved = run.step


def train_one_step(run, micro, args, env):
    """Augment the micro-batches, set the lr, one optimizer step; the loss as a 0-d tensor."""
    micro = [(augment(x.to(env.device, non_blocking=True), run.step, m * env.world_size + env.rank, args),
              y.to(env.device, non_blocking=True)) for m, (x, y) in enumerate(micro)]
    run.lr = learning_rate(run.step, args, run.warmup, run.decays)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    return models.train_step(run.model, run.optimizer, micro, run.train_set.multilabel, env.device,
                             args.dtype, run.scaler, run.clip)


class Meter:
    """Loss, images and data-wait time since the last log line."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self):
        self.loss.zero_()
        self.steps, self.wait, self.t0 = 0, 0.0, time.perf_counter()


def agree(run, flags):
    """Each flag True on every rank if it is True on any (one CPU all-reduce)."""
    if run.agree_group is None:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags])
    dist.all_reduce(t, group=run.agree_group)
    return [bool(v) for v in t.tolist()]


def mean_loss_if_finite(run, meter, env):
    """The mean loss since the last log line; exits 1 with one line if it or the weights are
    not finite, so that a non-finite state is never saved (all ranks decide alike: the weights
    are the same everywhere)."""
    total = meter.loss.clone()
    if env.world_size > 1:
        dist.all_reduce(total)
    loss = total.item() / env.world_size / max(meter.steps, 1)
    finite_weights = torch.stack([p.isfinite().all() for p in run.model.parameters()]).all().item()
    if not (np.isfinite(loss) and finite_weights):
        where = (f"the last good checkpoint is {run.paths['checkpoint']} (step {run.last_saved})"
                 if run.last_saved else "no checkpoint was saved")
        models.print0(f"pretrain.py: error: non-finite loss ({loss}) or weights between steps "
                      f"{run.step - meter.steps + 1} and {run.step}; stopped, {where}", file=sys.stderr)
        raise SystemExit(1)
    return loss


def log_step(run, meter, loss, args):
    elapsed = time.perf_counter() - meter.t0
    models.print0(f"step {run.step}/{run.total_steps} epoch {run.step / run.steps_per_epoch:.2f} "
                  f"loss {loss:.4f} lr {run.lr:.6f} img/s {meter.steps * args.batch_size / elapsed:.1f} "
                  f"data {100 * meter.wait / elapsed:.1f}%")
    meter.reset()


def validate_and_keep_best(run, args, env):
    """One validation line; best.pt when the validation loss is the lowest so far."""
    r = validate(getattr(run.model, "module", run.model),  # under DDP the module: shards differ,
                 run.val_set, env, args, run.sampler.micro_batch)  # so no collective may run
    models.print0(f"eval step {run.step} epoch {run.step / run.steps_per_epoch:.2f} "
                  + " ".join(f"{k} {v:.4f}" for k, v in r.items()) + f" n {len(run.val_set)}")
    if r["loss"] < run.best_loss:
        run.best_loss = r["loss"]
        save(run, args, env, "best", val_loss=r["loss"])


def warn_if_long_cpu_run(run, seconds_per_step, args, env):
    hours = (run.total_steps - run.step) * seconds_per_step / 3600
    if env.device.type == "cpu" and hours > LONG_CPU_RUN_HOURS:
        models.print0(f"note: at {seconds_per_step:.1f} s per step the {run.total_steps - run.step} "
                      f"remaining steps take about {hours:.0f} h on this CPU; shorten the run with "
                      f"--epochs, --image-size, --batch-size or a smaller --model (recipe {args.recipe})")


def next_micro_batches(loader, n, stop):
    """The next n micro-batches, or None when a stop signal has ended the loader workers (a
    scancel signals every process): the state is then still that of a completed step."""
    try:
        return [next(loader) for _ in range(n)]
    except RuntimeError:
        if not stop:
            raise
        return None


def train(args, env):
    run = setup(args, env)
    models.print0(f"pretrain {args.model} ({args.recipe} recipe): {len(run.train_set)} train / "
                  f"{len(run.val_set) if run.val_set else 0} validation images, {len(run.labels)} labels, "
                  f"{env.world_size} rank(s) x {args.accum_steps} micro-step(s) x {run.sampler.micro_batch} "
                  f"images, {run.steps_per_epoch} steps/epoch, {run.total_steps} steps, warm-up "
                  f"{run.warmup}, lr decays at {run.decays}")
    meter, last_log, first_step = Meter(env.device), time.monotonic(), True
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (env.is_master and sys.stderr.isatty()))
    with models.StopSignals() as stop:
        while run.step < run.total_steps:
            run.sampler.set_epoch(run.step // run.steps_per_epoch, run.step % run.steps_per_epoch)
            loader = iter(models.batch_loader(run.train_set, run.sampler, args.workers, env.device))
            for _ in range(run.steps_per_epoch - run.step % run.steps_per_epoch):
                t = time.perf_counter()
                micro = next_micro_batches(loader, args.accum_steps, stop)
                if micro is None:
                    save(run, args, env, "checkpoint")
                    return stopped(run, stop)
                meter.wait += time.perf_counter() - t
                meter.loss += train_one_step(run, micro, args, env)
                if first_step:
                    warn_if_long_cpu_run(run, time.perf_counter() - t, args, env)
                    first_step = False
                run.step += 1
                meter.steps += 1
                bar.update()
                end = run.step == run.total_steps
                stopping, late = agree(run, [stop, time.monotonic() - last_log >= LOG_SECONDS])
                log_now = run.step % args.log_every == 0 or end or late
                save_now = run.step % args.save_every == 0 or end or stopping
                if log_now or save_now:
                    loss = mean_loss_if_finite(run, meter, env)
                if log_now:
                    log_step(run, meter, loss, args)
                    last_log = time.monotonic()
                epoch_end = run.step % (args.eval_every or run.steps_per_epoch) == 0 or end
                if epoch_end and run.val_set is not None and not stopping:
                    t_eval = time.perf_counter()
                    validate_and_keep_best(run, args, env)
                    meter.t0 += time.perf_counter() - t_eval  # img/s and data % count training only
                if save_now:
                    save(run, args, env, "checkpoint")
                if stopping:
                    return stopped(run, stop)
            del loader
    bar.close()
    save(run, args, env, "model")
    models.print0(f"done: {run.total_steps} steps; final weights {run.paths['model']}"
                  + (f", best validation loss {run.best_loss:.4f} in {run.paths['best']}"
                     if run.val_set is not None else ""))


def stopped(run, stop):
    models.print0(f"stopped by signal {stop.signum or 'on another rank'} after step {run.step}; "
                  f"saved {run.paths['checkpoint']}; rerun with --resume to continue")


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
