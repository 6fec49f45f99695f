"""pretrain.py and the training machinery it uses: schedule, data order, AGC, DDP = gradient
accumulation, bitwise resume after SIGTERM and kill -9, non-finite loss, CLI errors."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models  # noqa: E402
import pretrain  # noqa: E402
from prepared import write_prepared  # noqa: E402

TINY = ["--model", "R14x1", "--image-size", "24", "--batch-size", "8", "--warmup-steps", "2",
        "--dtype", "fp32", "--workers", "0", "--lr", "0.3", "--allow-any-schedule"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# the sources of these tests: multi-label with a validation split, stored at --image-size
SOURCE = {"n_train": 32, "n_eval": 8, "labels": ("A", "B", "C"), "task": "multilabel", "size": 24,
          "eval_split": "valid"}


def source(prepared, name, **changes):
    return str(prepared(name, **{**SOURCE, **changes}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_prepared(tmp_path_factory.mktemp("data") / "toy", **SOURCE))


def run_main(argv):
    return pretrain.main(pretrain.get_args_parser().parse_args(argv))


def start(argv, torchrun=False):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"] if torchrun else [])
    return subprocess.Popen(launcher + [str(ROOT / "pretrain.py")] + argv, cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def weights(path):
    return models.load_checkpoint(path)["model"]


def wait_for_step(proc, step, lines):
    """Read log lines until `step N/` with N >= step is printed."""
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return
    raise AssertionError("run ended before step %d:\n%s" % (step, "".join(lines)))


# ----------------------------------------------------------------------------------------
# Rules

def resolved(argv=()):
    return pretrain.resolve_recipe(pretrain.get_args_parser().parse_args(
        ["--data", "d", "--out", "o"] + list(argv)))


def test_default_recipe_lr_on_64_and_on_1_rank():
    """The paper's chest recipe on a 667k-image source: global batch 1024 whatever the ranks,
    lr 0.01 x 1024 / 256 = 0.04, warm-up over 15 epochs from 0.04 / 64, x0.1 at 30, 60, 80."""
    args = resolved()
    assert (args.batch_size, args.lr, args.epochs, args.agc, args.image_size) == (1024, 0.01, 90, 0.01, 224)
    spe = 667_000 // 1024  # 651 optimizer steps per epoch, by hand
    for world, accum in [(64, 1), (1, 8)]:
        sampler = models.GlobalBatchSampler(667_000, 1024, world, 0, accum)
        assert sampler.steps_per_epoch == spe
        warmup, decays, total = pretrain.schedule_steps(args, sampler.steps_per_epoch)
        assert (warmup, decays, total) == (15 * 651, [30 * 651, 60 * 651, 80 * 651], 90 * 651)
        pretrain.check_schedule(warmup, decays, total)  # accepted
        lr = [pretrain.learning_rate(s, args, warmup, decays)
              for s in (0, 4882, 9765, 19529, 19530, 39059, 39060, 52079, 52080, 58589)]
        # 0.04/64 = 0.000625 at step 0; halfway (4882 of 9765): 0.000625 + 0.039375 x 4882 / 9765
        assert lr == pytest.approx([0.000625, 0.000625 + 0.039375 * 4882 / 9765, 0.04, 0.04, 0.004,
                                    0.004, 0.0004, 0.0004, 0.00004, 0.00004], rel=1e-12)


def test_recipes_and_overrides():
    bit = resolved(["--recipe", "bit"])
    assert (bit.batch_size, bit.lr, bit.warmup_steps, bit.warmup_epochs, bit.warmup_from, bit.agc,
            bit.views) == (4096, 0.03, 5000, None, 0.0, 0.0, None)
    r50 = resolved(["--recipe", "imagenet1k-r50x1"])
    assert (r50.batch_size, r50.lr, r50.agc, r50.warmup_epochs, r50.input_norm, r50.crop_area) == (
        2048, 0.1, 0.0, 5, "imagenet", [0.08, 1.0])
    mine = resolved(["--lr", "0.02", "--warmup-steps", "100", "--decay-steps", "500", "900",
                     "--views", "all", "--shift", "0.1"])
    assert (mine.lr, mine.warmup_steps, mine.warmup_epochs, mine.decay_steps, mine.decay_epochs,
            mine.views, mine.shift, mine.batch_size) == (0.02, 100, None, [500, 900], None, None, 0.1, 1024)
    assert pretrain.schedule_steps(mine, 7) == (100, [500, 900], 90 * 7)
    assert pretrain.RECIPES["paper"]["decay_epochs"] == [30, 60, 80]  # the table is not modified


# The authors' configs/<name>.yaml: optim type, base_lr (per base_batch_size 256),
# train_local_batch_size, warmup_epochs; every one run on 16 nodes x 4 GPUs (sbatch -N 16).
AUTHORS_IMAGENET = {"imagenet1k_bit50x1": ("SGD", 0.1, 32, 5), "imagenet1k_bit152x4": ("SGD_AGC", 0.03, 16, 15),
                    "imagenet21k_bit50x1": ("SGD_AGC", 0.01, 32, 2), "imagenet21k_bit152x4": ("SGD_AGC", 0.01, 16, 2)}


@pytest.mark.parametrize("config", sorted(AUTHORS_IMAGENET))
def test_imagenet_recipes_are_the_authors_configs(config):
    optim, lr, local_batch, warmup = AUTHORS_IMAGENET[config]
    r = resolved(["--recipe", config.replace("_bit", "-r")])
    assert (r.batch_size, r.lr, r.warmup_epochs, r.agc) == (local_batch * 64, lr, warmup, 0.01 if optim == "SGD_AGC" else 0)
    assert (r.epochs, r.decay_epochs, r.weight_decay, r.warmup_from, r.input_norm) == (90, [30, 60, 80], 1e-4, 1 / 64,
                                                                                        "imagenet")
    if config.startswith("imagenet1k"):  # run_all.sh pre-trains ImageNet-1k with each model's recipe
        recipe = subprocess.run(["bash", "-c", 'source <(sed -n "/^imagenet_recipe()/,/^}/p" run_all.sh); '
                                 'imagenet_recipe "$0"', "R" + config.split("_bit")[1]], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        assert recipe == config.replace("_bit", "-r")


def test_refused_schedules(tmp_path, capsys):
    # BiT's 5000 warm-up steps on a NIH-sized source (19 steps / epoch): never leaves the warm-up
    with pytest.raises(models.UserError, match=r"warm-up \(5000 steps\) does not end before the "
                                               r"first lr decay \(step 570\)"):
        pretrain.check_schedule(5000, [570, 1140, 1520], 1710)
    with pytest.raises(models.UserError, match=r"never decays before the end of the run \(100 steps; "
                                               r"decays at steps \[100, 200\]\)"):
        pretrain.check_schedule(10, [100, 200], 100)
    with pytest.raises(models.UserError, match="decays at steps none"):
        pretrain.check_schedule(10, [], 100)
    pretrain.check_schedule(10, [11], 12)


def test_data_order_depends_on_global_batch_only():
    n, g = 50, 12

    def chunks(world, accum, epoch, start=0):
        out = {}
        for rank in range(world):
            s = models.GlobalBatchSampler(n, g, world, rank, accum, seed=3)
            s.set_epoch(epoch, start)
            batches = list(s)
            assert len(batches) == len(s)
            for i, b in enumerate(batches):
                step, m = divmod(i, accum)
                out[(step + start, m * world + rank)] = b
        return out

    ref = chunks(1, 1, 0)  # not split: one chunk per step
    for world, accum in [(2, 1), (1, 2), (2, 3), (3, 2), (1, 6)]:
        split = chunks(world, accum, 0)
        for step in range(n // g):
            merged = [i for c in range(world * accum) for i in split[(step, c)]]
            assert merged == ref[(step, 0)], (world, accum)
    assert chunks(2, 1, 0) == chunks(1, 2, 0)
    used = [i for b in ref.values() for i in b]
    assert len(set(used)) == len(used) == (n // g) * g
    assert chunks(1, 1, 1) != ref  # a new permutation each epoch
    resumed = chunks(2, 2, 0, start=2)
    assert resumed == {k: v for k, v in chunks(2, 2, 0).items() if k[0] >= 2}
    with pytest.raises(models.UserError):
        models.GlobalBatchSampler(n, 10, 3, 0, 1)


def test_adaptive_clip_grad_matches_timm():
    pytest.importorskip("timm")
    from timm.utils.agc import adaptive_clip_grad as timm_agc
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(16) * 1e-4),
          torch.nn.Parameter(torch.randn(5, 7))]
    for p in ps:
        p.grad = torch.randn_like(p) * torch.logspace(-4, 1, p.shape[0]).view(-1, *[1] * (p.ndim - 1))
    ref = [p.grad.clone() for p in ps]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for q, g in zip(qs, ref):
        q.grad = g.clone()
    models.adaptive_clip_grad(ps, 0.01, 1e-3)
    timm_agc(qs, 0.01, 1e-3)
    for p, q, g in zip(ps, qs, ref):
        torch.testing.assert_close(p.grad, q.grad)
        assert not torch.equal(p.grad, g)  # something was clipped


def test_rng_state_survives_weights_only_checkpoint(tmp_path):
    import random
    model = models.create_model("R14x1", 2)
    random.gauss(0, 1)  # a cached gaussian is part of Python's state
    models.save_checkpoint(tmp_path / "c.pt", model, step=7)
    expected = (random.gauss(0, 1), np.random.rand(), torch.rand(1).item())
    state = models.load_checkpoint(tmp_path / "c.pt")
    models.restore_rng(state["rng"])
    assert (random.gauss(0, 1), np.random.rand(), torch.rand(1).item()) == expected
    assert state["step"] == 7


def test_sources_are_united_with_unknown_labels(prepared):
    a = source(prepared, "a", n_train=4, n_eval=1, labels=("A", "B"), seed=1)
    b = source(prepared, "b", n_train=3, n_eval=1, labels=("B", "C"), seed=2)
    ds = pretrain.SourceDataset([a, b], "train")
    assert ds.labels == ["A", "B", "C"] and len(ds) == 7
    x, y, scale = ds.__getitems__([5, 0, 6])
    assert x.shape == (3, 24, 24, 1) and x.dtype == torch.uint8 and scale.tolist() == [1, 1, 1]
    assert torch.isnan(y[0, 0]) and torch.isnan(y[2, 0]) and torch.isnan(y[1, 2])
    raw_b = np.load(Path(b) / "images.npy")
    assert torch.equal(x[0], torch.from_numpy(raw_b[1]))


# ----------------------------------------------------------------------------------------
# Runs

def test_two_ranks_equal_one_rank_with_accumulation(data, tmp_path):
    common = ["--data", data, "--epochs", "1", "--log-every", "1"] + TINY
    ddp = start(common + ["--out", str(tmp_path / "ddp")], torchrun=True)
    rc, out_ddp = finish(ddp)
    assert rc == 0, out_ddp
    rc, out_acc = finish(start(common + ["--out", str(tmp_path / "acc"), "--accum-steps", "2"]))
    assert rc == 0, out_acc
    assert "2 rank(s) x 1 micro-step(s) x 4 images" in out_ddp
    assert "1 rank(s) x 2 micro-step(s) x 4 images" in out_acc
    a, b = weights(tmp_path / "ddp" / "model.pt"), weights(tmp_path / "acc" / "model.pt")
    torch.manual_seed(42)  # the initialisation of both runs (--seed 42)
    init = models.create_model("R14x1", 3).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert all(not torch.equal(a[k], init[k]) for k in a if k.endswith("conv.weight"))
    # the sharded evaluation sees all 8 validation images once: same metrics as one rank
    evals = [[l for l in o.splitlines() if l.startswith("eval ")] for o in (out_ddp, out_acc)]
    assert len(evals[0]) == len(evals[1]) == 1 and evals[0][0].endswith("n 8")
    for x, y in zip(evals[0][0].split()[6::2], evals[1][0].split()[6::2]):
        assert float(x) == pytest.approx(float(y), abs=1e-4)


def test_sigterm_and_kill9_then_resume_is_bitwise_identical(data, tmp_path):
    common = ["--data", data, "--epochs", "3", "--log-every", "1", "--save-every", "1",
              "--deterministic"] + TINY  # 12 steps
    ref = start(common + ["--out", str(tmp_path / "ref")])
    out = str(tmp_path / "run")
    lines = []
    proc = start(common + ["--out", out])
    wait_for_step(proc, 2, lines)
    proc.send_signal(signal.SIGTERM)
    rc, rest = finish(proc)
    assert rc == 128 + signal.SIGTERM and "stopped by signal" in rest, "".join(lines) + rest
    first_stop = models.load_checkpoint(Path(out) / "checkpoint.pt")["step"]
    assert 2 <= first_stop < 12 and not (Path(out) / "model.pt").exists()

    lines = []
    proc = start(common + ["--out", out, "--resume"])
    wait_for_step(proc, first_stop + 2, lines)
    assert proc.poll() is None
    proc.kill()  # SIGKILL: no chance to save
    proc.wait()
    assert f"resumed from {out}/checkpoint.pt at step {first_stop}" in "".join(lines)
    killed_at = models.load_checkpoint(Path(out) / "checkpoint.pt")["step"]
    assert first_stop < killed_at < 12

    rc, rest = finish(start(common + ["--out", out, "--resume"]))
    assert rc == 0 and f"at step {killed_at}" in rest, rest
    rc, ref_out = finish(ref)
    assert rc == 0, ref_out
    a, b = weights(tmp_path / "ref" / "model.pt"), weights(Path(out) / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_restarts_a_dead_rank_and_the_job_finishes(data, tmp_path):
    """Under torchrun --max-restarts=1 a rank killed with SIGKILL is restarted (with the other
    ranks), the new round resumes from the last checkpoint, and the job ends with exit 0."""
    out = tmp_path / "run"
    argv = ["--data", data, "--epochs", "10", "--log-every", "1", "--save-every", "2", "--resume",
            "--out", str(out)] + TINY  # 40 steps
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "--max-restarts=1", str(ROOT / "pretrain.py")] + argv,
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    wait_for_step(proc, 4, lines)
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    rc, rest = finish(proc)
    assert rc == 0, "".join(lines) + rest
    assert f"resumed from {out}/checkpoint.pt at step" in rest
    assert "done: 40 steps" in rest and (out / "model.pt").exists()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, capsys):
    # An absurd lr behind a long warm-up: step 1 runs at lr 0 and is saved, then it diverges.
    out = tmp_path / "run"
    argv = ["--data", data, "--out", str(out), "--epochs", "3", "--save-every", "1", "--log-every",
            "10"] + TINY + ["--lr", "1e30", "--warmup-steps", "1000000"]
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss" in err[0], err
    state = models.load_checkpoint(out / "checkpoint.pt")
    assert 1 <= state["step"] < 12 and f"(step {state['step']})" in err[0]
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "model.pt").exists()


def test_tiny_end_to_end_two_sources(prepared, tmp_path, capsys, monkeypatch):
    a = source(prepared, "a", n_train=16, n_eval=4, labels=("A", "B"), seed=1, views=("PA", "AP", "L"))
    b = source(prepared, "b", n_train=16, n_eval=4, labels=("B", "C"), seed=2)
    out = tmp_path / "run"
    argv = ["--data", a, "--data", b, "--out", str(out), "--epochs", "2", "--log-every", "2",
            "--channels-last"] + TINY
    argv[argv.index("--workers") + 1] = "1"
    monkeypatch.setattr(pretrain, "LONG_CPU_RUN_HOURS", 0)  # any run counts as long: the note shows
    run_main(argv)
    log = capsys.readouterr().out.splitlines()
    notes = [i for i, l in enumerate(log) if l.startswith("note: the 6 remaining steps take about") and "--epochs" in l]
    steps = [l for l in log if l.startswith("step ")]
    assert len(notes) == 1 and notes[0] < log.index(steps[0])  # before the first step
    # views PA AP: a keeps 11 of its 16 train images, b all 16: 27 // 8 = 3 steps per epoch
    assert len(steps) == 3 and steps[-1].startswith("step 6/6 epoch 2.00 loss ")
    for line in steps:
        f = line.split()
        assert f[6] == "lr" and f[8] == "img/s" and f[10] == "data" and math.isfinite(float(f[5]))
    evals = [l for l in log if l.startswith("eval step ")]
    assert len(evals) == 2
    args = json.loads((out / "args.json").read_text())
    assert args["data"] == [a, b] and args["agc"] == 0.01 and args["views"] == ["PA", "AP"]
    assert args["batch_size"] == 8 and args["epochs"] == 2 and args["warmup_epochs"] is None
    final = models.load_checkpoint(out / "model.pt")
    assert final["labels"] == ["A", "B", "C"] and final["task"] == "multilabel"
    assert final["step"] == 6 and "optimizer" not in final and final["input_norm"] == "bit"
    models.create_model("R14x1", 3).load_state_dict(final["model"])
    # best.pt: the weights of the lower of the two validation losses, which checkpoint.pt remembers
    losses = [float(l.split()[l.split().index("loss") + 1]) for l in evals]
    best = models.load_checkpoint(out / "best.pt")
    assert best["val_loss"] == pytest.approx(min(losses), abs=1e-4) and best["step"] == 3 * (1 + np.argmin(losses))
    assert best["labels"] == final["labels"] and best["input_norm"] == "bit" and best["model_name"] == "R14x1"
    assert models.load_checkpoint(out / "checkpoint.pt")["best_loss"] == best["val_loss"]
    assert models.read_weights(str(out / "best.pt"))[1] == "bit"
    # finished run: without --resume the folder is protected, with it nothing is left to do
    with pytest.raises(models.UserError, match="--resume"):
        run_main(argv)
    # from these weights; slow steps still log: a line per step when LOG_SECONDS have passed
    monkeypatch.setattr(pretrain, "LOG_SECONDS", 0)
    argv[argv.index("--log-every") + 1] = "1000"
    run_main(argv[:argv.index("--out") + 1] + [str(tmp_path / "init"), "--init", str(out / "best.pt")]
             + argv[argv.index("--out") + 2:])
    assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]) == 6
    assert (tmp_path / "init" / "model.pt").exists()


def test_resume_refuses_other_training_and_bad_checkpoints(data, prepared, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["--data", data, "--out", out, "--epochs", "1", "--log-every", "10"] + TINY
    run_main(argv)
    assert "--lr is 0.3 in the checkpoint but 0.2 now" in cli(
        argv + ["--resume", "--lr", "0.2"], capsys)
    assert "labels are ['A', 'B', 'C'] but the data's are ['A', 'B', 'D']" in cli(
        ["--data", source(prepared, "d", labels=("A", "B", "D"))] + argv[2:] + ["--resume"], capsys)
    capsys.readouterr()
    # on purpose: the change is said in one line, the run goes on (here: nothing left to do)
    run_main(argv + ["--resume", "--lr", "0.2", "--resume-changed", "--workers", "1"])
    assert "resuming with a change: --lr is 0.3" in capsys.readouterr().out
    ckpt = Path(out) / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # truncated, as by a full disk
    assert "not a checkpoint or weights file that can be read" in cli(argv + ["--resume"], capsys)
    torch.save({"model": {}, "epoch": 3}, ckpt)  # another program's
    assert "is not a pretrain.py checkpoint" in cli(argv + ["--resume"], capsys)


def test_validation_falls_back_to_the_test_split(prepared, tmp_path, capsys):
    for split, expected in [("test", "no 'valid' split: validating on the 'test' split (8 images)"),
                            ("train", "no 'valid' or 'test' split: no validation, no best.pt")]:
        data = source(prepared, split, n_train=8, eval_split=split)
        out = tmp_path / f"run_{split}"
        run_main(["--data", data, "--out", str(out), "--epochs", "1"] + TINY)
        assert expected in capsys.readouterr().out
        assert (out / "best.pt").exists() == (split == "test") and (out / "model.pt").exists()


# ----------------------------------------------------------------------------------------
# Command line

def cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        models.run_cli(pretrain.main, pretrain.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_exit_2(data, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    assert "unknown model 'R13x7'" in cli(["--data", data, "--model", "R13x7"] + out, capsys)
    assert "no meta.json" in cli(["--data", str(tmp_path / "missing")] + out, capsys)
    assert "not divisible" in cli(["--data", data, "--batch-size", "9", "--accum-steps", "2"] + out,
                                  capsys)
    assert "fewer than one global batch" in cli(["--data", data, "--batch-size", "64"] + out, capsys)
    assert "does not exist" in cli(["--data", data, "--init", str(tmp_path / "x.npz")] + out, capsys)
    assert "--out" in cli(["--data", data], capsys)
    assert "no train images with views L in" in cli(["--data", data, "--views", "L"] + out, capsys)
    assert "warm-up (4 steps) does not end before the first lr decay (step 4)" in cli(
        ["--data", data, "--batch-size", "8", "--warmup-epochs", "1", "--decay-epochs", "1", "2"] + out, capsys)
    assert "argument --decay-epochs: not allowed with argument --decay-steps" in cli(
        ["--data", data, "--decay-steps", "3", "--decay-epochs", "1"] + out, capsys)
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA GPU is available here" in cli(["--data", data, "--device", "cuda"] + out, capsys)
    # and the real command line
    proc = subprocess.run([sys.executable, "pretrain.py", "--data", data, "--model", "nope"] + out,
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unknown model" in proc.stderr


def test_device_input_pipeline_and_random_affine():
    images = torch.randint(0, 256, (4, 16, 16, 1), dtype=torch.uint8)
    x = models.to_model_input(images)
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], images[..., 0].float() / 127.5 - 1)
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale repeated to RGB
    # the identity transform reproduces the input; a flip mirrors it; a 1/2 crop magnifies 2x
    same = models.random_affine(x, 16, hflip=False)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    gen = torch.Generator().manual_seed(0)
    flipped = models.random_affine(x, 16, rotate=0, hflip=True, generator=gen)
    for a, b in zip(flipped, x):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)
    ramp = torch.arange(16.0).repeat(1, 3, 16, 1) / 7.5 - 1  # constant columns, left to right
    crop = models.random_affine(ramp, 8, crop=0.5, hflip=False, generator=gen)
    step = crop[0, 0, 0].diff()
    torch.testing.assert_close(step, torch.full_like(step, 1 / 7.5))  # one source pixel per output pixel
    rotated = models.random_affine(x, 16, rotate=45, hflip=False, generator=gen)
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)
