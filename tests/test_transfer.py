"""transfer.py: BiT-HyperRule, schedules, sampling, evaluation metrics against scikit-learn,
a tiny end-to-end fine-tuning run with resume-skip, weight loading, and its command line."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import transfer  # noqa: E402

TINY = ["--model", "R14x1", "--resize", "20", "--crop", "16", "--batch-size", "4", "--log-every", "1",
        "--bootstrap", "50"]


def run_cli_capture(capsys, main, parser, argv):
    """Run a script's CLI in-process; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as exc:
        models.run_cli(main, parser, argv)
    return exc.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# HyperRule and schedule

@pytest.mark.parametrize("n, schedule, mixup", [
    (1, [100, 200, 300, 400, 500], 0.0),
    (19_999, [100, 200, 300, 400, 500], 0.0),
    (20_000, [500, 3000, 6000, 9000, 10_000], 0.1),
    (499_999, [500, 3000, 6000, 9000, 10_000], 0.1),
    (500_000, [500, 6000, 12_000, 18_000, 20_000], 0.1),
])
def test_hyperrule_schedule_and_mixup(n, schedule, mixup):
    rule = transfer.hyperrule(n, (224, 224))
    assert rule["schedule"] == schedule and rule["mixup"] == mixup


@pytest.mark.parametrize("hw, res", [((32, 32), (160, 128)), ((95, 97), (160, 128)),  # 9215 < 9216
                                     ((96, 96), (512, 480)), ((1, 9216), (512, 480)),
                                     ((2828, 2320), (512, 480))])
def test_hyperrule_resolution(hw, res):
    rule = transfer.hyperrule(100, hw)
    assert (rule["resize"], rule["crop"]) == res


def test_lr_schedule_decays_at_the_boundary():
    sched, base = [100, 200, 300, 400, 500], 0.003
    assert transfer.lr_at(0, sched, base) == 0.0
    assert transfer.lr_at(50, sched, base) == pytest.approx(0.0015)
    # models.step_lr's convention: the decay takes effect AT the boundary (BiT's code one step later)
    for step, lr in [(100, base), (199, base), (200, base / 10), (299, base / 10), (300, base / 100),
                     (400, base / 1000), (499, base / 1000)]:
        assert transfer.lr_at(step, sched, base) == pytest.approx(lr)
    assert transfer.scale_schedule(sched, 60) == [12, 24, 36, 48, 60]
    assert transfer.scale_schedule([500, 3000, 6000, 9000, 10_000], 3)[-1] == 3


def test_min_epochs_adds_steps_to_a_larger_subset_only():
    parser = transfer.get_args_parser()
    args = parser.parse_args(["--data", "x", "--steps", "40", "--min-epochs", "10", "--batch-size", "16"])
    # 10 passes over 150 images at batch 16 need ceil(93.75) = 94 steps; warm-up and decays keep
    # the HyperRule's fractions (1/5, 2/5, 3/5, 4/5)
    assert transfer.settings(args, 150, (64, 64))["schedule"] == [19, 38, 56, 75, 94]
    assert transfer.settings(args, 20, (64, 64))["schedule"] == [8, 16, 24, 32, 40]  # 13 steps suffice
    no_floor = parser.parse_args(["--data", "x", "--steps", "40", "--batch-size", "16"])
    assert transfer.settings(no_floor, 150, (64, 64))["schedule"][-1] == 40


def test_oversampling_weights_balance_classes():
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    w = transfer.oversampling_weights(y)
    assert np.allclose(w, [1 / 3, 1 / 3, 1 / 3, 1])
    plan = transfer.batch_indices(4, 64, 50, seed=0, weights=w)
    assert abs((plan == 3).mean() - 0.5) < 0.05  # the minority class is drawn half of the time


def test_batch_indices_passes_and_determinism():
    plan = transfer.batch_indices(10, 4, 5, seed=3)  # 20 draws = two full passes over 10 rows
    assert plan.shape == (5, 4)
    flat = plan.ravel()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert np.array_equal(plan, transfer.batch_indices(10, 4, 5, seed=3))
    assert not np.array_equal(plan, transfer.batch_indices(10, 4, 5, seed=4))


# ----------------------------------------------------------------------------------------
# Metrics against scikit-learn

def test_per_class_metrics_multiclass_match_sklearn():
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score
    rng = np.random.default_rng(0)
    n, c = 200, 4
    logits = np.round(rng.normal(size=(n, c)), 1)  # rounding makes ties
    cls = rng.integers(0, c, n)
    cls[:5] = 3
    targets = np.eye(c)[cls]
    table = transfer.per_class_metrics(logits, targets, False, list("abcd"))
    p, r, f, s = precision_recall_fscore_support(cls, logits.argmax(1), labels=range(c), zero_division=0)
    probs = models.scores_from_logits(logits, False)
    assert np.allclose(table["precision"], p) and np.allclose(table["recall"], r)
    assert np.allclose(table["f1"], f) and list(table["support"]) == list(s)
    for j in range(c):
        assert table["auc"][j] == pytest.approx(roc_auc_score(cls == j, probs[:, j]))
        assert table["ap"][j] == pytest.approx(average_precision_score(cls == j, probs[:, j]))
    head = models.headline_metrics(logits, targets, False)
    assert head["accuracy"] == pytest.approx((logits.argmax(1) == cls).mean())


def test_per_class_metrics_multilabel_nan_and_zero_division():
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
    rng = np.random.default_rng(1)
    n, c = 150, 3
    logits = np.round(rng.normal(size=(n, c)), 1)
    targets = (rng.random((n, c)) < 0.3).astype(float)
    targets[rng.random((n, c)) < 0.2] = np.nan
    logits[:, 2] = -5.0  # never predicted positive: precision undefined -> 0 as sklearn's zero_division=0
    table = transfer.per_class_metrics(logits, targets, True, ["x", "y", "z"])
    for j in range(c):
        known = ~np.isnan(targets[:, j])
        y, pred = targets[known, j] > 0.5, logits[known, j] > 0  # sigmoid > 0.5
        assert table["precision"][j] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert table["recall"][j] == pytest.approx(recall_score(y, pred, zero_division=0))
        assert table["f1"][j] == pytest.approx(f1_score(y, pred, zero_division=0))
        assert table["auc"][j] == pytest.approx(roc_auc_score(y, logits[known, j]))
    assert table["precision"][2] == 0.0


def test_bootstrap_ci_seeded_and_brackets_estimate():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(300, 3))
    targets = np.eye(3)[np.where(rng.random(300) < 0.7, logits.argmax(1), rng.integers(0, 3, 300))]
    acc = models.headline_metrics(logits, targets, False)["accuracy"]
    low, high = transfer.bootstrap_ci(logits, targets, False, samples=300, seed=0)
    assert low < acc < high and high - low < 0.2
    assert (low, high) == transfer.bootstrap_ci(logits, targets, False, samples=300, seed=0)
    assert (low, high) != transfer.bootstrap_ci(logits, targets, False, samples=300, seed=1)
    ml_targets = (rng.random((300, 3)) < 0.5).astype(float)
    ml_targets[:10, 0] = np.nan
    auc = models.headline_metrics(logits, ml_targets, True)["auc"]
    low, high = transfer.bootstrap_ci(logits, ml_targets, True, samples=100, seed=0)
    assert low < auc < high
    assert np.isnan(transfer.bootstrap_ci(logits, targets, False, samples=0)[0])


# ----------------------------------------------------------------------------------------
# End to end

def test_transfer_end_to_end_and_resume_skip(prepared, tmp_path, capsys):
    data = prepared("tb")
    out = tmp_path / "out"
    args = transfer.get_args_parser().parse_args(["--data", str(data), "--out", str(out), "--steps", "3",
                                                  "--source-size", "1234", "--save"] + TINY)
    row = transfer.main(args)
    log = capsys.readouterr().out
    assert re.search(r"^step 3/3 loss \d", log, re.M) and re.search(r"^eval .*accuracy=", log, re.M)
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 1
    r = results.iloc[0]
    assert (r["method"], r["source"], r["model"], r["target"], r["shots"], r["seed"]) == \
        ("finetune", "scratch", "R14x1", "tb", 0, 0)
    assert r["num_train"] == 12 and r["num_eval"] == 9 and r["steps"] == 3 and r["source_size"] == 1234
    assert 0 <= r["accuracy"] <= 1 and r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    assert r["accuracy"] == pytest.approx(row["accuracy"])
    assert json.loads(r["args"])["steps"] == 3 and r["commit"]
    folder = out / "tb" / "finetune-scratch-R14x1" / "shots0-seed0"
    per_class = pd.read_csv(folder / "per_class.csv")
    assert list(per_class["label"]) == ["a", "b", "c"] and per_class["support"].sum() == 9
    assert r["outcomes"] == "tb/finetune-scratch-R14x1/shots0-seed0/outcomes.npy"  # each test image's, for the summary
    assert np.load(out / r["outcomes"]).mean() == pytest.approx(r["accuracy"]) and len(np.load(out / r["outcomes"])) == 9
    assert json.loads((folder / "args.json").read_text())["data"] == str(data)
    assert (out / "args.json").exists()
    saved = models.load_checkpoint(folder / "model.pt")
    assert saved["model"]["head.conv.weight"].shape[0] == 3 and saved["input_norm"] == "bit"
    assert r["input_norm"] == "bit" and r["pipeline"] == "bit"
    # Same command again: skipped, nothing appended
    transfer.main(transfer.get_args_parser().parse_args(["--data", str(data), "--out", str(out),
                                                         "--steps", "3"] + TINY))
    assert "skip method=finetune" in capsys.readouterr().out
    assert len(pd.read_csv(out / "results.csv")) == 1


def test_a_cell_is_skipped_only_for_the_same_weights_and_settings(prepared, tmp_path, capsys):
    """The row of a cell records what made it (a content hash of --init, a hash of the settings):
    a rerun skips it only when both match; other weights at the same path, or other settings,
    run the cell again and replace its row."""
    data, weights, out = prepared("tb"), tmp_path / "pre" / "best.pt", tmp_path / "o"
    weights.parent.mkdir()
    torch.manual_seed(0)
    models.save_checkpoint(str(weights), models.create_model("R14x1", 5), step=3)
    argv = ["--data", str(data), "--out", str(out), "--init", str(weights), "--steps", "2"] + TINY

    def rerun(*extra):
        transfer.main(transfer.get_args_parser().parse_args(argv + list(extra)))
        return capsys.readouterr().out, transfer.read_table(out / "results.csv")

    _, first = rerun()
    log, again = rerun()
    assert "skip method=finetune" in log and again.equals(first)
    torch.manual_seed(1)
    models.save_checkpoint(str(weights), models.create_model("R14x1", 5), step=8)  # the source trained on
    log, changed = rerun()
    assert "came from other weights or settings" in log and len(changed) == 1
    assert changed["weights"][0] != first["weights"][0] and changed["settings"][0] == first["settings"][0]
    log, longer = rerun("--steps", "3")
    assert "came from other weights or settings" in log and len(longer) == 1 and longer["steps"][0] == "3"
    assert longer["settings"][0] != changed["settings"][0]


def test_multilabel_target_oversampling_batch_split_mixup(prepared, tmp_path):
    data = prepared("ml", task="multilabel", n_train=10, n_eval=10)
    args = transfer.get_args_parser().parse_args(
        ["--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2", "--batch-split", "2",
         "--oversample", "--mixup", "0.1", "--seed", "1"] + TINY)
    row = transfer.main(args)
    assert row["task"] == "multilabel" and row["headline"] == "auc" and np.isnan(row["accuracy"])
    assert 0 <= row["auc"] <= 1 and row["seed"] == 1


@pytest.mark.parametrize("recipe", ["paper", "bit"])
def test_init_from_own_checkpoint_gets_the_recipes_head(tmp_path, recipe):
    src = models.create_model("R14x1", 5)
    torch.nn.init.normal_(src.head.conv.weight)
    path = tmp_path / "pre" / "model.pt"
    path.parent.mkdir()
    models.save_checkpoint(str(path), src, step=7)
    args = transfer.get_args_parser().parse_args(["--data", "x", "--init", str(path), "--model", "R14x1",
                                                  "--recipe", recipe])
    model, norm = transfer.init_model(args, 3)
    assert torch.equal(model.root.conv.weight, src.root.conv.weight) and norm == "bit"
    w, b = model.head.conv.weight, model.head.conv.bias
    assert w.shape[0] == 3
    if recipe == "bit":  # BiT: zero head
        assert w.abs().sum() == 0 and b.abs().sum() == 0
    else:  # the paper: PyTorch's default Conv2d init, uniform in +-1/sqrt(fan_in) (weight and bias)
        bound = 1 / math.sqrt(w.shape[1])
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_agc_finetune_step_matches_the_formula():
    """One step of the paper's recipe (SGD Nesterov 0.9 + AGC 0.01 / 1e-3, classifier weight
    not clipped) against the update computed by hand."""
    torch.manual_seed(0)
    model = models.create_model("R14x1", 3)
    x, y = torch.randn(4, 3, 16, 16), torch.eye(3)[[0, 1, 2, 0]]
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    models.loss_fn(model(x), y, False).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cfg = transfer.settings(transfer.get_args_parser().parse_args(["--data", "x"]), 100, (224, 224))
    assert cfg["agc"] == 0.01 and cfg["nesterov"] and cfg["lr"] == 0.001 and cfg["batch_size"] == 128
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    # the authors' rule (optim/sgd_agc.py): every tensor but the 2-D / 4-D ones with one row per class
    agc_params = models.agc_parameters(model, 3)
    assert [n for n, p in model.named_parameters() if all(p is not q for q in agc_params)] == ["head.conv.weight"]
    models.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), [(x, y)], False,
                      agc_params=agc_params, agc=cfg["agc"])
    clipped = 0
    for name, p in model.named_parameters():
        g, w = grads[name], ref[name]
        rows = (g.reshape(1, -1), w.reshape(1, -1)) if g.ndim <= 1 else (g.flatten(1), w.flatten(1))
        g_norm, w_norm = rows[0].norm(dim=1), rows[1].norm(dim=1)
        limit = 0.01 * torch.clamp(w_norm, min=1e-3)
        scale = torch.where(g_norm > limit, limit / g_norm, torch.ones_like(g_norm))
        if name == "head.conv.weight":
            scale = torch.ones_like(scale)
        clipped += int((scale < 1).sum())
        step = (rows[0] * scale[:, None]).reshape(g.shape) * 1.9  # Nesterov, first step: g + 0.9 g
        assert torch.allclose(p.detach(), w - lr * step, atol=1e-6), name
    assert clipped > 0
    bit = transfer.settings(transfer.get_args_parser().parse_args(["--data", "x", "--recipe", "bit"]), 100, (9, 9))
    assert bit["agc"] == 0 and not bit["nesterov"] and bit["batch_size"] == 512


def test_chest_pipeline_settings_and_run(prepared, tmp_path):
    parser = transfer.get_args_parser()
    chest = transfer.settings(parser.parse_args(["--data", "x", "--pipeline", "chest"]), 100, (2000, 2000))
    assert (chest["resize"], chest["crop"], chest["schedule"][-1]) == (224, 224, 500)
    assert chest["augment"] == {"translate": 0.25, "scale": 0.1, "rotate": 45.0, "padding": "reflection"}
    bit = transfer.settings(parser.parse_args(["--data", "x", "--pipeline", "bit"]), 100, (2000, 2000))
    assert (bit["resize"], bit["crop"], bit["augment"]) == (512, 480, {})
    assert transfer.long_cpu_run_note("cpu", bit).startswith("note: 500 steps of batch 128 at 480 px")
    assert transfer.long_cpu_run_note("cuda", bit) is None
    data = prepared("px")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "pipeline": "chest"}))
    row = transfer.main(parser.parse_args(["--data", str(data), "--out", str(tmp_path / "o"), "--steps", "2"]
                                          + TINY))
    assert row["pipeline"] == "chest" and row["headline"] == "auc" and row["input_norm"] == "bit"


def test_a_3_to_2_target_is_seen_as_the_authors_bit_pipeline_sees_it(tmp_path, monkeypatch):
    """A 300 x 200 image whose red channel is its x coordinate and green its y, prepared as a
    BiT-pipeline target (stored whole, squashed, with its aspect 1.5), fine-tuned and evaluated
    at resize 64 / crop 60 (the HyperRule's 512 / 480 scaled). Evaluation sees the authors'
    Resize((60, 60)) of the whole image; every training input is one of the crops of their
    Resize(64) (shorter side) + RandomCrop(60) + flip."""
    import torchvision.transforms as T
    from PIL import Image
    import prepare_data
    y, x = np.mgrid[0:200, 0:300]
    ramp = np.stack([x * 255 / 299, y * 255 / 199, np.full(x.shape, 128.0)], -1).round().astype(np.uint8)
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "raw" / split / c)
            Image.fromarray(ramp).save(tmp_path / "raw" / split / c / "ramp.png")
    data = tmp_path / "ramp"
    prepare_data.main(prepare_data.get_args_parser().parse_args(
        ["--dataset", "imagefolder", "--root", str(tmp_path / "raw"), "--out", str(data), "--size", "64",
         "--valid-fraction", "0", "--workers", "1"]))
    table = pd.read_csv(data / "labels.csv")
    assert (table.aspect == 1.5).all() and json.loads((data / "meta.json").read_text())["geometry"] == "squash"
    stored = np.load(data / "images.npy")[0]
    assert np.array_equal(stored, np.asarray(Image.fromarray(ramp).resize((64, 64), Image.BILINEAR)))
    seen = {"train": [], "eval": []}
    affine, predict = models.random_affine, models.predict

    def record_affine(*a, **k):
        out = affine(*a, **k)
        seen["train"] += list(out)
        return out

    def record_predict(model, batches, *a, **k):
        batches = list(batches)
        seen["eval"] += [x for xs, _ in batches for x in xs]
        return predict(model, batches, *a, **k)
    monkeypatch.setattr(models, "random_affine", record_affine)
    monkeypatch.setattr(models, "predict", record_predict)
    transfer.main(transfer.get_args_parser().parse_args(
        ["--data", str(data), "--out", str(tmp_path / "o"), "--model", "R14x0.5", "--resize", "64", "--crop", "60",
         "--batch-size", "4", "--steps", "3", "--bootstrap", "5"]))

    def pixels(x):  # model input in [-1, 1] -> the image's 0..255 scale, (60, 60, 3)
        return ((x.permute(1, 2, 0).numpy() + 1) * 127.5)
    authors_eval = np.asarray(T.Resize((60, 60))(Image.fromarray(ramp)), np.float64)
    assert len(seen["eval"]) == 2 and len(seen["train"]) == 12
    for x in seen["eval"]:
        print(f"eval: mean |ours - authors' Resize((60, 60))| = {np.abs(pixels(x) - authors_eval).mean():.3f} / 255")
        assert np.abs(pixels(x) - authors_eval).mean() < 1.0
    resized = np.asarray(T.Resize(64)(Image.fromarray(ramp)), np.float64)   # 96 x 64
    crops = [c for top in range(5) for left in range(37) for c in (resized[top:top + 60, left:left + 60],
                                                                   resized[top:top + 60, left:left + 60][:, ::-1])]
    for x in seen["train"]:
        print(f"train: mean |ours - nearest authors' crop| = {min(np.abs(pixels(x) - c).mean() for c in crops):.3f} / 255")
        assert min(np.abs(pixels(x) - c).mean() for c in crops) < 1.5
    spans = [np.ptp(pixels(x)[:, :, 0]) for x in seen["train"]]   # the red ramp across 60 of the 96 columns
    print("red spans", np.round(spans, 1), "authors'", round(255 * 59 / 95, 1))
    assert np.allclose(spans, 255 * 59 / 95, atol=4)


def test_nonfinite_loss_is_a_failure_not_a_row(prepared, tmp_path, capsys, monkeypatch):
    data = prepared("tb")
    monkeypatch.setattr(models, "loss_fn", lambda logits, y, multilabel: logits.sum() * float("nan"))
    with pytest.raises(SystemExit) as exc:
        transfer.main(transfer.get_args_parser().parse_args(["--data", str(data), "--out", str(tmp_path / "o"),
                                                             "--steps", "3"] + TINY))
    assert exc.value.code == 1
    assert re.search(r"^failed method=finetune .*NonFiniteLoss: non-finite loss", capsys.readouterr().out, re.M)
    assert not (tmp_path / "o" / "results.csv").exists()
    failures = pd.read_csv(tmp_path / "o" / "failures.csv")
    assert len(failures) == 1 and "non-finite" in failures["reason"][0]


def test_results_keys_read_back_as_text_and_default_source_is_the_path(tmp_path):
    path = str(tmp_path / "results.csv")
    for source in ["NA", "007", "7"]:
        key = {"method": "finetune", "source": source, "model": "R14x1", "target": "t", "shots": 0, "seed": 0}
        assert transfer.append_row(path, {**key, "accuracy": 0.5}, transfer.RESULT_COLUMNS, key)
    assert not transfer.append_row(path, {**key, "accuracy": 0.9}, transfer.RESULT_COLUMNS, key)  # taken
    assert transfer.read_table(path)["source"].tolist() == ["NA", "007", "7"]
    row = transfer.find_result(path, {**key, "source": "007"})
    assert row["source"] == "007" and row["accuracy"] == 0.5
    a, b = transfer.default_source(str(tmp_path / "w" / "a.pt")), transfer.default_source(str(tmp_path / "w" / "b.pt"))
    assert a != b and a.endswith(os.path.join("w", "a.pt"))
    assert transfer.default_source("runs/x/model.pt") == os.path.join("runs", "x", "model.pt")


def _append_many(path, worker):
    for i in range(15):
        key = {"method": "m", "source": f"w{worker}", "model": "R14x1", "target": "t", "shots": i, "seed": 0}
        transfer.append_row(path, {**key, "accuracy": i}, transfer.RESULT_COLUMNS, key)


def test_concurrent_appends_lose_no_row(tmp_path):
    import multiprocessing
    path = str(tmp_path / "results.csv")
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(transfer.read_table(path)) == 45


def test_sigterm_stops_with_one_line(prepared, tmp_path):
    data = prepared("tb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "transfer.py"), "--data", str(data), "--out",
                             str(tmp_path / "o"), "--steps", "100000"] + TINY,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM" in out and err.strip() == ""
    assert not (tmp_path / "o" / "results.csv").exists()


# ----------------------------------------------------------------------------------------
# Command line

@pytest.mark.parametrize("argv, message", [
    ([], "--data is required"),
    (["--data", "/nonexistent/folder"], "not a prepared dataset"),
    (["--data", "DATA", "--crop", "64", "--resize", "32"], "larger than --resize"),
    (["--data", "DATA", "--init", "/nonexistent/w.npz"], "no such file"),
    (["--data", "DATA", "--batch-size", "3", "--batch-split", "2", "--steps", "1"], "not divisible"),
    (["--data", "DATA", "--model", "R999x9"], "invalid choice"),
    (["--data", "DATA", "--steps", "0"], "argument --steps: must be an integer in [1, 1e9], got 0"),
    (["--data", "DATA", "--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1"),
    (["--data", "DATA", "--device", "cuda"] if not torch.cuda.is_available() else ["--data", "DATA", "--device", "bogus"],
     "no CUDA GPU" if not torch.cuda.is_available() else "is not a device"),
    (["--data", "DATA", "--init", "."], "is a folder"),
])
def test_bad_input_one_line_exit_2(prepared, tmp_path, capsys, argv, message):
    data = prepared("d")
    argv = [str(data) if a == "DATA" else a for a in argv]
    code, err = run_cli_capture(capsys, transfer.main, transfer.get_args_parser(),
                                argv + ["--out", str(tmp_path / "o")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_subprocess_error_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "transfer.py"), "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a prepared dataset" in proc.stderr
