"""fewshot.py --summarize against the paper: its published cells beside matching ones, the
authors' own results files read, the paper's curves drawn, failed cells left out."""
import json

import numpy as np
import pandas as pd
import pytest

import fewshot
import models

REFERENCE = pd.read_csv(fewshot.PAPER_RESULTS)

# The authors' results/finetuning_results_padchest_test_mean_auc.csv, PadChest from their own
# ImageNet-21k R152x4, full: its five rows (seeds 1, 2, 4, 0, 3), in their order.
PADCHEST_21K_R152X4_FULL = [(0.8438695669174194, 1), (0.8405773043632507, 2), (0.8392924070358276, 4),
                            (0.8374691009521484, 0), (0.8396955728530884, 3)]


def paper(target, source, model, shots, metric):
    row = REFERENCE[(REFERENCE["target"] == target) & (REFERENCE["source"] == source)
                    & (REFERENCE["model"] == model) & (REFERENCE["shots"] == shots)
                    & (REFERENCE["metric"] == metric)]
    assert len(row) == 1
    return row.iloc[0]


def result(source, shots, seed, acc, method="finetune", target="tuberculosis", model="R50x1", status="ok",
           init="runs/pretrain/model.pt"):
    return {"method": method, "source": source, "model": model, "target": target, "shots": shots,
            "seed": seed, "headline": "accuracy", "accuracy": acc, "auc": 0.5, "map": 0.5, "status": status,
            "args": json.dumps({"init": init})}


def summarize(argv):
    return fewshot.main(fewshot.get_args_parser().parse_args(["--summarize"] + [str(a) for a in argv]))


def test_summary_sets_matching_cells_beside_the_paper(tmp_path, capsys):
    rows = [result("chexpert", 1, s, a) for s, a in enumerate([0.5, 0.6, 0.7])]
    rows += [result("chexpert", 0, s, a, status=st) for s, a, st in [(0, 0.90, "ok"), (1, 0.92, "ok"),
                                                                     (2, 0.94, np.nan)]]  # older row
    rows += [result("chexpert", 1, 3, 0.0, status="failed"),  # a failed cell: not a result
             result("scratch", 1, 0, 0.4), result("chexpert", 1, 0, 0.55, method="linear"),
             result("imagenet21k", 1, 0, 0.5, target="cifar10", init="weights/BiT-M-R50x1.npz")]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    summary = summarize([tmp_path]).set_index(["target", "method", "source", "shots"])
    log = capsys.readouterr().out

    one, full = (summary.loc[("tuberculosis", "finetune", "chexpert", k)] for k in (1, 0))
    p1, pfull = (paper("tuberculosis_full", "chexpert", "R50x1", k, "acc") for k in ("1", "full"))
    assert one["n_seeds"] == 3 and one["accuracy_mean"] == pytest.approx(0.6)  # failed row left out
    assert one["accuracy_paper_mean"] == p1["mean"] and one["accuracy_paper_std"] == p1["std"]
    assert one["accuracy_diff"] == pytest.approx(0.6 - p1["mean"]) and one["accuracy_within"]
    assert full["n_seeds"] == 3 and full["accuracy_diff"] == pytest.approx(0.92 - pfull["mean"])
    assert not full["accuracy_within"]  # 0.12 above, the paper's std is 0.004
    for key in [("tuberculosis", "finetune", "scratch", 1), ("tuberculosis", "linear", "chexpert", 1),
                ("cifar10", "finetune", "imagenet21k", 1)]:  # no paper cell; a probe; Google's BiT-M
        assert np.isnan(summary.loc[key, "accuracy_paper_mean"]) and pd.isna(summary.loc[key, "accuracy_within"])
    assert "Google's BiT-S / BiT-M" in log and "1 rows whose status is not 'ok' left out" in log
    assert "2 of 5 cells have a paper counterpart in their headline metric, 1 within 2 paper stds" in log

    csv = pd.read_csv(tmp_path / "summary.csv")
    assert {"accuracy_paper_mean", "accuracy_paper_std", "accuracy_diff", "accuracy_within"} <= set(csv.columns)
    md = (tmp_path / "summary.md").read_text()
    assert "Beside the paper (tuberculosis_full, acc;" in md
    assert (f"| finetune | chexpert | R50x1 | 1 | 0.6000 ± 0.1000 (3) | {p1['mean']:.4f} ± {p1['std']:.4f} (5) | "
            f"{0.6 - p1['mean']:+.4f} | ✓ |") in md
    assert f"| finetune | chexpert | R50x1 | full | 0.9200 ± 0.0200 (3) | {pfull['mean']:.4f}" in md
    assert md.count("| ✗ |") == 1 and "(cifar10" not in md


def write_authors_file(path, target, metric, rows):
    """rows: (value, seed, shot, pretrained_model), in the authors' CSV format."""
    pd.DataFrame([{"metric_value": v, "metric": f"test/{metric}",
                   "path": f"finetuning_results/{target}/{net}/{shot}/seed_{seed}", "seed": seed, "shot": shot,
                   "pretrained_model": net, "dataset": target, "last_step": 10000 if shot == "full_shot" else 500}
                  for v, seed, shot, net in rows]).to_csv(path, index=False)


def test_authors_results_files_reproduce_the_published_means(tmp_path, capsys):
    net = "imagenet21k_bit152x4"
    auc_rows = [(v, s, "full_shot", net) for v, s in PADCHEST_21K_R152X4_FULL]
    # Resumed runs repeat rows; a stale earlier value must give way to the last one.
    auc_rows = [(0.5, 1, "full_shot", net)] + auc_rows + auc_rows[2:4]
    auc_rows += [(a, s, "10_shot", "chexpert_bit50x1") for a, s in [(0.60, 0), (0.70, 1), (0.60, 0)]]
    write_authors_file(tmp_path / "finetuning_results_padchest_test_mean_auc.csv", "padchest", "mean_auc", auc_rows)
    write_authors_file(tmp_path / "finetuning_results_padchest_test_acc.csv", "padchest", "acc",
                       [(0.39, s, "full_shot", net) for _, s in PADCHEST_21K_R152X4_FULL])
    write_authors_file(tmp_path / "finetuning_results_tuberculosis_full_test_acc.csv", "tuberculosis_full", "acc",
                       [(0.2, 0, "1_shot", "chexpert_bit50x1"), (0.4, 1, "1_shot", "chexpert_bit50x1")])
    (tmp_path / "finetuning_results_padchest_test_f1_0.csv").write_text("not, read\n")  # per-class metric
    out = tmp_path / "summary"
    summary = summarize([tmp_path, "--summary-dir", out])
    summary = summary.set_index(["target", "source", "model", "shots"])

    cell = summary.loc[("padchest", "imagenet21k", "R152x4", 0)]
    published = paper("padchest", "imagenet21k", "R152x4", "full", "mean_auc")
    assert published["mean"] == 0.8402 and cell["method"] == "authors" and cell["n_seeds"] == 5
    assert cell["auc_mean"] == pytest.approx(0.8402, abs=5e-5)
    assert cell["auc_std"] == pytest.approx(published["std"], abs=5e-5)  # population std, as published
    assert cell["auc_within"] and abs(cell["auc_diff"]) < 5e-5
    assert cell["headline"] == "auc" and cell["accuracy_mean"] == pytest.approx(0.39)
    few = summary.loc[("padchest", "chexpert", "R50x1", 10)]
    assert few["auc_mean"] == pytest.approx(0.65) and few["auc_std"] == pytest.approx(0.05)
    tb = summary.loc[("tuberculosis", "chexpert", "R50x1", 1)]
    assert tb["accuracy_mean"] == pytest.approx(0.3) and tb["headline"] == "accuracy"
    assert (out / "summary.md").exists() and not (tmp_path / "summary.md").exists()
    assert "### padchest (auc)" in capsys.readouterr().out


def test_paper_curves_dashed_in_fewshot_png(tmp_path, capsys, monkeypatch):
    rows = [result(source, k, s, 0.5 + 0.01 * s, target="cifar10")
            for source in ["imagenet1k", "imagenet21k", "scratch"] for k in (1, 5) for s in range(2)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    figures = []
    save = fewshot._save
    monkeypatch.setattr(fewshot, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    summarize([tmp_path, "--paper-curves"])
    assert (tmp_path / "fewshot.png").stat().st_size > 1000
    assert "2 paper curves dashed in fewshot.png" in capsys.readouterr().out
    ax = figures[0].axes[0]
    curves = {c.get_label(): c for c in ax.containers}
    assert sorted(k for k in curves if k.startswith("paper")) == ["paper imagenet1k R50x1", "paper imagenet21k R50x1"]
    line = curves["paper imagenet21k R50x1"][0]
    assert line.get_linestyle() == "--"
    assert line.get_color() == curves["imagenet21k R50x1"][0].get_color()
    assert list(line.get_ydata()) == REFERENCE[(REFERENCE["target"] == "cifar10") & (REFERENCE["source"] == "imagenet21k")
                                               & (REFERENCE["model"] == "R50x1") & (REFERENCE["metric"] == "acc")
                                               ]["mean"].tolist()  # 1, 5, 10, 100, 500, full
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "10", "100", "500", "full"]

    figures.clear()
    summarize([tmp_path])
    assert not [c for c in figures[0].axes[0].containers if c.get_label().startswith("paper")]


def test_authors_file_with_unknown_model_is_one_line_error(tmp_path, capsys):
    write_authors_file(tmp_path / "x.csv", "padchest", "mean_auc", [(0.5, 0, "full_shot", "resnet50")])
    with pytest.raises(SystemExit) as exc:
        models.run_cli(fewshot.main, fewshot.get_args_parser(), ["--summarize", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown pretrained_model" in err and len(err.strip().splitlines()) == 1
