"""BiT ResNet-v2 models and the training machinery shared by pretrain.py and transfer.py.

The network follows Kolesnikov et al., "Big Transfer (BiT)" (arXiv 1912.11370) and
the reference PyTorch code (google-research/big_transfer, bit_pytorch/models.py): module
names are the same (`root.conv`, `body.block1.unit01.gn1`, `head.conv`, ...), so the
checkpoints released with Cherti & Jitsev (arXiv 2106.00116) load without renaming.

    import models
    model = models.create_model("R50x1", num_classes=7)
    norm = models.load_weights(model, "BiT-M-R50x1.npz")   # head replaced by a zero head
    x = models.to_model_input(uint8_batch, 224, norm=norm)  # "bit": [-1, 1]; or ImageNet mean/std

Three parts, each under one divider: the network (depends on nothing below), the weight
formats, and the training machinery shared by the scripts.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import re
import signal
import socket
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class UserError(ValueError):
    """Bad input from the user (unknown model, missing file, bad CSV): one line, exit 2."""


# ========================================================================================
# Network: BiT ResNet-v2 (depends on nothing below)
# ========================================================================================

WS_EPS = 1e-10  # Weight Standardization eps of the official BiT code (TF and PyTorch)
GN_EPS = 1e-5   # GroupNorm eps of the official BiT code (tf.contrib / nn.GroupNorm default)
GN_GROUPS = 32


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization: each output filter is normalised to zero mean
    and unit (biased) variance over (in, kh, kw) before the convolution,
    w' = (w - mean) / sqrt(var + WS_EPS). The stored weight is the raw one, as in the
    official checkpoints.

    timm's StdConv2d for BiT uses eps 1e-8 instead of 1e-10; that is the only numerical
    difference (with timm's eps set to 1e-10 the logits are bitwise equal). It changes each
    filter's scale by eps / (2 var) relative: filter variances are >= ~7e-5 at random init
    (1 / (3 fan_in), fan_in <= 4608) and larger in trained BiT weights, so <= 1e-4 relative,
    below what the weights were trained to resolve; random-init R101 logits differ by ~1e-4."""

    fused = True  # False: the formula as written below (BiT's two lines); both give the same

    def forward(self, x):
        if not self.fused:
            var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (self.weight - mean) / torch.sqrt(var + WS_EPS)
        else:
            # The same formula as one kernel forward and one backward: batch_norm in training
            # mode over the (1, out, in*kh*kw) view has one "channel" per filter, biased
            # variance, eps inside the sqrt (bench/bench_models.py times both).
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                             training=True, momentum=0.0, eps=WS_EPS).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNorm(nn.GroupNorm):
    """GroupNorm as BiT uses it: statistics per (sample, group of GN_GROUPS channels) over
    the group's channels and H, W; biased variance; eps GN_EPS; then a per-channel affine
    transform. Parameters `weight` and `bias` (nn.GroupNorm's names)."""

    fused = True  # False: the formula as written below; both give the same

    def __init__(self, num_groups, num_channels, eps=GN_EPS):
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x):
        if not self.fused:
            n, c = x.shape[:2]
            g = x.float().reshape(n, self.num_groups, -1)  # statistics in fp32 as the kernel's
            var, mean = torch.var_mean(g, dim=-1, keepdim=True, unbiased=False)
            y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape).to(x.dtype)
            return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        # PyTorch's fused kernel: one pass over the activations forward and backward instead
        # of one per op (bench/bench_models.py times both, eager and compiled).
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


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
            ("conv", StdConv2d(3, round(64 * wf), kernel_size=7, stride=2, padding=3, bias=False)),
            # Zero-pad then pool without padding, as the TF code does. MaxPool2d(padding=1)
            # is subtly different: it pads with -inf, and the input here can be negative.
            ("pad", nn.ConstantPad2d(1, 0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        blocks = []
        cin = round(64 * wf)
        for i, units in enumerate(block_units):
            cmid, cout = round(64 * wf * 2 ** i), round(256 * wf * 2 ** i)
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
# and tests (timm has resnetv2_26 / resnetv2_14-like layouts too); R14x0.5, at half width,
# is the CPU demo's: a step costs a quarter of R14x1's, as the work scales with the weights.
ARCHS = {"R14": (1, 1, 1, 1), "R26": (2, 2, 2, 2), "R50": (3, 4, 6, 3), "R101": (3, 4, 23, 3),
         "R152": (3, 8, 36, 3)}
MODEL_NAMES = ["R14x0.5", "R14x1", "R26x1", "R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"]


def create_model(name, num_classes):
    """A randomly initialised BiT ResNet-v2 by name (see MODEL_NAMES)."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    depth, wf = name.split("x")
    return ResNetV2(ARCHS[depth], float(wf) if "." in wf else int(wf), num_classes)


# ========================================================================================
# Weight formats: Google's BiT .npz, the paper's model.pth.tar, timm, our checkpoints
# ========================================================================================

def unwrap(model):
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# Input normalisation a set of weights was trained with: (mean, std) per RGB channel of the
# image in [0, 1]. "bit": (x - 0.5) / 0.5 = [-1, 1], Google's BiT and the paper's chest
# sources; "imagenet": the paper's own ImageNet-1k/21k checkpoints (torchvision's statistics).
INPUT_NORMS = {"bit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


# Parameters of one bottleneck unit: our name -> the official BiT (TF) scope inside the unit.
_BIT_UNIT = {"gn1": "a/group_norm", "conv1": "a/standardized_conv2d", "gn2": "b/group_norm",
             "conv2": "b/standardized_conv2d", "gn3": "c/group_norm", "conv3": "c/standardized_conv2d",
             "downsample": "a/proj/standardized_conv2d"}
_BIT_TOP = {"root.conv.weight": "root_block/standardized_conv2d/kernel",
            "head.gn.weight": "group_norm/gamma", "head.gn.bias": "group_norm/beta",
            "head.conv.weight": "head/conv2d/kernel", "head.conv.bias": "head/conv2d/bias"}


def _bit_key(name):
    """Our parameter name -> key in the official .npz (body.block1.unit01.gn1.weight ->
    resnet/block1/unit01/a/group_norm/gamma)."""
    if name in _BIT_TOP:
        return "resnet/" + _BIT_TOP[name]
    _, block, unit, layer, kind = name.split(".")
    leaf = "kernel" if "conv" in _BIT_UNIT[layer] else {"weight": "gamma", "bias": "beta"}[kind]
    return f"resnet/{block}/{unit}/{_BIT_UNIT[layer]}/{leaf}"


def _our_key(key):
    """Inverse of _bit_key; an unknown key comes back unchanged (reported as unexpected)."""
    scope = key.removeprefix("resnet/")
    top = {v: k for k, v in _BIT_TOP.items()}
    if scope in top:
        return top[scope]
    block, unit, rest = (scope.split("/", 2) + ["", ""])[:3]
    layer = {v: k for k, v in _BIT_UNIT.items()}.get(rest.rpartition("/")[0])
    kind = {"kernel": "weight", "gamma": "weight", "beta": "bias"}.get(rest.rpartition("/")[2])
    return f"body.{block}.{unit}.{layer}.{kind}" if layer and kind else key


def from_bit_npz(arrays):
    """Official BiT .npz arrays (a mapping key -> numpy array) -> our state dict. Conv
    kernels are stored HWIO and become OIHW; GroupNorm gamma/beta and the head bias are 1-D."""
    state = {}
    for key in arrays:
        a = np.asarray(arrays[key])
        state[_our_key(key)] = torch.from_numpy(a.transpose(3, 2, 0, 1).copy() if a.ndim == 4 else a)
    return state


def export_bit_npz(model, path):
    """Write the model's weights as an .npz in the official BiT layout (float32, kernels
    HWIO), readable by load_weights, timm's load_pretrained and the BiT reference code."""
    arrays = {}
    for name, t in unwrap(model).state_dict().items():
        a = t.detach().float().cpu().numpy()
        arrays[_bit_key(name)] = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
    with atomic_write(path, "wb") as f:  # a file object, so that numpy does not append ".npz"
        np.savez(f, **arrays)


# timm's resnetv2_*_bit names outside the stages -> ours
_TIMM_TOP = {"stem.conv.": "root.conv.", "norm.": "head.gn.", "head.fc.": "head.conv."}


def _swap_prefix(name, table):
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def from_timm_state_dict(state):
    """timm ResNetV2 BiT state dict (stem.conv.weight, stages.0.blocks.0.norm1.weight, ...,
    norm.weight, head.fc.weight) -> ours. timm counts stages and blocks from 0, BiT from 1;
    timm's GroupNormAct norm1..3 are our gn1..3 (the ReLU is a separate module here)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(norm\d|conv\d|downsample\.conv)\.", k)
        if m:
            layer = "downsample" if m[3] == "downsample.conv" else m[3].replace("norm", "gn")
            k = f"body.block{int(m[1]) + 1}.unit{int(m[2]) + 1:02d}.{layer}." + k[m.end():]
        out[_swap_prefix(k, _TIMM_TOP)] = v
    return out


def to_timm_state_dict(state):
    """Our state dict -> timm's names (the inverse of from_timm_state_dict)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"body\.block(\d+)\.unit(\d+)\.(gn\d|conv\d|downsample)\.", k)
        if m:
            layer = "downsample.conv" if m[3] == "downsample" else m[3].replace("gn", "norm")
            k = f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{layer}." + k[m.end():]
        out[_swap_prefix(k, {v: k for k, v in _TIMM_TOP.items()})] = v
    return out


def _paper_input_norm(path):
    """The input normalisation of one of the paper's released `model.pth.tar` files, which do
    not record it: their pretrain.py copies the config beside the weights (config.yaml), and
    the ImageNet ones (folders imagenet1k_bit50x1, imagenet21k_bit152x4, ...) were trained on
    ImageNet mean / std while the chest ones used [-1, 1]."""
    folder = os.path.dirname(os.path.abspath(path))
    config = os.path.join(folder, "config.yaml")
    text = os.path.basename(folder)
    if os.path.isfile(config):
        with open(config, errors="replace") as f:
            text += f.read()
    return "imagenet" if "imagenet" in text.lower() else "bit"


def read_weights(path):
    """Any supported weights file -> (state dict with our names on the CPU, input
    normalisation name or None when the file does not tell). The format is detected from the
    content: an .npz of Google's BiT (a zip of .npy arrays; [-1, 1] inputs), or a pickle read
    with torch.load(weights_only=True): our checkpoints (which record "input_norm"), the paper's
    model.pth.tar (weights under "model" beside "optimizer" and "epoch"; see _paper_input_norm),
    timm's BiT state dicts ([-1, 1]), a bare state dict (unknown), with "module." (DDP) or
    "_orig_mod." (torch.compile) prefixes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_npz = all(n.endswith(".npy") for n in z.namelist())
        if is_npz:
            try:
                with np.load(path, allow_pickle=False) as arrays:
                    return from_bit_npz(arrays), "bit"
            except ValueError:  # numpy refuses object arrays (pickles) without allow_pickle
                raise UserError(f"{path}: refused: the .npz holds object arrays (pickles), which "
                                "could run code; BiT weights are plain numeric arrays") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError, ...
        if "unsupported global" in str(e).lower():  # the pickle names a function or class
            raise UserError(f"{path}: refused: the pickle holds objects other than tensors and plain "
                            "data, and unpickling them could run code; re-save the state dict only") from None
        raise UserError(f"{path}: not a weights file that can be read ({type(e).__name__})") from None
    norm = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if obj.get("input_norm") in INPUT_NORMS:
            norm = obj["input_norm"]
        elif "step" not in obj and ("epoch" in obj or "optimizer" in obj):  # the paper's layout
            norm = _paper_input_norm(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UserError(f"{path}: no state dict found (a dict of tensors, or one under 'model')")
    state = {}
    for k, v in obj.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        state[k] = v
    if "stem.conv.weight" in state:
        return from_timm_state_dict(state), "bit"
    return state, norm


def _describe(model):
    depth = next((d for d, units in ARCHS.items() if units == model.block_units), model.block_units)
    return f"{depth}x{model.width_factor} with {model.head.conv.out_channels} classes"


def load_weights(model, path, keep_head=False, input_norm=None):
    """Load a weights file (see read_weights for the formats) into `model` in place and return
    the input normalisation (a key of INPUT_NORMS) the weights expect: `input_norm` when given
    (for a foreign file that does not say), else what the file records or implies, else "bit".
    keep_head=False (transfer, as BiT does): the checkpoint's head is dropped and the model
    gets a zero-initialised head of its current number of classes. keep_head=True: the
    checkpoint's head is loaded and must have the model's number of classes. Weights of
    another architecture or width raise a one-line UserError naming the tensors that disagree."""
    model = unwrap(model)
    state, file_norm = read_weights(path)
    own = model.state_dict()
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.conv.")}
        state.update({k: torch.zeros_like(v) for k, v in own.items() if k.startswith("head.conv.")})
    bad = [f"{k} {tuple(v.shape)} in the model vs {tuple(state[k].shape)} in the file"
           for k, v in own.items() if k in state and v.shape != state[k].shape]
    bad += [f"{k} missing in the file" for k in own if k not in state]
    bad += [f"{k} {tuple(state[k].shape)} not in the model" for k in state if k not in own]
    if bad:
        raise UserError(f"{path} does not fit {_describe(model)}: {len(bad)} tensors disagree, e.g. "
                        + "; ".join(bad[:3]))
    model.load_state_dict(state)
    if input_norm is not None and input_norm not in INPUT_NORMS:
        raise UserError(f"unknown input normalisation {input_norm!r}; choose from {', '.join(INPUT_NORMS)}")
    return input_norm or file_norm or "bit"




# ========================================================================================
# Training machinery: CLI errors, distributed, checkpoints, data loading, steps, metrics
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Command lines: every script reports bad input as one line and exits with status 2

class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to each flag's help unless the help already says it."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and one-line errors (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(minimum):
    """argparse type: an int >= minimum, so that the parser itself names the flag of a bad
    value (`argument --workers: must be >= 1, got -1`)."""
    def parse(text):
        value = int(text)  # a ValueError becomes argparse's "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def run_cli(main, parser, argv=None):
    """Parse argv and run main(args); a UserError or missing file becomes a one-line error."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (UserError, FileNotFoundError) as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------------------
# Distributed setup and rank-0 helpers

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
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://"))
        # After a torchrun restart (--max-restarts) the agent's store still holds the
        # dead round's keys, and gloo would try to connect to the dead ranks' addresses;
        # a key prefix per restart gives each round a clean namespace.
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world_size)
    return DistEnv(rank, local_rank, world_size, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, file=None, **kwargs):
    """print on rank 0 only. Through tqdm.write: an open progress bar (stderr) is cleared,
    the line printed whole, and the bar redrawn below it, in a terminal and in a log file."""
    if is_master():
        tqdm.write(" ".join(str(a) for a in args), file=file or sys.stdout, **kwargs)
        (file or sys.stdout).flush()


def default_dtype(device):
    """--dtype when none is given: bf16 autocast where it is fast (CUDA), fp32 elsewhere (on
    CPUs bf16 autocast measured several times slower than fp32)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def default_workers(limit=8):
    """DataLoader workers when none are given: at most `limit`, and fewer than the CPUs this
    process may use (one is the main process's), so a small machine is not oversubscribed."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(limit, cpus - 1))


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (scancel, kill) handled alike: inside `with StopSignals() as
    stop:` a signal only records itself in stop.signum, and the loop ends at its next safe
    point (after a step or a run) with one line, keeping what is finished. The previous
    handlers come back on exit. A second Ctrl-C while stopping raises KeyboardInterrupt."""

    def __init__(self):
        self.signum = 0

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def __bool__(self):
        return bool(self.signum)


def wrap_ddp(model, env):
    """`model` (already on env.device) under DistributedDataParallel when there are several
    ranks, else as it is."""
    if env.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def save_args(folder, args, name="args.json"):
    """The run's arguments as JSON beside its outputs (rank 0 only; temp file + rename)."""
    if not is_master():
        return
    os.makedirs(folder, exist_ok=True)
    with atomic_write(os.path.join(folder, name)) as f:
        json.dump(vars(args) if not isinstance(args, dict) else args, f, indent=1, default=str)


# ----------------------------------------------------------------------------------------
# Output folders: finished files appear whole, a folder belongs to one run at a time

def fsync_folder(folder):
    """Make a rename in `folder` durable (the directory entry itself is flushed)."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp, path):
    """Flush the finished file `tmp` to disk, rename it to `path`, flush the rename: a crash
    leaves the old file or the new one, never a part."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(path))


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """`with atomic_write(path) as f:` write a finished file: into a temporary name of this
    process (two writers never share one), then replace_durably; nothing is left on error."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def check_out(out, inputs=(), flag="--data"):
    """Refuse an --out that is a file, or that is, or lies inside, one of the run's inputs
    (whose files a run could then replace)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    real = os.path.realpath(out)
    for folder in inputs:
        inside = os.path.realpath(folder)
        if os.path.commonpath([real, inside]) == inside:
            where = "is" if real == inside else "lies inside"
            raise UserError(f"--out {out} {where} the input {flag} {folder}; choose an output folder "
                            "outside the inputs")


LOCK_NAME = ".lock"
_held_locks = set()  # fds of the folder locks this process holds


def _drop_inherited_locks():
    """In a forked child (decoding or DataLoader worker): close the inherited lock fds, so that
    the lock goes with its owner and no orphaned worker keeps the folder."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def folder_lock(folder):
    """`with folder_lock(out):` the folder belongs to this run. OUT/.lock names the owner
    (pid@host) and is held with flock, which the kernel drops when the owner exits or dies
    (kill -9 included): a folder is taken over exactly when its owner is gone. A second run
    gets a one-line UserError naming the owner. The lock file is removed on a clean exit."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = ""
            with contextlib.suppress(OSError):
                owner = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{folder} is in use by another run ({owner or 'owner unknown'}, lock "
                            f"{path}); wait for it to end or choose another --out") from None
        # The previous owner may have removed the file between our open and flock: the lock
        # counts only on the file that is still at `path`.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
    _held_locks.add(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        _held_locks.discard(fd)
        os.close(fd)
        if created:  # a run that failed before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                os.rmdir(folder)


# ----------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, model, optimizer=None, scaler=None, step=0, args=None, extra=None):
    """Bare-module weights plus whatever is needed to resume, written with atomic_write so
    that a crash never leaves a truncated checkpoint under the real name."""
    state = {"model": unwrap(model).state_dict(), "step": step,
             "args": dict(vars(args)) if args is not None else {}, "rng": rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state.update(extra or {})
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path):
    """A checkpoint as a dict of tensors and plain values; never executes pickled code. A
    truncated, foreign or unsafe file is a one-line UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise UserError(f"{path}: not a checkpoint that can be read ({type(e).__name__}); it may be "
                        "truncated or of another program") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint (a {type(state).__name__}, not a dict)")
    return state


def rng_state():
    """torch, CUDA, numpy and Python RNG states as tensors and lists, which weights_only
    loading accepts (numpy's state holds an ndarray, Python's a tuple)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def restore_rng(state):
    """Inverse of rng_state (entries missing from older checkpoints are left alone)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------
# Data loading: order and sharding, the loader, the device-side input pipeline

# Data order and sharding: a function of (seed, epoch, global batch) only, so that any split
# of the global batch over ranks and accumulation steps trains on the same micro-batches.

class GlobalBatchSampler:
    """Micro-batches of dataset indices for one rank, to pass as a DataLoader batch_sampler.

    Each epoch is a permutation of range(n) drawn from (seed, epoch), cut into global batches
    (the incomplete tail is dropped); a global batch is cut into world_size * accum_steps
    micro-batches and rank r takes chunk m * world_size + r at micro-step m. Iteration yields
    this rank's micro-batches step by step, starting at the step given to set_epoch (resume)."""

    def __init__(self, n, global_batch, world_size=1, rank=0, accum_steps=1, seed=0):
        if global_batch % (world_size * accum_steps):
            raise UserError(f"global batch {global_batch} is not divisible by world size "
                            f"{world_size} x accumulation steps {accum_steps}")
        self.n, self.global_batch, self.world_size, self.rank = n, global_batch, world_size, rank
        self.accum_steps, self.seed = accum_steps, seed
        self.micro_batch = global_batch // (world_size * accum_steps)
        self.steps_per_epoch = n // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            for m in range(self.accum_steps):
                chunk = m * self.world_size + self.rank
                start = step * self.global_batch + chunk * self.micro_batch
                yield order[start:start + self.micro_batch]


def shard_batches(n, batch_size, world_size=1, rank=0):
    """Evaluation batches for one rank: indices rank, rank + W, ... in chunks, so that
    gather_in_order puts every row back exactly once."""
    rows = list(range(rank, n, world_size))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def _whole_batch(batch):
    return batch  # the dataset's __getitems__ already returns a batch


def _quiet_stop_signals(worker_id):
    # Ctrl-C reaches the whole process group: workers ignore it, so the main process can
    # finish its step and save a checkpoint. A SIGTERM ends a worker with status 0, which the
    # main process does not treat as a crash (the loader's own shutdown also uses SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def batch_loader(dataset, batch_sampler, workers, device):
    """DataLoader over a dataset with a batched `__getitems__` (PreparedDataset): whole
    batches come from the workers as they are, pinned for non_blocking copies on CUDA."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=_whole_batch, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", worker_init_fn=_quiet_stop_signals,
        prefetch_factor=4 if workers else None, persistent_workers=False)


def to_model_input(images, out_size=None, channels_last=False, norm="bit"):
    """uint8 (N, H, W, C) with C in {1, 3} -> float (N, 3, out, out), normalised with
    INPUT_NORMS[norm]. Grayscale is repeated to 3 channels so that natural-image weights apply
    unchanged (with "imagenet" each channel then gets its own mean / std, as the paper's
    pipeline did)."""
    if norm not in INPUT_NORMS:
        raise UserError(f"unknown input normalisation {norm!r}; choose from {', '.join(INPUT_NORMS)}")
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    # (x / 255 - mean) / std as x / (255 std) - mean / std: for "bit" that is x / 127.5 - 1.
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in INPUT_NORMS[norm])
    x = x / (255 * std) - mean / std
    if out_size is not None and x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# The paper's chest augmentation (datasets/chexpert.py cohen_aug: albumentations
# ShiftScaleRotate(shift_limit=0.25, scale_limit=0.1, rotate_limit=45; its default border mode
# reflects), then a horizontal flip), as random_affine arguments; pre-training and the PadChest
# target share it.
CHEST_AUGMENT = {"translate": 0.25, "scale": 0.1, "rotate": 45.0, "padding": "reflection"}


def random_affine(x, out_size, crop=1.0, rotate=0.0, translate=0.0, scale=0.0, hflip=True,
                  crop_area=None, padding="zeros", generator=None):
    """One random affine per image, applied with a single grid_sample: a crop of `crop` of the
    side at a random place (BiT's resize-then-random-crop), or with crop_area=(lo, hi) a crop
    of a random share of the area in [lo, hi] and aspect ratio in [3/4, 4/3] (torchvision's
    RandomResizedCrop, clamped to the image instead of re-drawn); rotation in [-rotate, rotate]
    degrees, translation up to `translate` of the side, zoom in [1-scale, 1+scale] and a
    horizontal flip with probability 1/2. Outside the image: padding="zeros" fills black (-1
    for [-1, 1] inputs); "reflection" mirrors the image at its border, as albumentations'
    ShiftScaleRotate does by default. (That one is cv2's BORDER_REFLECT_101, which mirrors
    about the edge pixel's centre; grid_sample mirrors about the pixel's outer edge, cv2's
    BORDER_REFLECT, so the mirrored part sits half a pixel further out: below what a
    45-degree rotation and bilinear resampling resolve.)"""
    n, dev = x.shape[0], x.device

    def uniform(lo, hi):
        return torch.rand(n, generator=generator, device=generator.device if generator else "cpu"
                          ).to(dev) * (hi - lo) + lo

    angle = uniform(-rotate, rotate) * (math.pi / 180)
    zoom = uniform(1 - scale, 1 + scale)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    if crop_area is None:
        width = height = torch.full((n,), float(crop), device=dev)
    else:
        area, ratio = uniform(*crop_area), torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    # theta maps output coordinates to input coordinates in [-1, 1] units.
    sx, sy = width / zoom, height / zoom
    cos, sin = torch.cos(angle), torch.sin(angle)
    tx = uniform(0, 1) * 2 * (1 - width) - (1 - width) + uniform(-2 * translate, 2 * translate)
    ty = uniform(0, 1) * 2 * (1 - height) - (1 - height) + uniform(-2 * translate, 2 * translate)
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), (n, x.shape[1], out_size, out_size), align_corners=False)
    if padding == "reflection":
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


# ----------------------------------------------------------------------------------------
# Train and eval steps shared by pretrain.py and transfer.py

def step_lr(step, peak_lr, warmup_steps, decay_steps, warmup_from=0.0, factor=0.1):
    """The step schedule of pretrain.py and transfer.py (0-based optimizer steps): linear
    warm-up from warmup_from x peak_lr at step 0 to peak_lr at step warmup_steps, then x factor
    for every boundary in decay_steps that `step` has reached (step >= boundary: the decay
    takes effect at the boundary)."""
    if step < warmup_steps:
        return peak_lr * (warmup_from + (1 - warmup_from) * step / warmup_steps)
    return peak_lr * factor ** sum(step >= b for b in decay_steps)


def autocast(device, dtype):
    """Mixed-precision context for --dtype bf16 | fp16 | fp32."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


@torch.no_grad()
def adaptive_clip_grad(parameters, clipping=0.01, eps=1e-3):
    """Adaptive Gradient Clipping (Brock et al., NFNets, arXiv 2102.06171), unit-wise: the
    gradient of each output unit (row of a weight; a whole vector for 1-D parameters) is
    scaled down to at most clipping x max(|unit weights|, eps). Leave the head out (paper)."""
    def unit_norm(t):
        return torch.linalg.vector_norm(t, dim=None if t.ndim <= 1 else tuple(range(1, t.ndim)),
                                        keepdim=t.ndim > 1)

    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unit_norm(p).clamp(min=eps) * clipping
        grad_norm = unit_norm(p.grad)
        p.grad.mul_(torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), 1.0))


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
def predict(model, batches, device, dtype="fp32", features=False):
    """Logits (or, with features=True, pre-logit features) and targets for an iterable of
    (input, target) batches, as float32 numpy."""
    model.eval()
    forward = unwrap(model).forward_features if features else model
    outputs, targets = [], []
    for x, y in batches:
        with autocast(device, dtype):
            outputs.append(forward(x).float().cpu())
        targets.append(y.float().cpu())
    return torch.cat(outputs).numpy(), torch.cat(targets).numpy()


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


def scores_from_logits(logits, multilabel):
    """Per-label probabilities: sigmoid for multi-label, softmax for single-label logits."""
    logits = np.asarray(logits, np.float64)
    if multilabel:
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def headline_metrics(logits, targets, multilabel):
    """The figures logged at evaluation: accuracy (single-label), mean ROC AUC and mean
    average precision over labels that have both classes."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    scores = scores_from_logits(logits, multilabel)
    out = {} if multilabel else {"accuracy": float((logits.argmax(1) == targets.argmax(1)).mean())}
    out["auc"] = float(np.nanmean(column_metric(roc_auc, scores, targets)))
    out["map"] = float(np.nanmean(column_metric(average_precision, scores, targets)))
    return out
