"""BiT ResNet-v2 models and the training machinery shared by pretrain.py and transfer.py.

The network follows Kolesnikov et al., "Big Transfer (BiT)" (arXiv 1912.11370) and
the reference PyTorch code (google-research/big_transfer, bit_pytorch/models.py): module
names are the same (`root.conv`, `body.block1.unit01.gn1`, `head.conv`, ...), so the
checkpoints released with Cherti & Jitsev (arXiv 2106.00116) load without renaming.

    import models
    model = models.create_model("R50x1", num_classes=7)
    models.load_weights(model, "BiT-M-R50x1.npz")          # head replaced by a zero head

Inputs are RGB in [-1, 1] (BiT's convention); `to_model_input` does the conversion from
the uint8 batches that prepare_data.py produces.
"""
import argparse
import contextlib
import math
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Command lines: every script reports bad input as one line and exits with status 2

class UserError(ValueError):
    """Bad input from the user (unknown model, missing file, bad CSV): one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and one-line errors (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_cli(main, parser, argv=None):
    """Parse argv and run main(args); a UserError or missing file becomes a one-line error."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (UserError, FileNotFoundError) as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------------------
# Network

WS_EPS = 1e-10  # Weight Standardization eps of the official BiT code (TF and PyTorch)
GN_EPS = 1e-5   # GroupNorm eps of the official BiT code (tf.contrib / nn.GroupNorm default)
GN_GROUPS = 32


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization: each output filter is normalised to zero mean
    and unit (biased) variance over (in, kh, kw) before the convolution. The stored weight
    is the raw one, as in the official checkpoints."""

    def forward(self, x):
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var + WS_EPS)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNorm(nn.Module):
    """GroupNorm written out: statistics per (sample, group) over (channels of the group,
    H, W), biased variance, then a per-channel affine transform. Same parameters
    (`weight`, `bias`) and numerics as nn.GroupNorm."""

    def __init__(self, num_groups, num_channels, eps=GN_EPS):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        n, c = x.shape[:2]
        g = self.num_groups
        var, mean = torch.var_mean(x.reshape(n, g, -1), dim=2, keepdim=True, unbiased=False)
        rstd = torch.rsqrt(var + self.eps)                                  # (n, g, 1)
        # Fold normalisation and affine into one per-(sample, channel) scale and shift, so
        # the full-size tensor is read once more and written once: y = x * scale + shift.
        scale = (self.weight.view(1, g, c // g) * rstd).reshape(n, c)
        shift = self.bias.view(1, c) - (mean * scale.view(n, g, c // g)).reshape(n, c)
        shape = (n, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


def conv3x3(cin, cout, stride=1):
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (ResNet-v2). The stride sits on the 3x3 conv (BiT's
    choice; the original ResNet-v2 strides the first 1x1), and the projection shortcut
    takes the pre-activated input, not the raw one."""

    def __init__(self, cin, cout, cmid, stride=1):
        super().__init__()
        self.gn1 = GroupNorm(GN_GROUPS, cin)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = GroupNorm(GN_GROUPS, cmid)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn3 = GroupNorm(GN_GROUPS, cmid)
        self.conv3 = conv1x1(cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)

    def forward(self, x):
        out = self.relu(self.gn1(x))
        residual = self.downsample(out) if hasattr(self, "downsample") else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual


class ResNetV2(nn.Module):
    def __init__(self, block_units, width_factor, num_classes):
        super().__init__()
        wf = width_factor
        self.width_factor, self.block_units = wf, tuple(block_units)
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, 64 * wf, kernel_size=7, stride=2, padding=3, bias=False)),
            # Zero-pad then pool without padding, as the TF code does. MaxPool2d(padding=1)
            # is subtly different: it pads with -inf, and the input here can be negative.
            ("pad", nn.ConstantPad2d(1, 0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        blocks = []
        cin = 64 * wf
        for i, units in enumerate(block_units):
            cmid, cout = 64 * wf * 2 ** i, 256 * wf * 2 ** i
            stride = 1 if i == 0 else 2
            block = [("unit01", PreActBottleneck(cin, cout, cmid, stride))]
            block += [(f"unit{u:02d}", PreActBottleneck(cout, cout, cmid)) for u in range(2, units + 1)]
            blocks.append((f"block{i + 1}", nn.Sequential(OrderedDict(block))))
            cin = cout
        self.body = nn.Sequential(OrderedDict(blocks))
        self.num_features = cin
        self.head = nn.Sequential(OrderedDict([
            ("gn", GroupNorm(GN_GROUPS, cin)),
            ("relu", nn.ReLU(inplace=True)),
            ("avg", nn.AdaptiveAvgPool2d(output_size=1)),
            ("conv", nn.Conv2d(cin, num_classes, kernel_size=1, bias=True)),
        ]))

    def forward_features(self, x):
        """Pre-logit features: after the head's GroupNorm, ReLU and global average pool."""
        x = self.body(self.root(x))
        return self.head.avg(self.head.relu(self.head.gn(x))).flatten(1)

    def forward(self, x):
        return self.head.conv(self.forward_features(x)[:, :, None, None]).flatten(1)

    def reset_head(self, num_classes):
        """A new zero-initialised classifier (BiT's transfer recipe)."""
        self.head.conv = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)
        nn.init.zeros_(self.head.conv.weight)
        nn.init.zeros_(self.head.conv.bias)
        return self


# Block units per stage. R14 and R26 are small members of the same family for CPU demos
# and tests (timm has resnetv2_26 / resnetv2_14-like layouts too).
ARCHS = {"R14": (1, 1, 1, 1), "R26": (2, 2, 2, 2), "R50": (3, 4, 6, 3), "R101": (3, 4, 23, 3),
         "R152": (3, 8, 36, 3)}
MODEL_NAMES = ["R14x1", "R26x1", "R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"]


def create_model(name, num_classes):
    """A randomly initialised BiT ResNet-v2 by name (see MODEL_NAMES)."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    depth, wf = name.split("x")
    return ResNetV2(ARCHS[depth], int(wf), num_classes)


# ----------------------------------------------------------------------------------------
# Device-side input pipeline: uint8 NHWC batches in, model-ready float NCHW out

def to_model_input(images, out_size=None, channels_last=False):
    """uint8 (N, H, W, C) with C in {1, 3} -> float (N, 3, out, out) in [-1, 1]. Grayscale
    is repeated to 3 channels so that natural-image weights apply unchanged."""
    x = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if out_size is not None and x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def random_affine(x, out_size, crop=1.0, rotate=0.0, translate=0.0, scale=0.0, hflip=True,
                  generator=None):
    """One random affine per image, applied with a single grid_sample: a crop of `crop` of the
    side at a random place (BiT's resize-then-random-crop), rotation in [-rotate, rotate]
    degrees, translation up to `translate` of the side, zoom in [1-scale, 1+scale] and a
    horizontal flip with probability 1/2. Outside the image is filled with -1 (black)."""
    n, dev = x.shape[0], x.device

    def uniform(lo, hi):
        return torch.rand(n, generator=generator, device=generator.device if generator else "cpu"
                          ).to(dev) * (hi - lo) + lo

    angle = uniform(-rotate, rotate) * (math.pi / 180)
    zoom = uniform(1 - scale, 1 + scale)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    # theta maps output coordinates to input coordinates in [-1, 1] units.
    s = crop / zoom
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    tx = uniform(-(1 - crop), 1 - crop) + uniform(-2 * translate, 2 * translate)
    ty = uniform(-(1 - crop), 1 - crop) + uniform(-2 * translate, 2 * translate)
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), (n, x.shape[1], out_size, out_size), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


# ----------------------------------------------------------------------------------------
# Loss and metrics

def loss_fn(logits, targets, multilabel):
    """Multi-label: binary cross-entropy averaged over the known entries (NaN = unknown,
    masked). Single-label: cross-entropy against the target distribution (one-hot, or
    mixed by MixUp)."""
    logits = logits.float()
    if multilabel:
        known = ~torch.isnan(targets)
        loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)
    return F.cross_entropy(logits, targets)


def roc_auc(scores, labels):
    """Area under the ROC curve of one binary problem (ties get half credit), NaN when only
    one class is present. Mann-Whitney U computed from average ranks."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average rank over runs of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels):
    """Average precision (area under the step precision-recall curve, as scikit-learn's
    average_precision_score), NaN without positives."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied run
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def column_metric(metric, scores, targets):
    """metric per label column, skipping unknown (NaN) targets."""
    out = []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        out.append(metric(scores[known, j], targets[known, j] > 0.5))
    return np.array(out)


def headline_metrics(logits, targets, multilabel):
    """The figures logged at evaluation: accuracy (single-label), mean ROC AUC and mean
    average precision over labels that have both classes."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    if multilabel:
        scores = 1 / (1 + np.exp(-logits))
        out = {}
    else:
        scores = np.exp(logits - logits.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
        out = {"accuracy": float((logits.argmax(1) == targets.argmax(1)).mean())}
    out["auc"] = float(np.nanmean(column_metric(roc_auc, scores, targets)))
    out["map"] = float(np.nanmean(column_metric(average_precision, scores, targets)))
    return out


# ----------------------------------------------------------------------------------------
# Distributed setup, rank-0 helpers, checkpoints

class DistEnv:
    """What torchrun told this process: rank, local rank, world size, and its device."""

    def __init__(self, rank, local_rank, world_size, device):
        self.rank, self.local_rank, self.world_size, self.device = rank, local_rank, world_size, device
        self.is_master = rank == 0


def setup_distributed(device=None):
    """Init from the RANK / LOCAL_RANK / WORLD_SIZE env that torchrun sets (env://
    rendezvous); a plain `python script.py` is a world of one. nccl on GPUs, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, local_rank, world_size, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def unwrap(model):
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path, model, optimizer=None, scaler=None, step=0, args=None, extra=None):
    """Bare-module weights plus whatever is needed to resume, written to a temp file and
    renamed so that a crash never leaves a truncated checkpoint under the real name."""
    state = {"model": unwrap(model).state_dict(), "step": step,
             "args": dict(vars(args)) if args is not None else {},
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state.update(extra or {})
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint as a dict of tensors and plain values; never executes pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------
# Train and eval steps shared by pretrain.py and transfer.py

def autocast(device, dtype):
    """Mixed-precision context for --dtype bf16 | fp16 | fp32."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def train_step(model, optimizer, micro_batches, multilabel, device, dtype="fp32", scaler=None,
               clip=None):
    """One optimiser step over a list of (input, target) micro-batches (gradient
    accumulation). Under DDP, gradients are all-reduced only on the last micro-batch.
    `clip` is called on the unscaled gradients before the step. Returns the mean loss as a
    0-d tensor (no host sync here)."""
    model.train()
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                logits = model(x)
            loss = loss_fn(logits, y, multilabel) / len(micro_batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip is not None:
        clip()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def predict(model, batches, device, dtype="fp32"):
    """Logits and targets for an iterable of (input, target) batches, as float32 numpy."""
    model.eval()
    logits, targets = [], []
    for x, y in batches:
        with autocast(device, dtype):
            logits.append(model(x).float().cpu())
        targets.append(y.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def gather_in_order(array, world_size):
    """Rows predicted on rank r for indices r, r + W, r + 2W, ... -> all rows in index order,
    on every rank. Shards differ by at most one row, so nothing is padded or counted twice."""
    if world_size == 1:
        return array
    parts = [None] * world_size
    dist.all_gather_object(parts, array)
    n = sum(len(p) for p in parts)
    out = np.empty((n,) + array.shape[1:], array.dtype)
    for r, p in enumerate(parts):
        out[r::world_size] = p
    return out
