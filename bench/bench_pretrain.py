"""Pre-training throughput: the real input pipeline (prepared folder -> DataLoader -> copy ->
augmentation on the device -> train step) against the train step alone on batches already on
the device, in the same process; prints both in images/s, the loader's cost, and peak memory.

    python bench/bench_pretrain.py                                   # CPU, tiny model
    python bench/bench_pretrain.py --device cuda --model R50x1 --image-size 224 --batch-size 128 \
        --dtype bf16 --channels-last --steps 20 --workers 8

Without --data a synthetic grayscale prepared folder (--source-size px) is written to a
temporary folder first.
"""
import os
import resource
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the scripts; the tests' prepared-folder writer
import models  # noqa: E402
import pretrain  # noqa: E402
from prepared import write_prepared  # noqa: E402


def timed(run_step, steps, warmup, device):
    for _ in range(warmup):
        run_step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        loss = run_step()
    loss.item()
    sync()
    return time.perf_counter() - t


def get_args_parser():
    p = models.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data", default=None, help="prepared folder (default: synthetic)")
    p.add_argument("--model", default="R14x1", help="model name")
    p.add_argument("--image-size", type=int, default=64, help="training resolution")
    p.add_argument("--source-size", type=int, default=None,
                   help="side of the synthetic prepared images (default: image-size x 8/7)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="autocast dtype")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    return p


def main(a):
    device = torch.device(a.device)
    tmp = tempfile.TemporaryDirectory()
    data = a.data or str(write_prepared(
        os.path.join(tmp.name, "synthetic"), a.batch_size * (2 * a.warmup + 2 * a.steps), 0,
        [f"L{i}" for i in range(14)], "multilabel", a.source_size or a.image_size * 8 // 7))
    # pretrain's own settings (augmentation, seeds), so the measured pipeline is the real one
    args = pretrain.resolve_recipe(pretrain.get_args_parser().parse_args(
        ["--data", data, "--out", tmp.name, "--image-size", str(a.image_size), "--dtype", a.dtype,
         "--batch-size", str(a.batch_size), "--workers", str(a.workers)]
        + ["--channels-last"] * a.channels_last))
    dataset = pretrain.SourceDataset([data], None)
    torch.manual_seed(0)
    model = models.create_model(a.model, len(dataset.labels)).to(
        device, memory_format=torch.channels_last if a.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=a.dtype == "fp16")

    def step(x, y):
        return models.train_step(model, optimizer, scaler, [(x, y)], True, a.dtype)

    x0, y0, scale0 = dataset.__getitems__(list(range(a.batch_size)))
    x0 = pretrain.augment(x0.to(device), 0, 0, args, scale0)
    y0 = y0.to(device)
    t_model = timed(lambda: step(x0, y0), a.steps, a.warmup, device)

    sampler = models.GlobalBatchSampler(len(dataset), a.batch_size, seed=0)
    batches = iter(models.batch_loader(dataset, sampler, a.workers, device))
    counter = iter(range(10 ** 9))

    def real_step():
        i = next(counter)
        x, y, scale = next(batches)
        x = pretrain.augment(x.to(device, non_blocking=True), i, 0, args, scale)
        return step(x, y.to(device, non_blocking=True))

    t_real = timed(real_step, a.steps, a.warmup, device)
    n = a.steps * a.batch_size
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB GPU" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB RSS")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_pretrain {a.model} {a.image_size}px batch {a.batch_size} {a.dtype}"
          f"{' channels_last' if a.channels_last else ''} on {name}, {a.workers} workers")
    print(f"model step only (batch on device): {n / t_model:.1f} img/s")
    print(f"real pipeline (loader + augmentation + step): {n / t_real:.1f} img/s")
    print(f"loader cost: {100 * (t_real - t_model) / t_real:.1f}% of the step time (target <= 5%)")
    print(f"peak memory: {peak}")


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
