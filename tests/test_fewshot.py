"""fewshot.py: k-shot subsets, the torch logistic-regression probe against scikit-learn, the
summary of a hand-made results file, tiny end-to-end grids (fine-tuning and linear probe, with
resume-skip) and the command line."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fewshot  # noqa: E402
import models  # noqa: E402
import prepare_data  # noqa: E402
import raw_layouts  # noqa: E402
import transfer  # noqa: E402

TINY = ["--model", "R14x1", "--resize", "20", "--crop", "16", "--batch-size", "4", "--log-every", "1",
        "--bootstrap", "20"]


# ----------------------------------------------------------------------------------------
# k-shot subsets

def onehot(classes, c):
    return np.eye(c, dtype=np.float32)[classes]


def test_select_shots_exact_deterministic_nested():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, 500)
    targets = onehot(classes, 4)
    prev = set()
    for k in (1, 5, 10, 100):
        idx = transfer.select_shots(targets, k, seed=3)
        assert np.bincount(classes[idx], minlength=4).tolist() == [k] * 4
        assert len(set(idx)) == len(idx) == 4 * k
        assert np.array_equal(idx, transfer.select_shots(targets, k, seed=3))
        assert prev <= set(idx)  # nested: the smaller subsets are inside
        prev = set(idx)
    assert not np.array_equal(transfer.select_shots(targets, 5, 3), transfer.select_shots(targets, 5, 4))
    assert np.array_equal(transfer.select_shots(targets, 0, 3), np.arange(500))


def test_select_shots_paper_rule_short_class_keeps_all():
    classes = np.array([0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 2, 1, 1])  # a 4, b 8, c 1
    targets = onehot(classes, 3)
    for seed in (0, 7):
        rng = np.random.RandomState(seed)  # the paper's finetune.py, written out independently
        members = [np.flatnonzero(classes == c) for c in range(3)]
        shuffled = [m[rng.permutation(len(m))] for m in members]
        for k in (1, 3, 5, 500):
            idx = transfer.select_shots(targets, k, seed)
            assert sorted(idx) == sorted(np.concatenate([s[:k] for s in shuffled]))
        assert np.bincount(classes[transfer.select_shots(targets, 5, seed)]).tolist() == [4, 5, 1]
    assert transfer.short_classes(targets, 5, ["a", "b", "c"]) == [("a", 4), ("c", 1)]
    assert transfer.short_classes(targets, 0, ["a", "b", "c"]) == []


def test_single_label_view_of_multilabel():
    y = np.array([[1, 0, 0], [1, 1, 0], [np.nan, 1, 0], [0, 0, 0], [0, 0, 1]], np.float32)
    keep, hot = transfer.single_label(y)
    assert keep.tolist() == [0, 2, 4]  # unknown counts as negative, no positive = dropped
    assert hot.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def authors_fewshot_search(labels, k, seed):
    """The authors' fs.find_fewshot_indices written out: a DataLoader(shuffle=True, batch 1024,
    generator seeded with `seed`) over the dataset, a deque of the last k indices per label,
    stopping once every label holds k. Returns the chosen indices, sorted."""
    import collections
    import torch
    data = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=1024, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    n_classes, kept = len(set(labels)), collections.defaultdict(lambda: collections.deque(maxlen=k))
    for indices, batch_labels in loader:
        for i, label in zip(indices.tolist(), batch_labels.tolist()):
            kept[label].append(i)
            if sum(map(len, kept.values())) == k * n_classes:
                return sorted(i for d in kept.values() for i in d)
    raise RuntimeError("Unable to find enough examples!")


def test_select_shots_loader_is_the_authors_search():
    rng = np.random.default_rng(0)
    for n, c in ((3000, 10), (400, 3), (2500, 100)):
        classes = rng.integers(0, c, n)
        for k in (1, 5, 10):
            for seed in (0, 1, 4):
                assert transfer.select_shots_loader(onehot(classes, c), k, seed).tolist() == \
                    authors_fewshot_search(classes, k, seed), (n, c, k, seed)
    classes = np.array([0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 2, 1, 1])  # a class with fewer keeps all it has
    idx = transfer.select_shots_loader(onehot(classes, 3), 5, 0)
    assert np.bincount(classes[idx]).tolist() == [4, 5, 1]
    assert np.array_equal(transfer.select_shots_loader(onehot(classes, 3), 0, 0), np.arange(13))


def test_cifar_tuberculosis_pets_covidx_subsets_are_the_authors(tmp_path, monkeypatch):
    """CIFAR: our training rows are torchvision's CIFAR10(train=True) in its order, so the loader
    rule picks the images the authors' search picks on torchvision's dataset. Tuberculosis: our
    rows are their Merge of the two folders' shuffled training files; Pets and COVIDx: the lines
    of trainval.txt / train.txt, as their datasets read them."""
    import torchvision
    raw_layouts.cifar10(tmp_path / "cifar", per_class=3)
    prepare_data.main(prepare_data.get_args_parser().parse_args(
        ["--dataset", "cifar10", "--root", str(tmp_path / "cifar"), "--out", str(tmp_path / "c")]))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)  # not the real files
    theirs = torchvision.datasets.CIFAR10(str(tmp_path / "cifar"), train=True)
    ours = prepare_data.PreparedDataset(str(tmp_path / "c"), "train")
    assert ours.meta["shot_rule"] == "loader" and len(ours) == len(theirs) == 150
    assert np.array_equal(ours.images[ours.rows], theirs.data)
    assert np.array_equal(ours.targets.argmax(1), theirs.targets)
    for k in (1, 5, 10):
        for seed in range(3):
            assert transfer.select_shots_loader(ours.targets, k, seed).tolist() == \
                authors_fewshot_search(theirs.targets, k, seed)

    raw = raw_layouts.tuberculosis(str(tmp_path / "tb"), n=90, size=8)
    prepare_data.main(prepare_data.get_args_parser().parse_args(
        ["--dataset", "tuberculosis", "--root", raw, "--out", str(tmp_path / "t"), "--workers", "1"]))
    files = []   # the authors' Merge([Tuberculosis(Shenzhen), Tuberculosis(Montgomery)]) training set
    for folder in ("ChinaSet_AllFiles/CXR_png", "MontgomerySet/CXR_png"):
        names = sorted(f"{folder}/{n}" for n in os.listdir(os.path.join(raw, folder)))
        np.random.RandomState(42).shuffle(names)
        files += names[:int(len(names) * 0.85)]
    ours = prepare_data.PreparedDataset(str(tmp_path / "t"), "train")
    for k in (1, 5, 10):
        for seed in range(3):
            chosen = ours.table.path.to_numpy()[ours.rows[transfer.select_shots_loader(ours.targets, k, seed)]]
            authors = authors_fewshot_search([int(f[-5]) for f in files], k, seed)
            assert sorted(chosen) == sorted(files[i] for i in authors)

    raw_layouts.pets(str(tmp_path / "pets"), per_class=4)
    raw_layouts.covidx(str(tmp_path / "covidx"), n=40)
    lists = {"pets": ("oxford-iiit-pet/annotations/trainval.txt", lambda w: f"oxford-iiit-pet/images/{w[0]}.jpg", 1),
             "covidx": ("train.txt", lambda w: f"train/{w[1]}", 2)}   # file: path of a line's words; label column
    for name, (listing, path, label) in lists.items():
        prepare_data.main(prepare_data.get_args_parser().parse_args(
            ["--dataset", name, "--root", str(tmp_path / name), "--out", str(tmp_path / f"p{name}"), "--workers", "1"]))
        lines = [line.split() for line in open(tmp_path / name / listing).read().splitlines()]
        files, labels = [path(w) for w in lines], [w[label] for w in lines]
        ours = prepare_data.PreparedDataset(str(tmp_path / f"p{name}"), "train")
        assert list(ours.table.path[ours.rows]) == files
        for seed in range(3):
            chosen = ours.table.path.to_numpy()[ours.rows[transfer.select_shots_loader(ours.targets, 2, seed)]]
            ids = {label: i for i, label in enumerate(dict.fromkeys(labels))}
            assert sorted(chosen) == sorted(files[i] for i in authors_fewshot_search([ids[y] for y in labels], 2, seed))


def test_select_shots_multilabel_greedy():
    rng = np.random.default_rng(1)
    y = (rng.random((400, 5)) < np.array([0.5, 0.3, 0.1, 0.05, 0.02])).astype(np.float32)
    y[rng.random(y.shape) < 0.1] = np.nan
    prev = set()
    for k in (1, 2, 5):
        idx = transfer.select_shots_multilabel(y, k, seed=0)
        counts = (np.nan_to_num(y[idx]) > 0.5).sum(0)
        assert (counts >= k).all()
        assert counts.min() == k  # greedy: stops as soon as the rarest label has k
        assert np.array_equal(idx, transfer.select_shots_multilabel(y, k, seed=0))
        assert prev <= set(idx)
        prev = set(idx)
    assert len(transfer.select_shots_multilabel(y, 5, 0)) < 60  # far from all 400 rows
    rare = int((np.nan_to_num(y[:, 4]) > 0.5).sum())  # a label with fewer than k keeps all it has
    counts = (np.nan_to_num(y[transfer.select_shots_multilabel(y, rare + 3, 0)]) > 0.5).sum(0)
    assert counts[4] == rare and (counts[:4] >= rare + 3).all()


# ----------------------------------------------------------------------------------------
# Linear probe against scikit-learn

def test_fit_logistic_multinomial_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    cls = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=120) > 0).astype(int) + (x[:, 2] > 1)
    w, b = transfer.fit_logistic(x, onehot(cls, 3), multilabel=False, c=0.5)
    ours = softmax(x @ w.double().numpy() + b.double().numpy())
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(x, cls).predict_proba(x)
    assert np.abs(ours - ref).max() < 1e-3


def test_fit_logistic_multilabel_one_vs_rest_masks_unknown():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 4))
    y = (x[:, :2] + rng.normal(size=(100, 2)) > 0).astype(float)
    y[rng.random(y.shape) < 0.2] = np.nan
    w, b = transfer.fit_logistic(x, y, multilabel=True, c=2.0)
    for j in range(2):
        known = ~np.isnan(y[:, j])
        ref = LogisticRegression(C=2.0, tol=1e-10, max_iter=5000).fit(x[known], y[known, j])
        ours = 1 / (1 + np.exp(-(x @ w[:, j].double().numpy() + float(b[j]))))
        assert np.abs(ours - ref.predict_proba(x)[:, 1]).max() < 1e-3


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ----------------------------------------------------------------------------------------
# Summary of a hand-made results file

def hand_made_results(path):
    rows = []
    for source, accs in [("scratch", {1: [0.2, 0.4, 0.6], 0: [0.5, 0.5, 0.8]}),
                         ("nih", {1: [0.5, 0.7, 0.9], 0: [0.9, 0.95, 1.0]})]:
        for shots, values in accs.items():
            for seed, acc in enumerate(values):
                rows.append({"method": "finetune", "source": source, "model": "R14x1", "target": "tb",
                             "shots": shots, "seed": seed, "source_size": 100 if source == "nih" else None,
                             "task": "multiclass", "headline": "accuracy", "accuracy": acc,
                             "auc": acc / 2, "map": 0.3})
    pd.DataFrame(rows).to_csv(path, index=False)


def test_summarize_exact_means_and_stds(tmp_path, capsys):
    hand_made_results(tmp_path / "results.csv")
    args = fewshot.get_args_parser().parse_args(["--summarize", str(tmp_path), "--source-sizes", "scratch=1"])
    summary = fewshot.main(args)
    nih = summary[summary["source"] == "nih"].set_index("shots")
    assert nih.loc[1, "accuracy_mean"] == pytest.approx(0.7)
    assert nih.loc[1, "accuracy_std"] == pytest.approx(0.2)  # sample std over the 3 seeds
    assert nih.loc[0, "accuracy_mean"] == pytest.approx(0.95)
    assert nih.loc[0, "accuracy_std"] == pytest.approx(0.05)
    assert nih.loc[1, "auc_mean"] == pytest.approx(0.35) and nih.loc[1, "map_std"] == pytest.approx(0)
    assert (summary["n_seeds"] == 3).all()
    assert list(summary["shots"]) == [1, 0, 1, 0]  # per source, full last
    csv = pd.read_csv(tmp_path / "summary.csv")
    for column in ["source", "model", "target", "shots", "accuracy_mean", "accuracy_std", "auc_mean",
                   "map_std"]:
        assert column in csv.columns
    md = (tmp_path / "summary.md").read_text()
    # sources in scale order (scratch first), their size, mean ± std [95 % interval: t, 2 df]
    assert md.index("| finetune | scratch |") < md.index("| finetune | nih |")
    assert "| finetune | nih | 100 | R14x1 | 0.700 ± 0.200 [0.203, 1.197] | 0.950 ± 0.050 [0.826, 1.074] |" in md
    assert "| finetune | scratch | 1 | R14x1 | 0.400 ± 0.200 [-0.097, 0.897] | 0.600 ± 0.173 [0.170, 1.030] |" in md
    assert "0.700 ± 0.200" in capsys.readouterr().out
    assert (tmp_path / "fewshot.png").stat().st_size > 1000
    # scratch is the figure's baseline, not a point on its size axis: one sized source draws no curve
    assert not (tmp_path / "source_size.png").exists()
    assert summary.set_index("source").loc["scratch", "source_size"].tolist() == [1, 1]


# ----------------------------------------------------------------------------------------
# End to end

def test_fewshot_finetune_grid_and_resume_skip(prepared, tmp_path, capsys):
    data = prepared("tb", n_train=15)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--shots", "1", "2", "--seeds", "0", "--steps", "2",
            "--source", "nih", "--source-size", "50"] + TINY
    rows = fewshot.main(fewshot.get_args_parser().parse_args(argv))
    assert [r["num_train"] for r in rows] == [3, 6]
    results = pd.read_csv(out / "results.csv")
    assert results[["shots", "seed"]].values.tolist() == [[1, 0], [2, 0]]
    assert (results["source"] == "nih").all() and (results["method"] == "finetune").all()
    capsys.readouterr()
    fewshot.main(fewshot.get_args_parser().parse_args(argv))
    assert capsys.readouterr().out.count("skip method=finetune") == 2
    assert len(pd.read_csv(out / "results.csv")) == 2
    summary = fewshot.main(fewshot.get_args_parser().parse_args(["--summarize", str(out)]))
    assert len(summary) == 2 and (out / "fewshot.png").exists()
    assert not (out / "source_size.png").exists()  # one source size: no curve to draw


def test_linear_probe_grid(prepared, tmp_path, capsys):
    data = prepared("tb", n_train=30)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--shots", "1", "5", "full", "--seeds", "0", "1",
            "--linear-probe"] + TINY
    rows = fewshot.main(fewshot.get_args_parser().parse_args(argv))
    log = capsys.readouterr().out
    assert log.count("features ") == 1  # extracted once for the whole grid
    assert [r["num_train"] for r in rows] == [3, 3, 15, 15, 30, 30]
    results = pd.read_csv(out / "results.csv")
    assert (results["method"] == "linear").all() and len(results) == 6
    assert results["accuracy"].between(0, 1).all()
    # The classes differ by brightness: the full-data probe on frozen random features beats chance
    assert results[results["shots"] == 0]["accuracy"].mean() > 0.5
    fewshot.main(fewshot.get_args_parser().parse_args(argv))
    assert capsys.readouterr().out.count("skip method=linear") == 6


def test_multilabel_modes(prepared, tmp_path):
    data = prepared("px", task="multilabel", n_train=24, n_eval=12)
    out = tmp_path / "out"
    base = ["--data", str(data), "--out", str(out), "--shots", "1", "2", "--seeds", "0", "--linear-probe"] + TINY
    single = fewshot.main(fewshot.get_args_parser().parse_args(base + ["--multilabel-mode", "single"]))
    assert [r["target"] for r in single] == ["px_single"] * 2
    assert [r["num_train"] for r in single] == [3, 6] and single[0]["headline"] == "accuracy"
    multi = fewshot.main(fewshot.get_args_parser().parse_args(base + ["--multilabel-mode", "multi"]))
    assert [r["target"] for r in multi] == ["px"] * 2 and multi[0]["headline"] == "auc"
    assert multi[0]["num_train"] <= multi[1]["num_train"]
    assert set(pd.read_csv(out / "results.csv")["target"]) == {"px", "px_single"}


def test_grid_truncates_short_classes_and_oversamples_full_shot_only(prepared, tmp_path, capsys, monkeypatch):
    data = prepared("tb", n_train=15)  # 5 per class
    calls = []
    real = transfer.oversampling_weights
    monkeypatch.setattr(transfer, "oversampling_weights", lambda t: calls.append(len(t)) or real(t))
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--shots", "1", "500", "full", "--seeds", "0",
            "--steps", "1", "--oversample"] + TINY
    rows = fewshot.main(fewshot.get_args_parser().parse_args(argv))
    assert [r["num_train"] for r in rows] == [3, 15, 15] and calls == [15]
    assert "500 shots: 3 of 3 classes have fewer training images and keep all they have: 'a' 5" \
        in capsys.readouterr().out


def test_failing_cell_does_not_stop_the_grid(prepared, tmp_path, capsys, monkeypatch):
    data = prepared("tb", n_train=15)
    real, calls = models.loss_fn, []

    def loss_nan_in_first_run(logits, y, multilabel):  # the first fine-tune diverges
        calls.append(1)
        loss = real(logits, y, multilabel)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(models, "loss_fn", loss_nan_in_first_run)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--shots", "1", "2", "--seeds", "0", "--steps", "2"] + TINY
    with pytest.raises(SystemExit) as exc:
        fewshot.main(fewshot.get_args_parser().parse_args(argv))
    log = capsys.readouterr().out
    assert exc.value.code == 1 and "1 of 2 cells failed" in log and "shots=1 seed=0" in log.splitlines()[-1]
    results = pd.read_csv(out / "results.csv")
    assert results["shots"].tolist() == [2]  # the rest ran; no metric row for the failure
    assert pd.read_csv(out / "failures.csv")["shots"].tolist() == [1]
    monkeypatch.setattr(models, "loss_fn", real)
    fewshot.main(fewshot.get_args_parser().parse_args(argv))  # a rerun does the failed cell only
    assert sorted(pd.read_csv(out / "results.csv")["shots"]) == [1, 2]


def test_ctrl_c_keeps_finished_rows(prepared, tmp_path):
    data = prepared("tb", n_train=15)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "fewshot.py"), "--data", str(data), "--out", str(out),
                             "--shots", "1", "--seeds", "0", "1", "2", "--steps", "30"]
                            + TINY,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("eval "):  # the first run is recorded
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130) and err.strip() == ""
    if proc.returncode == 130:
        assert rest.strip().splitlines()[-1].startswith(f"stopped by SIGINT: 1 of 3 cells finished (in {out}/results.csv)")
    assert len(pd.read_csv(out / "results.csv")) >= 1


# ----------------------------------------------------------------------------------------
# Command line

@pytest.mark.parametrize("argv, message", [
    (["--data", "DATA", "--seeds", "0", "-1"], "argument --seeds: must be an integer in [0, 4294967295], got -1"),
    (["--data", "DATA", "--shots", "abc"], "shots must be a count or 'full'"),
    (["--data", "DATA", "--shots", "-1"], "shots must be >= 0"),
    (["--summarize", "/nonexistent/run"], "no results file"),
    (["--summarize", "CSV"], "is not a results file"),
    (["--summarize", "CSV_OK", "--source-sizes", "nih"], "NAME=COUNT"),
    (["--shots", "1"], "--data is required"),
])
def test_bad_input_one_line_exit_2(prepared, tmp_path, capsys, argv, message):
    data = prepared("d", n_train=15)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    hand_made_results(tmp_path / "ok.csv")
    subs = {"DATA": str(data), "CSV": str(tmp_path / "bad.csv"), "CSV_OK": str(tmp_path / "ok.csv")}
    argv = [subs.get(a, a) for a in argv] + ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        models.run_cli(fewshot.main, fewshot.get_args_parser(), argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.csv").exists()


def test_cli_subprocess_summarize(tmp_path):
    hand_made_results(tmp_path / "results.csv")
    proc = subprocess.run([sys.executable, str(ROOT / "fewshot.py"), "--summarize", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "| finetune | nih | 100 | R14x1 | 0.700 ± 0.200 [0.203, 1.197] |" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "fewshot.py"), "--summarize", str(tmp_path / "no")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
