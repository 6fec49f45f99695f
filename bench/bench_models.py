"""Speed and memory of our BiT R50x1 against timm's resnetv2_50x1_bit, same settings.

CPU (default: batch 8, 128 px, fp32 and bf16 autocast):
    python bench/bench_models.py
    python bench/bench_models.py --no-compile            # skip the torch.compile rows
GPU (one short run; prints the fraction of the GPU's peak bf16 FLOP/s reached too):
    python bench/bench_models.py --device cuda --size 224 --batch 64 --dtype bf16

Rows: training step (forward, backward, SGD step) and inference, images/s, for ours and timm,
and ours/timm; then what channels_last and torch.compile give for ours; then GroupNorm and
Weight Standardization forward + backward, models.py's fused path against the written-out
formula (`.fused = False`), eager and under torch.compile.
Timings are the best of --repeats, ours and timm interleaved, so that load from other
processes hits both alike. Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the
peak RSS growth of a fresh subprocess per configuration while it runs two steps.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="precisions to run (bf16 = autocast)")
    p.add_argument("--model", default="R50x1",
                   choices=["R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"],  # those timm has
                   help="BiT model; compared with timm's resnetv2_<depth>x<width>_bit")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (best is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds allowed for each torch.compile row, run in a subprocess "
                        "(default: 600 on CPU, 40 on CUDA so that the GPU run stays under 2 minutes)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (CPU)")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="peak FLOP/s for the %%peak columns (default: H100/H200 SXM dense bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return p


def build(impl, cfg):
    """The model of one configuration, on its device and memory format, with an SGD optimiser."""
    if impl == "ours":
        model = models.create_model(cfg["model"], 1000)
    else:
        import timm
        depth, width = cfg["model"][1:].split("x")
        model = timm.create_model(f"resnetv2_{depth}x{width}_bit", pretrained=False, num_classes=1000)
    device = torch.device(cfg["device"])
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (cfg["batch"],), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if cfg["compile"]:
        model = torch.compile(model)
    return model, opt, x, y


def make_step(model, opt, x, y, cfg):
    device = torch.device(cfg["device"])
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bf16")

    def train():
        model.train()
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        model.eval()
        with torch.autocast(**amp):
            model(x)

    return train if cfg["mode"] == "train" else infer


def sync(cfg):
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, cfg):
    sync(cfg)
    t = time.perf_counter()
    step()
    sync(cfg)
    return time.perf_counter() - t


def count_flops(impl, cfg):
    """FLOPs of one step (forward, plus backward when training), counted on the meta device:
    no memory, no time, the same count as on any real device."""
    from torch.utils.flop_counter import FlopCounterMode
    model, _, x, y = build(impl, dict(cfg, device="meta", compile=False))
    with FlopCounterMode(display=False) as counter:
        if cfg["mode"] == "train":
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops()


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss():
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that the peak of the timed steps
    is not hidden by a higher peak while the model was built. getrusage's ru_maxrss cannot
    do this, and it even keeps the parent's peak across fork + exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_child(cfg):
    """One configuration in a fresh process: images/s and peak memory growth (MB)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model, opt, x, y = build(cfg["impl"], cfg)
    step = make_step(model, opt, x, y, cfg)
    if cfg["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
        before = rss_mb("VmRSS")
    times = [timed(step, cfg) for _ in range(cfg["warmup"] + cfg["repeats"])]
    if cfg["device"].startswith("cuda"):
        mem = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        mem = rss_mb("VmHWM") - before
    print(json.dumps({"ips": cfg["batch"] / min(times[cfg["warmup"]:]), "mem": mem}))


def in_subprocess(cfg, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1][:80]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def bench_norms(args, device):
    """Forward + backward of GroupNorm (activations of R50 stages) and of Weight
    Standardization (the kernel alone, as the conv sees it), fused vs written out."""
    print(f"\nGroupNorm / Weight Standardization forward + backward, ms (best of 10; batch "
          f"{args.batch}); compiled = torch.compile of the same module")
    print(f"{'norm':>4} {'shape':>20} {'format':>13} {'dtype':>5} {'fused':>9} {'written':>9} "
          f"{'fused c.':>9} {'written c.':>10} {'written/fused eager':>19} {'compiled':>9}")
    side = args.size // 4
    cases = [("gn", (args.batch, c, s, s)) for c, s in [(256, side), (512, side // 2), (2048, side // 8)]]
    cases += [("ws", shape) for shape in [(256, 64, 1, 1), (128, 128, 3, 3), (2048, 1024, 1, 1)]]
    for norm, shape in cases:
        for fmt in ["NCHW", "channels_last"] if norm == "gn" else ["-"]:
            for dtype in args.dtype:
                torch._dynamo.reset()  # each case compiles afresh (no recompile limit across shapes)
                mods = []
                for fused in (True, False):
                    if norm == "gn":
                        m = models.GroupNorm(models.GN_GROUPS, shape[1]).to(device)
                    else:
                        m = models.StdConv2d(shape[1], shape[0], shape[2], bias=False).to(device)
                    m.fused = fused
                    mods.append(m)
                fns = mods + ([] if args.no_compile else [torch.compile(m) for m in mods])
                if norm == "gn":
                    x = torch.randn(shape, device=device)
                    if dtype == "bf16":
                        x = x.bfloat16()  # what a GroupNorm sees after a conv under bf16 autocast
                    if fmt == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                else:  # the conv on a tiny input: the time is WS's, the conv's is the same for both
                    x = torch.randn(1, shape[1], shape[2], shape[3], device=device)
                best = [float("inf")] * len(fns)
                cfg = {"device": args.device}
                for r in range(12):
                    for i in [(r + k) % len(fns) for k in range(len(fns))]:  # rotate: no position bias
                        xx = x.detach().requires_grad_(norm == "gn")

                        def step():
                            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                                out = fns[i](xx)
                            out.float().sum().backward()
                        t = timed(step, cfg)
                        if r >= 2:
                            best[i] = min(best[i], t)
                ms = [f"{b * 1e3:9.2f}" for b in best] + [f"{'-':>9}"] * (4 - len(best))
                ratio_c = f"{best[3] / best[2]:9.2f}" if len(best) == 4 else f"{'-':>9}"
                print(f"{norm:>4} {str(shape):>20} {fmt:>13} {dtype:>5} {ms[0]} {ms[1]} {ms[2]} "
                      f"{ms[3]:>10} {best[1] / best[0]:19.2f} {ratio_c}", flush=True)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    base = {"model": args.model, "device": args.device, "size": args.size, "batch": args.batch,
            "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
            "channels_last": False, "compile": False}
    print(f"{args.model} vs timm, batch {args.batch}, {args.size} px, device {args.device} "
          f"({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}")
    head = (f"{'mode':>6} {'dtype':>5} {'variant':>22} {'ours img/s':>11} {'timm img/s':>11} "
            f"{'ours/timm':>10} {'ours MB':>9} {'timm MB':>9}")
    head += f" {'ours %peak':>10} {'timm %peak':>10}"
    print(head)
    for dtype in args.dtype:
        for mode in ["train", "infer"]:
            for variant in ["default", "channels_last"]:
                cfg = dict(base, dtype=dtype, mode=mode, channels_last=variant == "channels_last")
                built = {impl: build(impl, cfg) for impl in ["ours", "timm"]}
                steps = {impl: make_step(*b, cfg) for impl, b in built.items()}
                for _ in range(args.warmup):
                    for step in steps.values():
                        step()
                best = {impl: float("inf") for impl in steps}
                if on_gpu:
                    mem = {}
                for r in range(args.repeats):  # interleaved, order alternating: both see the same load
                    for impl, step in list(steps.items())[::1 if r % 2 == 0 else -1]:
                        if on_gpu:
                            torch.cuda.reset_peak_memory_stats()
                        best[impl] = min(best[impl], timed(step, cfg))
                        if on_gpu:
                            mem[impl] = torch.cuda.max_memory_allocated() / 2 ** 20
                if not on_gpu:
                    mem = {impl: None for impl in steps}
                    if not args.no_memory:
                        for impl in steps:
                            res, err = in_subprocess(dict(cfg, impl=impl, warmup=0, repeats=2), timeout=None)
                            mem[impl] = res["mem"] if res else None
                ips = {impl: args.batch / best[impl] for impl in best}
                mb = {impl: f"{mem[impl]:9.0f}" if mem[impl] is not None else f"{'-':>9}" for impl in mem}
                line = (f"{mode:>6} {dtype:>5} {variant:>22} {ips['ours']:11.1f} {ips['timm']:11.1f} "
                        f"{ips['ours'] / ips['timm']:10.2f} {mb['ours']} {mb['timm']}")
                frac = {impl: count_flops(impl, cfg) / best[impl] / args.peak_flops for impl in best}
                line += f" {frac['ours'] * 100:9.2f}% {frac['timm'] * 100:9.2f}%"
                print(line, flush=True)
                del built, steps
            if not args.no_compile:
                # compile in a fresh subprocess with a time limit: slow on some CPUs, never hangs the run
                cfg = dict(base, dtype=dtype, mode=mode, compile=True, impl="ours")
                res, err = in_subprocess(cfg, args.compile_timeout or (40 if on_gpu else 600))
                if res:
                    print(f"{mode:>6} {dtype:>5} {'ours torch.compile':>22} {res['ips']:11.1f} {'':>11} "
                          f"{'':>10} {res['mem']:9.0f}", flush=True)
                else:
                    print(f"{mode:>6} {dtype:>5} {'ours torch.compile':>22} {err}", flush=True)
    bench_norms(args, device)


if __name__ == "__main__":
    parser = get_args_parser()
    parsed = parser.parse_args()
    if parsed.child:
        run_child(json.loads(parsed.child))
    else:
        models.run_cli(main, parser)
