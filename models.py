"""BiT ResNet-v2 models and the training machinery shared by pretrain.py and transfer.py.

The network follows Kolesnikov et al., "Big Transfer (BiT)" (arXiv 1912.11370) and the reference
PyTorch code (google-research/big_transfer, bit_pytorch/models.py): module names are the same
(`root.conv`, `body.block1.unit01.gn1`, `head.conv`, ...), so the checkpoints released with
Cherti & Jitsev (arXiv 2106.00116) load without renaming.

    model = models.create_model("R50x1", num_classes=7)
    norm = models.load_weights(model, "BiT-M-R50x1.npz")   # head replaced by a zero head
    x = models.to_model_input(uint8_batch, 224, norm=norm)  # "bit": [-1, 1]; or ImageNet mean/std

Three parts, each under one divider: the network (depends on nothing below), the weight formats,
and the training machinery (command lines, distributed, files, checkpoints, data, steps, metrics).
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
import urllib.parse
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# ========================================================================================
# Network: BiT ResNet-v2 (depends on nothing below)
# ========================================================================================

WS_EPS = 1e-10  # Weight Standardization eps of the official BiT code (TF and PyTorch)
GN_EPS = 1e-5   # GroupNorm eps of the official BiT code (tf.contrib / nn.GroupNorm default)
GN_GROUPS = 32


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization: each output filter is normalised to zero mean and unit
    (biased) variance over (in, kh, kw) before the convolution, w' = (w - mean) / sqrt(var + WS_EPS).
    The stored weight is the raw one, as in the official checkpoints.

    timm's StdConv2d for BiT uses eps 1e-8 instead of 1e-10, the only numerical difference: it
    changes each filter's scale by eps / (2 var) relative, <= 1e-4 for filter variances >= ~7e-5
    (random init: 1 / (3 fan_in), fan_in <= 4608), below what the weights resolve."""

    fused = True  # False: the formula as written below (BiT's two lines); both give the same

    def forward(self, x):
        if not self.fused:
            var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (self.weight - mean) / torch.sqrt(var + WS_EPS)
        else:
            # The same formula as one kernel forward and one backward: batch_norm in training mode
            # over the (1, out, in*kh*kw) view has one "channel" per filter, biased variance, eps
            # inside the sqrt (bench/bench_models.py times both).
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                             training=True, momentum=0.0, eps=WS_EPS).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNorm(nn.GroupNorm):
    """GroupNorm as BiT uses it: statistics per (sample, group of GN_GROUPS channels) over the
    group's channels and H, W; biased variance; eps GN_EPS; then a per-channel affine transform."""

    fused = True  # False: the formula as written below; both give the same

    def __init__(self, num_groups, num_channels, eps=GN_EPS):
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x):
        if not self.fused:
            n, c = x.shape[:2]
            g = x.float().reshape(n, self.num_groups, -1)  # statistics in fp32, as the kernel's
            var, mean = torch.var_mean(g, dim=-1, keepdim=True, unbiased=False)
            y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape).to(x.dtype)
            return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        # PyTorch's fused kernel: one pass over the activations forward and backward instead of
        # one per op (bench/bench_models.py times both, eager and compiled).
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def conv(cin, cout, kernel_size, stride=1):
    return StdConv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (ResNet-v2). The stride sits on the 3x3 conv (BiT's choice; the
    original ResNet-v2 strides the first 1x1), and the projection shortcut takes the
    pre-activated input, not the raw one."""

    def __init__(self, cin, cout, cmid, stride=1):
        super().__init__()
        self.gn1, self.conv1 = GroupNorm(GN_GROUPS, cin), conv(cin, cmid, 1)
        self.gn2, self.conv2 = GroupNorm(GN_GROUPS, cmid), conv(cmid, cmid, 3, stride)
        self.gn3, self.conv3 = GroupNorm(GN_GROUPS, cmid), conv(cmid, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv(cin, cout, 1, stride)

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
            # Zero-pad then pool without padding, as the TF code does. MaxPool2d(padding=1) is
            # subtly different: it pads with -inf, and the input here can be negative.
            ("pad", nn.ConstantPad2d(1, 0)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
        ]))
        blocks, cin = [], round(64 * wf)
        for i, units in enumerate(block_units):
            cmid, cout = round(64 * wf * 2 ** i), round(256 * wf * 2 ** i)
            block = [(f"unit{u:02d}", PreActBottleneck(cin if u == 1 else cout, cout, cmid,
                                                       2 if u == 1 and i > 0 else 1))
                     for u in range(1, units + 1)]
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


# Block units per stage. R14 and R26 are small members of the same family for CPU demos and
# tests; R14x0.5, at half width, is the CPU demo's: a step costs a quarter of R14x1's.
ARCHS = {"R14": (1, 1, 1, 1), "R26": (2, 2, 2, 2), "R50": (3, 4, 6, 3), "R101": (3, 4, 23, 3),
         "R152": (3, 8, 36, 3)}
MODEL_NAMES = ["R14x0.5", "R14x1", "R26x1", "R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"]


def create_model(name, num_classes):
    """A randomly initialised BiT ResNet-v2 by name (see MODEL_NAMES)."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    depth, wf = name.split("x")
    return ResNetV2(ARCHS[depth], float(wf) if "." in wf else int(wf), num_classes)


def new_head(model, zero):
    """A fresh classifier: zero-initialised (BiT's transfer recipe) or with PyTorch's default
    Conv2d init (the paper's models/builder.py)."""
    if zero:
        nn.init.zeros_(model.head.conv.weight)
        nn.init.zeros_(model.head.conv.bias)
    else:
        model.head.conv.reset_parameters()
    return model


# ========================================================================================
# Weight formats: Google's BiT .npz, the paper's model.pth.tar, timm, our checkpoints
# ========================================================================================

# Input normalisation a set of weights was trained with: (mean, std) per RGB channel of the image
# in [0, 1]. "bit": [-1, 1], Google's BiT and the paper's chest sources; "imagenet": the paper's
# own ImageNet-1k/21k checkpoints (torchvision's statistics).
INPUT_NORMS = {"bit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}

# Our names -> the official BiT (TF) scopes: inside a bottleneck unit, and outside the units.
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
    top = {v: k for k, v in _BIT_TOP.items()}
    scope = key.removeprefix("resnet/")
    m = re.fullmatch(r"(block\d+)/(unit\d+)/(.+)/(kernel|gamma|beta)", scope)
    layer = m and {v: k for k, v in _BIT_UNIT.items()}.get(m[3])
    if scope in top or not layer:
        return top.get(scope, key)
    return f"body.{m[1]}.{m[2]}.{layer}.{'bias' if m[4] == 'beta' else 'weight'}"


def from_bit_npz(arrays):
    """Official BiT .npz arrays (key -> numpy array) -> our state dict. Conv kernels are stored
    HWIO and become OIHW; GroupNorm gamma/beta and the head bias are 1-D."""
    out = {}
    for key in arrays:
        a = np.asarray(arrays[key])
        out[_our_key(key)] = torch.from_numpy(a.transpose(3, 2, 0, 1).copy() if a.ndim == 4 else a)
    return out


def export_bit_npz(model, path):
    """The model's weights as an .npz in the official BiT layout (float32, kernels HWIO), readable
    by load_weights, timm's load_pretrained and the BiT reference code."""
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
    """The input normalisation of one of the paper's released `model.pth.tar` files, which do not
    record it: their pretrain.py copies the config beside the weights (config.yaml), and the
    ImageNet ones (folders imagenet1k_bit50x1, imagenet21k_bit152x4, ...) were trained on
    ImageNet mean / std while the chest ones used [-1, 1]."""
    folder = os.path.dirname(os.path.abspath(path))
    text = os.path.basename(folder)
    if os.path.isfile(os.path.join(folder, "config.yaml")):
        with open(os.path.join(folder, "config.yaml"), errors="replace") as f:
            text += f.read()
    return "imagenet" if "imagenet" in text.lower() else "bit"


def read_weights(path):
    """Any supported weights file -> (state dict with our names on the CPU, input normalisation
    name or None when the file does not tell). The format is detected from the content: an .npz
    of Google's BiT ([-1, 1] inputs), or a pickle read with torch.load(weights_only=True): our
    checkpoints (which record "input_norm"), the paper's model.pth.tar ({model, optimizer,
    epoch}; see _paper_input_norm), timm's BiT state dicts ([-1, 1]), a bare state dict
    (unknown), with "module." (DDP) or "_orig_mod." (torch.compile) prefixes."""
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
                raise UserError(f"{path}: refused: the .npz holds object arrays (pickles), which could "
                                "run code; BiT weights are plain numeric arrays") from None
    obj = load_checkpoint(path)
    norm = obj.get("input_norm") if obj.get("input_norm") in INPUT_NORMS else None
    if norm is None and isinstance(obj.get("model"), dict) and "step" not in obj and \
            ("epoch" in obj or "optimizer" in obj):  # the paper's layout
        norm = _paper_input_norm(path)
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UserError(f"{path}: no state dict found (a dict of tensors, or one under 'model')")
    state = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in obj.items()}
    if "stem.conv.weight" in state:
        return from_timm_state_dict(state), "bit"
    return state, norm


def load_weights(model, path, keep_head=False, input_norm=None):
    """Load a weights file (see read_weights for the formats) into `model` in place and return the
    input normalisation (a key of INPUT_NORMS) the weights expect: `input_norm` when given (for a
    foreign file that does not say), else what the file records or implies, else "bit".
    keep_head=False (transfer, as BiT does): the file's head is dropped and the model gets a zero
    head of its own number of classes. keep_head=True: the file's head must fit. Weights of
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
        depth = next((d for d, units in ARCHS.items() if units == model.block_units), model.block_units)
        raise UserError(f"{path} does not fit {depth}x{model.width_factor} with {model.head.conv.out_channels} "
                        f"classes: {len(bad)} tensors disagree, e.g. " + "; ".join(bad[:3]))
    model.load_state_dict(state)
    if input_norm is not None and input_norm not in INPUT_NORMS:
        raise UserError(f"unknown input normalisation {input_norm!r}; choose from {', '.join(INPUT_NORMS)}")
    return input_norm or file_norm or "bit"


# ========================================================================================
# Training machinery: command lines, distributed, files, checkpoints, data, steps, metrics
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Command lines: bad input is one line and exit status 2

class UserError(ValueError):
    """Bad input from the user (unknown model, missing file, bad CSV): one line, exit 2."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" unless the help says it already
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and one-line errors (no usage dump); memory_hint:
    the settings to lower when the run is out of memory (run_cli)."""

    def __init__(self, *args, memory_hint="the batch size or the image size", **kwargs):
        super().__init__(*args, formatter_class=_DefaultsFormatter, **kwargs)
        self.memory_hint = memory_hint

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(interval, kind=float):
    """argparse type: a number of `kind` (int or float) in `interval`, written as in
    mathematics ("[0, 1)", "(0, inf)"), so that the parser names the flag and the range of a bad
    value (`argument --lr: must be a number in (0, inf), got nan`). NaN and inf never pass."""
    low, high = map(float, interval[1:-1].split(","))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (low < value < high or value == low and interval[0] == "[" or value == high and interval[-1] == "]"):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} in {interval}, "
                                             f"got {text}")
        return value
    parse.__name__, parse.interval = kind.__name__, interval
    return parse


SEED = number("[0, 4294967295]", int)  # numpy's RandomState takes no larger seed
COUNT = number("[1, 1e9]", int)  # steps, epochs, batch sizes: at least one
SIDE = number("[1, 8192]", int)  # image sides in pixels


def out_of_memory(e):
    """Whether the exception is an allocation that failed (CUDA, numpy, or torch's CPU allocator)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or isinstance(e, RuntimeError) and any(
        m in str(e) for m in ("DefaultCPUAllocator: can't allocate memory", "not enough memory"))


def run_cli(main, parser, argv=None):
    """Parse argv and run main(args); a UserError or missing file becomes a one-line error, and
    so does running out of memory, naming the settings to lower (parser.memory_hint); a stop
    signal is one line and status 128 + its number."""
    args = parser.parse_args(argv)
    try:
        with StopSignals(at_once=True):  # a script's loop with a safe point defers them itself
            return main(args)
    except (UserError, FileNotFoundError) as e:
        parser.error(str(e))
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        parser.error(f"out of memory ({detail}); lower {parser.memory_hint}")
    except Stopped as e:
        print0(f"{parser.prog}: stopped by {signal.Signals(e.signum).name}; finished work is kept: the same "
               "command continues")
        raise SystemExit(128 + e.signum)


# ----------------------------------------------------------------------------------------
# Distributed setup and rank-0 helpers

class DistEnv:
    """What torchrun told this process: rank, local rank, world size, and its device."""

    def __init__(self, rank, local_rank, world_size, device):
        self.rank, self.local_rank, self.world_size, self.device = rank, local_rank, world_size, device
        self.is_master = rank == 0


def fit_threads():
    """Intra-op threads: the cores this process may use (its CPU affinity), shared among the
    ranks torchrun starts on this node, unless OMP_NUM_THREADS is set. More threads than cores
    wait on each other and run several times slower."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


@contextlib.contextmanager
def distributed(device=None):
    """`with distributed(args.device) as env:` init from the RANK / LOCAL_RANK / WORLD_SIZE env
    that torchrun sets (env:// rendezvous; a plain `python script.py` is a world of one; nccl on
    GPUs, gloo on CPUs), and destroy_process_group at the end, after a barrier when all went well
    (a rank leaving early would abort the others' last collective). Sets the threads (fit_threads)."""
    fit_threads()
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://"))
        # After a torchrun restart (--max-restarts) the agent's store still holds the dead round's
        # keys, and gloo would connect to the dead ranks: a key prefix per restart avoids them.
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world_size)
    try:
        yield DistEnv(rank, local_rank, world_size, device)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, file=None):
    """print on rank 0 only. Through tqdm.write: an open progress bar is cleared, the line printed
    whole, and the bar redrawn below it, in a terminal and in a log file."""
    if is_master():
        tqdm.write(" ".join(str(a) for a in args), file=file or sys.stdout)
        (file or sys.stdout).flush()


def progress(total, initial=0):
    """A tqdm bar on rank 0 in a terminal only (a log file gets the log lines)."""
    return tqdm(total=total, initial=initial, disable=not (is_master() and sys.stderr.isatty()))


def wrap_ddp(model, env):
    """`model` (on env.device) under DistributedDataParallel when there are several ranks."""
    if env.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def unwrap(model):
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def default_dtype(device):
    """--dtype when none is given: bf16 autocast where it is fast (CUDA), fp32 elsewhere (on CPUs
    bf16 autocast measured several times slower than fp32)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def default_workers(limit=8):
    """DataLoader workers when none are given: at most `limit`, and fewer than the CPUs this
    process may use (one is the main process's), so a small machine is not oversubscribed."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(limit, cpus - 1))


class Stopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM: the run ends with status 128 + signum; what is finished is kept.
    A BaseException, as KeyboardInterrupt: `except Exception` (a cell's failure, a rejected
    image) does not catch it."""

    def __init__(self, signum):
        super().__init__(f"signal {signum}")
        self.signum = signum


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (scancel, kill) handled alike. at_once: a signal raises Stopped
    where the program is (a phase with nothing to save: loading, evaluation, the bootstrap, the
    summary; files are written whole, so nothing is half-written); else it only records itself in
    stop.signum, and a loop ends at its next safe point (after a step) with one line, keeping what
    is finished. The previous handlers come back on exit. A second Ctrl-C while stopping raises
    KeyboardInterrupt."""
    current = None  # the innermost one entered, for stop_point()

    def __init__(self, at_once=False):
        self.signum, self.now = 0, at_once

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        while frame is not None and frame.f_code.co_name != "__del__":
            frame = frame.f_back
        if self.now and frame is None:  # inside a __del__ Python would ignore it: stop_point() raises it
            raise Stopped(signum)

    @contextlib.contextmanager
    def at_once(self, now=True):
        """Inside, a signal raises Stopped at once (now) or waits for a safe point (not now); one
        recorded while waiting raises on the way into, or back to, at once."""
        old, self.now = self.now, now
        try:
            if now and self.signum:
                raise Stopped(self.signum)
            yield
        finally:
            self.now = old
        if old and self.signum:
            raise Stopped(self.signum)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self._outer, StopSignals.current = StopSignals.current, self
        return self

    def __exit__(self, *exc):
        StopSignals.current = self._outer
        for s, h in self._old.items():
            signal.signal(s, h)

    def __bool__(self):
        return bool(self.signum)


def stop_point():
    """Raise Stopped when a signal is recorded in at-once mode: once per batch of a long loop, for
    a signal that landed in a __del__ (the handler does not raise there: Python would ignore it)."""
    stop = StopSignals.current
    if stop is not None and stop.now and stop.signum:
        raise Stopped(stop.signum)


# ----------------------------------------------------------------------------------------
# Output files: written whole, a folder belongs to one run at a time, never inside an input

def replace_file(tmp, path):
    """Flush the finished file `tmp` to disk and rename it to `path`: a crash leaves the old file
    or the new one, never a part."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """`with atomic_write(path) as f:` write a finished file (a temporary name of this process,
    then replace_file); nothing is left on error."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        replace_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def folder_lock(folder):
    """`with folder_lock(out):` the folder belongs to this run. OUT/.lock names the owner
    (pid@host) and is held with flock, which the kernel drops when the owner and its worker
    processes are gone (kill -9 included). A second run gets a one-line UserError. The lock file
    stays (it is free when nobody holds it); a folder this run made and left empty goes."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{folder} is in use by another run ({f.read(200).strip() or 'owner unknown'}, "
                            f"lock {path}); wait for it to end or choose another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}@{socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            if created and os.listdir(folder) == [".lock"]:  # a run that wrote nothing leaves nothing
                os.remove(path)
                os.rmdir(folder)


def check_path(path, flag, folder=True):
    """Refuse an output path of the wrong kind (a file where a folder is due, or the reverse), or
    one that lies under a file: one line before anything is written, not an OSError after."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise UserError(f"{flag} {path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UserError(f"{flag} {path} lies under {above}, which is a file")


def check_distinct(folders, flag):
    """Refuse a folder given twice, by one path or two (its images would count twice)."""
    real = [os.path.realpath(f) for f in folders]
    for i, r in enumerate(real):
        if r in real[:i]:
            raise UserError(f"{flag} {folders[i]} is given twice (also as {folders[real.index(r)]}); "
                            "each source counts once")


def inside(path, folder):
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_out(out, inputs, outputs=None, owned=True):
    """Refuse an --out that is not a folder (check_path), and a run whose outputs could replace
    its inputs' files. `inputs`: {flag: path or paths} (None: not given). --out and `outputs`
    ({what: path} the run writes elsewhere, e.g. --results) may not be, or lie inside, an input;
    with `owned` (the run writes anywhere in --out) no input may lie inside --out either."""
    check_path(out, "--out")
    for flag, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            for what, written in {"--out": out, **(outputs or {})}.items():
                if inside(written, path):
                    verb = "is" if os.path.realpath(written) == os.path.realpath(path) else "lies inside"
                    raise UserError(f"{what} {written} {verb} the input {flag} {path}; choose outputs "
                                    "outside the inputs")
            if owned and inside(path, out):
                raise UserError(f"the input {flag} {path} lies inside --out {out}, whose files the run "
                                "writes; keep inputs outside the output folder")


def safe_name(name):
    """`name` (a target, source, model) as one file or folder name: every character but letters,
    digits and + = @ , - _ . ~ percent-encoded (a/b -> a%2Fb; distinct names stay distinct), so a
    name never leads outside the folder it names something in; '', '.' and '..' are refused."""
    if name in ("", ".", ".."):
        raise UserError(f"{name!r} cannot name a folder; choose another name")
    return urllib.parse.quote(name, safe="+=@,-_.", errors="surrogateescape")


def save_args(folder, args, name="args.json"):
    """The run's arguments as JSON beside its outputs (rank 0 only)."""
    if is_master():
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, name)) as f:
            json.dump(args if isinstance(args, dict) else vars(args), f, indent=1, default=str)


# ----------------------------------------------------------------------------------------
# Checkpoints: the bare module's weights, written whole, read without running pickled code

def save_checkpoint(path, model, step=0, args=None, optimizer=None, scaler=None, **extra):
    """On rank 0: weights plus what a resume needs (optimizer, scaler, step, args, RNG states)."""
    if not is_master():
        return
    state = {"model": unwrap(model).state_dict(), "step": step,
             "args": dict(vars(args)) if args is not None else {}, "rng": rng_state(), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path):
    """A checkpoint as a dict of tensors and plain values; never runs pickled code. A truncated,
    foreign or unsafe file is a one-line UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError, ...
        if "unsupported global" in str(e).lower():  # the pickle names a function or class
            raise UserError(f"{path}: refused: the pickle holds objects other than tensors and plain "
                            "data, and unpickling them could run code; re-save the state dict only") from None
        raise UserError(f"{path}: not a checkpoint or weights file that can be read ({type(e).__name__}); it may be "
                        "truncated or of another program") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: no state dict found (a {type(state).__name__}, not a dict)")
    return state


def rng_state():
    """torch, CUDA, numpy and Python RNG states as tensors and lists, which weights_only loading
    accepts (numpy's state holds an ndarray, Python's a tuple)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def restore_rng(state):
    """Inverse of rng_state."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------
# Data: order and sharding, the loader, the device-side input pipeline

class GlobalBatchSampler:
    """Micro-batches of dataset indices for one rank, as a DataLoader batch_sampler. Each epoch is
    a permutation of range(n) drawn from (seed, epoch), cut into global batches (the incomplete
    tail is dropped); a global batch is cut into world_size x accum_steps micro-batches and rank r
    takes chunk m * world_size + r at micro-step m. So the data order is a function of (seed,
    epoch, global batch) only: any split over ranks and accumulation steps trains on the same
    images. Iteration starts at the step given to set_epoch (resume)."""

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
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for step in range(self.start_step, self.steps_per_epoch):
            for m in range(self.accum_steps):
                start = step * self.global_batch + (m * self.world_size + self.rank) * self.micro_batch
                yield order[start:start + self.micro_batch].tolist()


def _whole_batch(batch):
    return batch  # the dataset's __getitems__ already returns a batch


def _worker_init(worker_id):
    # Ctrl-C reaches the whole process group: workers ignore it, so that the main process can
    # finish its step and save. SIGTERM ends a worker quietly (status 0). And a worker dies with
    # its parent, however the parent dies (PR_SET_PDEATHSIG on Linux), so it never holds the
    # folder lock of a dead run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    die_with_parent()


def die_with_parent():
    """Linux: this process gets SIGKILL when its parent dies (elsewhere: nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def batch_loader(dataset, batch_sampler, workers, device):
    """DataLoader over a dataset with a batched `__getitems__` (PreparedDataset): whole batches
    come from the workers as they are, pinned for non_blocking copies on CUDA."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=_whole_batch, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", worker_init_fn=_worker_init,
        prefetch_factor=4 if workers else None)


def to_model_input(images, out_size=None, channels_last=False, norm="bit", scale=None, chest=False):
    """uint8 (N, H, W, C) with C in {1, 3} -> float (N, 3, out, out): x / 255, times the per-image
    `scale` (N,) where given (prepare_data's labels.csv column, e.g. PadChest's value / 65535),
    normalised with INPUT_NORMS[norm]. Grayscale is repeated to 3 channels so that natural-image
    weights apply unchanged: with chest=False each channel then takes its own mean / std (the
    authors' BiT pipeline, torchvision's Normalize of an image loaded as RGB); with chest=True
    all three take the first channel's (their chest Normalize, applied before the repeat)."""
    if norm not in INPUT_NORMS:
        raise UserError(f"unknown input normalisation {norm!r}; choose from {', '.join(INPUT_NORMS)}")
    x = images.permute(0, 3, 1, 2).float()
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in INPUT_NORMS[norm])
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
        if chest:
            mean, std = mean[:, :1].expand_as(mean), std[:, :1].expand_as(std)
    if scale is not None:
        x = x * scale.to(x.device, x.dtype).view(-1, 1, 1, 1)
    # (x / 255 - mean) / std as x / (255 std) - mean / std: for "bit" that is x / 127.5 - 1.
    x = x / (255 * std) - mean / std
    if out_size is not None and x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# The paper's chest augmentation (datasets/chexpert.py cohen_aug: albumentations
# ShiftScaleRotate(shift_limit=0.25, scale_limit=0.1, rotate_limit=45; its default border mode
# reflects), then a horizontal flip) as random_affine arguments; pre-training and the PadChest
# target share it.
CHEST_AUGMENT = {"translate": 0.25, "scale": 0.1, "rotate": 45.0, "padding": "reflection"}


def random_affine(x, out_size, crop=1.0, rotate=0.0, translate=0.0, scale=0.0, hflip=True,
                  crop_area=None, padding="zeros", generator=None, aspect=None, rows=None):
    """One random affine per image, applied with a single grid_sample: a crop of `crop` of the side
    at a random place (BiT's resize-then-random-crop; with `aspect` (N,), the original width /
    height of images stored squashed, `crop` of the shorter side and as much of the longer, in
    the original's proportions: the authors' Resize(shorter side) then square RandomCrop), or
    with crop_area=(lo, hi) a crop of a random share of the area in [lo, hi] and aspect ratio in
    [3/4, 4/3] (torchvision's RandomResizedCrop, clamped to the image instead of re-drawn);
    rotation in [-rotate, rotate] degrees, translation up to `translate` of the side, zoom in
    [1-scale, 1+scale] and a horizontal flip with probability 1/2. Outside the image:
    padding="zeros" fills black (-1 for [-1, 1] inputs); "reflection" mirrors the image at its
    border, as albumentations does by default. (That is cv2's BORDER_REFLECT_101, which mirrors
    about the edge pixel's centre; grid_sample mirrors about the pixel's outer edge,
    BORDER_REFLECT: half a pixel further out, below what a 45-degree rotation and bilinear
    resampling resolve.) rows=(N, first): x holds rows first, first + 1, ... of a batch of N whose
    transforms are drawn together, so that an image's transform does not depend on the batch's split."""
    n, dev = x.shape[0], x.device
    total, first = rows or (n, 0)

    def uniform(lo, hi):
        return torch.rand(total, generator=generator, device=generator.device if generator else "cpu"
                          )[first:first + n].to(dev) * (hi - lo) + lo

    angle = uniform(-rotate, rotate) * (math.pi / 180)
    zoom = uniform(1 - scale, 1 + scale)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    if crop_area is None:
        width = height = torch.full((n,), float(crop), device=dev)
        if aspect is not None:
            aspect = aspect.to(dev, torch.float32)
            width, height = width / aspect.clamp(min=1), height * aspect.clamp(max=1)
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
# Steps shared by pretrain.py and transfer.py: schedule, AGC, the train step, prediction

def step_lr(step, peak_lr, warmup_steps, decay_steps, warmup_from=0.0, factor=0.1):
    """The step schedule of pretrain.py and transfer.py (0-based optimizer steps): linear warm-up
    from warmup_from x peak_lr at step 0 to peak_lr at step warmup_steps, then x factor for every
    boundary in decay_steps that `step` has reached (the decay takes effect at the boundary)."""
    if step < warmup_steps:
        return peak_lr * (warmup_from + (1 - warmup_from) * step / warmup_steps)
    return peak_lr * factor ** sum(step >= b for b in decay_steps)


def autocast(device, dtype):
    """Mixed-precision context for --dtype bf16 | fp16 | fp32."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def agc_parameters(model, num_classes):
    """The tensors Adaptive Gradient Clipping clips, by the authors' rule in pre-training and
    fine-tuning alike (optim/sgd_agc.py): all but the 2-D / 4-D tensors whose first dimension is
    the class count, i.e. the classifier's weight (its bias is clipped)."""
    return [p for p in unwrap(model).parameters() if not (p.ndim in (2, 4) and p.shape[0] == num_classes)]


@torch.no_grad()
def adaptive_clip_grad(parameters, clipping=0.01, eps=1e-3):
    """Adaptive Gradient Clipping (Brock et al., NFNets, arXiv 2102.06171), unit-wise: the gradient
    of each output unit (row of a weight; a whole vector for 1-D parameters) is scaled down to at
    most clipping x max(|unit weights|, eps)."""
    def unit_norm(t):
        return torch.linalg.vector_norm(t, dim=None if t.ndim <= 1 else tuple(range(1, t.ndim)),
                                        keepdim=t.ndim > 1)

    for p in parameters:
        if p.grad is not None:
            max_norm = unit_norm(p).clamp(min=eps) * clipping
            grad_norm = unit_norm(p.grad)
            p.grad.mul_(torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), 1.0))


def train_step(model, optimizer, scaler, micro_batches, multilabel, dtype="fp32", agc_params=(), agc=0.0):
    """One optimizer step over a list of (input, target) micro-batches (gradient accumulation):
    forward, loss and backward of each, with DDP's gradient all-reduce on the last one only;
    AGC of `agc_params` (when agc > 0) on the unscaled gradients; the step. `scaler` is a
    GradScaler, enabled for fp16. The loss is the global batch's, averaged over all its known
    targets (loss_fn), whatever its split into micro-batches and ranks (DDP averages the ranks'
    gradients, hence x world size). Returns it as a 0-d tensor (no host sync)."""
    model.train()
    counts = [(~torch.isnan(y)).sum() if multilabel else torch.tensor(len(y), device=y.device)
              for _, y in micro_batches]
    known = sum(counts).float()
    if dist.is_initialized():
        dist.all_reduce(known)
        known = known / dist.get_world_size()
    total = 0.0
    for i, ((x, y), count) in enumerate(zip(micro_batches, counts)):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(x.device, dtype):
                loss = loss_fn(model(x), y, multilabel) * count / known.clamp(min=1)
            scaler.scale(loss).backward()
        total = total + loss.detach()
    scaler.unscale_(optimizer)
    if agc > 0:
        adaptive_clip_grad(agc_params, agc)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def predict(model, batches, dtype="fp32", features=False):
    """Logits (or, with features=True, pre-logit features) and targets of an iterable of (input,
    target) batches, as float32 numpy."""
    model.eval()
    forward = unwrap(model).forward_features if features else model
    outputs, targets = [], []
    for x, y in batches:
        stop_point()
        with autocast(x.device, dtype):
            outputs.append(forward(x).float().cpu())
        targets.append(y.float().cpu())
    return torch.cat(outputs).numpy(), torch.cat(targets).numpy()


def predict_dataset(model, dataset, to_input, batch_size, env, dtype="fp32", workers=0, features=False):
    """Outputs (logits, or pre-logit features) and targets of every row of `dataset` in order, on
    every rank: rank r predicts rows r, r + W, ... with the bare module (so that ranks may predict
    different numbers of batches) and the parts are gathered. `to_input(images, scale)` turns a
    uint8 batch on the device and its intensity scales into model input."""
    rows = np.arange(env.rank, len(dataset), env.world_size)
    batches = [rows[i:i + batch_size].tolist() for i in range(0, len(rows), batch_size)]
    inputs = ((to_input(x.to(env.device, non_blocking=True), scale), y)
              for x, y, scale in batch_loader(dataset, batches, workers, env.device))
    if batches:
        out, targets = predict(unwrap(model), inputs, dtype, features)
    else:  # more ranks than rows
        width = unwrap(model).num_features if features else unwrap(model).head.conv.out_channels
        out, targets = np.zeros((0, width), np.float32), np.zeros((0, len(dataset.labels)), np.float32)
    return gather_in_order(out, env.world_size), gather_in_order(targets, env.world_size)


def gather_in_order(array, world_size):
    """Rows predicted on rank r for indices r, r + W, r + 2W, ... -> all rows in index order, on
    every rank. Shards differ by at most one row, so nothing is padded or counted twice."""
    if world_size == 1:
        return array
    parts = [None] * world_size
    dist.all_gather_object(parts, array)
    out = np.empty((sum(len(p) for p in parts),) + array.shape[1:], array.dtype)
    for r, p in enumerate(parts):
        out[r::world_size] = p
    return out


# ----------------------------------------------------------------------------------------
# Loss and metrics

def loss_fn(logits, targets, multilabel):
    """Multi-label: binary cross-entropy averaged over the known entries (NaN = unknown, masked).
    Single-label: cross-entropy against the target distribution (one-hot, or mixed by MixUp)."""
    logits = logits.float()
    if multilabel:
        known = ~torch.isnan(targets)
        loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)
    return F.cross_entropy(logits, targets)


def roc_auc(scores, labels):
    """Area under the ROC curve of one binary problem (ties get half credit), NaN when only one
    class is present. Mann-Whitney U from average ranks."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    starts = np.r_[0, np.flatnonzero(np.diff(scores[order])) + 1]  # runs of tied scores
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels):
    """Average precision (area under the step precision-recall curve, as scikit-learn's
    average_precision_score), NaN without positives."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    last = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]  # last of each tied run
    tp = np.cumsum(labels[order])[last]
    return float(np.sum(np.diff(np.r_[0.0, tp / labels.sum()]) * tp / (last + 1)))


def column_metric(metric, scores, targets):
    """metric per label column, skipping unknown (NaN) targets."""
    known = ~np.isnan(targets)
    return np.array([metric(scores[known[:, j], j], targets[known[:, j], j] > 0.5)
                     for j in range(targets.shape[1])])


def scores_from_logits(logits, multilabel):
    """Per-label probabilities: sigmoid for multi-label, softmax for single-label logits."""
    logits = np.asarray(logits, np.float64)
    if multilabel:
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def headline_metrics(logits, targets, multilabel):
    """The figures logged at evaluation: accuracy (single-label), mean ROC AUC and mean average
    precision over the labels that have both classes."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    scores = scores_from_logits(logits, multilabel)
    out = {} if multilabel else {"accuracy": float((logits.argmax(1) == targets.argmax(1)).mean())}
    out["auc"] = float(np.nanmean(column_metric(roc_auc, scores, targets)))
    out["map"] = float(np.nanmean(column_metric(average_precision, scores, targets)))
    return out
