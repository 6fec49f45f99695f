"""Supervised pre-training of a BiT ResNet-v2 on prepared chest X-ray datasets (Cherti & Jitsev,
arXiv 2106.00116), from scratch or from natural-image weights, on one device or many (DDP).

One GPU (or a CPU):
    python pretrain.py --data data/prepared/chexpert --data data/prepared/mimic \
        --data data/prepared/nih --data data/prepared/padchest --model R50x1 --out runs/r50x1_chest

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
same command trains the same model on 1 GPU with accumulation or on 8 without.

Outputs in --out: args.json; checkpoint.pt, the latest state, written every --save-every steps,
on SIGTERM/SIGINT (the run then exits 0) and at the end; model.pt, the final weights with the
label names and task (load with models.load_weights or transfer.py --init). With --resume a
run continues from checkpoint.pt when it exists (optimizer, scaler, schedule, data order, RNG
state), so a killed or preempted job, or a torchrun restart, resumes where it stopped.
Log lines: `step S/T epoch E loss L lr LR img/s N data P%` and `eval step S epoch E ...`.
"""
import json
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import models
from prepare_data import PreparedDataset


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog="Defaults are BiT's upstream recipe (Kolesnikov et al., "
                                     "arXiv 1912.11370, Sec. 3.3 / App.), which the paper follows.")
    p.add_argument("--data", action="append", required=True, metavar="PREPARED",
                   help="prepared dataset folder (prepare_data.py); repeat to pre-train on several "
                        "sources at once: their labels are united, and a label a source lacks is "
                        "unknown (masked in the loss) for its images")
    p.add_argument("--out", required=True, help="output folder (args.json, checkpoint.pt, model.pt)")
    p.add_argument("--model", default="R50x1", help=f"one of {', '.join(models.MODEL_NAMES)}")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from these weights (official BiT .npz or a checkpoint) instead of "
                        "from scratch; the classifier head starts at zero")
    p.add_argument("--image-size", type=int, default=224, help="training resolution in pixels")
    p.add_argument("--batch-size", type=int, default=4096,
                   help="global batch (all ranks and accumulation steps together); BiT: 4096")
    p.add_argument("--accum-steps", type=int, default=1,
                   help="gradient accumulation micro-steps per optimizer step")
    p.add_argument("--epochs", type=int, default=90, help="training epochs (BiT: 90)")
    p.add_argument("--lr", type=float, default=0.03,
                   help="base learning rate per 256 images; the lr is lr x batch-size / 256 (BiT)")
    p.add_argument("--schedule", choices=["step", "cosine"], default="step",
                   help="step: x0.1 at each of --decay-epochs (BiT); cosine: cosine decay to 0")
    p.add_argument("--decay-epochs", type=int, nargs="*", default=[30, 60, 80],
                   help="epochs at which the step schedule multiplies the lr by 0.1 (BiT)")
    p.add_argument("--warmup-steps", type=int, default=5000,
                   help="linear lr warm-up from 0, in optimizer steps (BiT: 5000)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="L2 weight decay, applied to all parameters as in BiT (GroupNorm and "
                        "biases included)")
    p.add_argument("--agc", type=float, default=0.0,
                   help="Adaptive Gradient Clipping factor, unit-wise, head excluded, eps 1e-3 "
                        "(NFNets use 0.01); 0 disables it")
    p.add_argument("--rotate", type=float, default=45.0, help="random rotation up to +-degrees")
    p.add_argument("--translate", type=float, default=0.1,
                   help="random translation up to this fraction of the side")
    p.add_argument("--zoom", type=float, default=0.1, help="random scale in [1 - zoom, 1 + zoom]")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="autocast precision (fp16 adds a GradScaler); use fp32 on CPUs")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (bitwise-reproducible resumes; slower on GPUs)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order "
                                                       "and augmentation")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between evaluations on the 'valid' split; 0: after every epoch")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists (else start); without it an "
                        "existing checkpoint is an error, so nothing is overwritten by accident")
    return p


# ----------------------------------------------------------------------------------------
# Rules

def learning_rate(step, base_lr, global_batch, steps_per_epoch, total_steps, warmup_steps=5000,
                  schedule="step", decay_epochs=(30, 60, 80)):
    """The lr of optimizer step `step` (0-based): base_lr x global_batch / 256, linear warm-up
    from 0 over warmup_steps (as BiT), then x0.1 at each decay epoch or a cosine decay to 0."""
    lr = base_lr * global_batch / 256
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))
    return lr * 0.1 ** sum(step >= e * steps_per_epoch for e in decay_epochs)


def augmentation_seed(seed, step, micro_batch):
    """Augmentation randomness of one global micro-batch: a function of these numbers only,
    so resumes and any split over ranks / accumulation steps draw the same transforms."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------
# Data

class SourceDataset(torch.utils.data.Dataset):
    """One split of several prepared folders as one dataset. Labels are the union in
    first-seen order; a label a folder does not have is unknown (NaN) for its rows."""

    def __init__(self, folders, split):
        self.parts = [PreparedDataset(f, split) for f in folders]
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


def augment(images, step, micro_batch, args):
    """uint8 NHWC batch already on the device -> augmented float model input (chest
    augmentation: rotation, translation, zoom, horizontal flip, on the device)."""
    gen = torch.Generator(images.device).manual_seed(augmentation_seed(args.seed, step, micro_batch))
    x = models.random_affine(models.to_model_input(images), args.image_size, rotate=args.rotate,
                             translate=args.translate, scale=args.zoom, hflip=True, generator=gen)
    return x.contiguous(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


@torch.no_grad()
def evaluate(model, dataset, env, args, batch_size):
    """Loss and headline metrics on the whole dataset, each rank predicting a strided shard."""
    batches = models.shard_batches(len(dataset), batch_size, env.world_size, env.rank)
    inputs = ((models.to_model_input(x.to(env.device, non_blocking=True), args.image_size,
                                     args.channels_last), y)
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
# Training

def main(args):
    for name in ("batch_size", "accum_steps", "epochs", "log_every", "save_every", "image_size"):
        if getattr(args, name) < 1:
            raise models.UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.model not in models.MODEL_NAMES:
        raise models.UserError(f"unknown model {args.model!r}; choose from {', '.join(models.MODEL_NAMES)}")
    if args.init is not None and not os.path.exists(args.init):
        raise FileNotFoundError(f"--init {args.init} does not exist")
    env = models.setup_distributed()
    try:
        return train(args, env)
    finally:
        models.cleanup_distributed()


def train(args, env):
    device, W, A = env.device, env.world_size, args.accum_steps
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.deterministic

    train_set, val_set = SourceDataset(args.data, "train"), SourceDataset(args.data, "valid")
    sampler = models.GlobalBatchSampler(len(train_set), args.batch_size, W, env.rank, A, args.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise models.UserError(f"the train split has {len(train_set)} images, fewer than one "
                               f"global batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, final_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "model.pt")
    resuming = os.path.exists(ckpt_path)
    if resuming and not args.resume:
        raise models.UserError(f"{ckpt_path} exists: pass --resume to continue that run, or "
                               "choose another --out")

    torch.manual_seed(args.seed)
    model = models.create_model(args.model, len(train_set.labels))
    if args.init is not None and not resuming:
        models.load_weights(model, args.init)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if args.dtype == "fp16" else None
    step = last_saved = 0
    if resuming:
        state = models.load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step = last_saved = state["step"]
        models.restore_rng(state["rng"])
        models.print0(f"resumed from {ckpt_path} at step {step}")
    if env.is_master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    extra = {"labels": train_set.labels, "task": "multilabel" if train_set.multilabel else "multiclass",
             "model_name": args.model}

    eval_model = torch.compile(model) if args.compile else model
    net = eval_model
    if W > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            eval_model, device_ids=[device.index] if device.type == "cuda" else None)
    head = set(model.head.conv.parameters())
    agc_params = [p for p in model.parameters() if p not in head]
    clip = (lambda: models.adaptive_clip_grad(agc_params, args.agc)) if args.agc > 0 else None
    # Stop requests are agreed on over a CPU group each step, so that every rank stops after
    # the same step without a GPU sync.
    stop_group = dist.new_group(backend="gloo") if W > 1 else None
    stop = {"signal": 0}
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    models.print0(f"pretrain {args.model}: {len(train_set)} train / {len(val_set)} valid images, "
                  f"{len(train_set.labels)} labels, {W} rank(s) x {A} micro-step(s) x "
                  f"{sampler.micro_batch} images, {steps_per_epoch} steps/epoch, {total_steps} steps")

    def save(path, with_optimizer=True):
        if env.is_master:
            models.save_checkpoint(path, model, optimizer if with_optimizer else None,
                                   scaler if with_optimizer else None, step, args, extra)

    def run_eval():
        if len(val_set):
            r = evaluate(eval_model, val_set, env, args, sampler.micro_batch)
            models.print0(f"eval step {step} epoch {step / steps_per_epoch:.2f} "
                          + " ".join(f"{k} {v:.4f}" for k, v in r.items()) + f" n {len(val_set)}")

    try:
        loss_sum, logged_steps, wait, t0 = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
        bar = tqdm(total=total_steps, initial=step, disable=not (env.is_master and sys.stderr.isatty()))
        while step < total_steps:
            sampler.set_epoch(step // steps_per_epoch, step % steps_per_epoch)
            batches = iter(models.batch_loader(train_set, sampler, args.workers, device))
            for _ in range(steps_per_epoch - step % steps_per_epoch):
                t = time.perf_counter()
                try:
                    micro = [next(batches) for _ in range(A)]
                except RuntimeError:
                    if not stop["signal"]:
                        raise
                    # The signal ended the loader workers too (scancel signals every process);
                    # the state is still that of a completed step.
                    save(ckpt_path)
                    models.print0(f"stopped by signal {stop['signal']} after step {step}; "
                                  f"saved {ckpt_path}; rerun with --resume to continue")
                    return
                wait += time.perf_counter() - t
                micro = [(augment(x.to(device, non_blocking=True), step, m * W + env.rank, args),
                          y.to(device, non_blocking=True)) for m, (x, y) in enumerate(micro)]
                lr = learning_rate(step, args.lr, args.batch_size, steps_per_epoch, total_steps,
                                   args.warmup_steps, args.schedule, args.decay_epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum += models.train_step(net, optimizer, micro, train_set.multilabel, device,
                                              args.dtype, scaler, clip)
                step += 1
                logged_steps += 1
                bar.update()
                stopping = bool(stop["signal"])
                if stop_group is not None:
                    flag = torch.tensor([int(stopping)])
                    dist.all_reduce(flag, group=stop_group)
                    stopping = bool(flag.item())
                log_now = step % args.log_every == 0 or step == total_steps
                save_now = step % args.save_every == 0 or step == total_steps or stopping
                if log_now or save_now:
                    # Never save a non-finite state: the last good checkpoint stays. (The
                    # weights are the same on every rank, so all ranks decide alike.)
                    total = loss_sum.clone()
                    if W > 1:
                        dist.all_reduce(total)
                    mean_loss = total.item() / W / logged_steps
                    finite_weights = torch.stack([p.isfinite().all() for p in model.parameters()]).all()
                    if not (np.isfinite(mean_loss) and finite_weights.item()):
                        where = (f"the last good checkpoint is {ckpt_path} (step {last_saved})"
                                 if last_saved else "no checkpoint was saved")
                        models.print0(f"pretrain.py: error: non-finite loss ({mean_loss}) or weights "
                                      f"between steps {step - logged_steps + 1} and {step}; "
                                      f"stopped, {where}", file=sys.stderr)
                        raise SystemExit(1)
                if log_now:
                    elapsed = time.perf_counter() - t0
                    models.print0(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
                                  f"loss {mean_loss:.4f} lr {lr:.6f} "
                                  f"img/s {logged_steps * args.batch_size / elapsed:.1f} "
                                  f"data {100 * wait / elapsed:.1f}%")
                    loss_sum.zero_()
                    logged_steps, wait, t0 = 0, 0.0, time.perf_counter()
                if save_now:
                    save(ckpt_path)
                    last_saved = step
                if stopping:
                    models.print0(f"stopped by signal {stop['signal'] or 'on another rank'} after "
                                  f"step {step}; saved {ckpt_path}; rerun with --resume to continue")
                    return
                if (step % args.eval_every == 0 if args.eval_every else step % steps_per_epoch == 0) \
                        or step == total_steps:
                    t_eval = time.perf_counter()
                    run_eval()
                    t0 += time.perf_counter() - t_eval  # img/s and data % count training only
            del batches
        bar.close()
        save(final_path, with_optimizer=False)
        models.print0(f"done: {total_steps} steps; final weights {final_path}")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
