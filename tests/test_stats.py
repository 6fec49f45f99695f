"""The scale effect with its uncertainty (fewshot.py's comparisons and slopes) on synthetic
results whose truth is known: a source better by a fixed margin is resolved as better; two
sources drawn from one distribution are not resolved in about 95 % of repeats; a known slope
is recovered within its interval; per-image outcomes (transfer.image_outcomes) average to the
metric; non-finite results are named and left out; the summary's tables and figure."""
import json

import numpy as np
import pandas as pd
import pytest

import fewshot
import models
import transfer

GROUP = {"target": "tuberculosis", "method": "finetune", "model": "R14x0.5", "headline": "accuracy"}


def simulate(rng, bases, pretrain=1, seeds=5, images=400, sd_pretrain=0.0, sd_seed=0.06, sd_cell=0.03,
             sd_image=0.0, shots=(5,), sizes=None):
    """Cells (fewshot.cell_values' columns) of sources whose expected accuracy is known: a run's
    accuracy is bases[source] + its pre-training seed's luck + its fine-tuning seed's (the same
    k-shot subset for every source, so shared) + its own; each test image, one test set for all,
    is correct with that probability shifted by the image's difficulty (mean 0), and by what the
    source makes of that image (sd_image, mean 0). So the truth of a difference or slope is that
    of `bases`."""
    shift = rng.uniform(-0.15, 0.15, images)
    rows = []
    for k in shots:
        subset = rng.normal(0, sd_seed, seeds)
        for source, base in bases.items():
            own = rng.normal(0, sd_image, images)
            for p in range(pretrain):
                luck = rng.normal(0, sd_pretrain)
                for f in range(seeds):
                    z = rng.random(images) < base + luck + subset[f] + rng.normal(0, sd_cell) + shift + own
                    rows.append({**GROUP, "source": source, "source_seed": str(p) if pretrain > 1 else "",
                                 "shots": k, "seed": f, "value": z.mean(), "se": np.nan, "outcomes": z.astype(float),
                                 "source_size": (sizes or {}).get(source, np.nan), "accuracy": z.mean(),
                                 "auc": np.nan, "map": np.nan})
    return pd.DataFrame(rows)


def comparisons(cells):
    return fewshot.compare_sources(cells, fewshot.read_paper_reference())


def test_margin_is_resolved_as_better():
    rng = np.random.default_rng(0)
    cells = simulate(rng, {"small": 0.6, "large": 0.75}, sizes={"small": 1000, "large": 2000}, shots=(1, 5, 0),
                     sd_cell=0.02, images=1000)
    comp = comparisons(cells)
    assert (comp["source"] == "large").all() and (comp["baseline"] == "small").all()  # larger - smaller
    assert (comp["verdict"] == "better").all()
    assert comp["estimate"].to_numpy() == pytest.approx(0.15, abs=0.04)
    assert set(comp["test"]) == {"per-image outcomes"}


def test_pairing_by_fine_tuning_seed_matters():
    """A seed's subset luck (sd 0.1) dwarfs a 0.03 margin; shared by both sources, it cancels
    in the paired difference, which resolves the margin."""
    rng = np.random.default_rng(1)
    cells = simulate(rng, {"small": 0.6, "large": 0.63}, sd_seed=0.1, sd_cell=0.005, images=4000,
                     sizes={"small": 1000, "large": 2000})
    grids = fewshot.source_grids(cells)
    c = fewshot.contrast(grids, {"large": 1, "small": -1})
    assert c["low"] > 0 and c["estimate"] == pytest.approx(0.03, abs=0.01)
    alone = [fewshot.contrast(grids, {s: 1}) for s in ("small", "large")]
    assert alone[1]["low"] < alone[0]["high"]  # the sources' own intervals overlap widely


def not_resolved_rate(rng, repeats, **design):
    same = [fewshot.contrast(fewshot.source_grids(simulate(rng, {"a": 0.65, "b": 0.65}, **design)), {"a": 1, "b": -1})
            for _ in range(repeats)]
    return np.mean([c["low"] <= 0 <= c["high"] for c in same])


@pytest.mark.parametrize("design", [
    {"pretrain": 1, "seeds": 5},                        # the paper's design: one pre-training, five seeds
    {"pretrain": 3, "seeds": 3, "sd_pretrain": 0.04},   # the demo's: three pre-trainings x three seeds
    {"pretrain": 1, "seeds": 5, "sd_image": 0.15},      # sources differing image by image: test images count
])
def test_one_distribution_is_not_resolved_in_about_95_percent(design, capsys):
    rate = not_resolved_rate(np.random.default_rng(2), 200, **design)
    with capsys.disabled():
        print(f"\n{design}: not resolved in {rate:.3f} of 200 repeats")
    assert 0.91 <= rate <= 0.99


def test_one_pre_training_cannot_tell_luck_from_a_gap():
    """With pre-training luck (sd 0.04) and one pre-training per source, the interval cannot see
    it: same-distribution sources are called different far more often than 5 %. The finding says so."""
    rng = np.random.default_rng(3)
    assert not_resolved_rate(rng, 100, pretrain=1, sd_pretrain=0.04) < 0.8
    comp = comparisons(simulate(rng, {"a": 0.6, "b": 0.7}, sizes={"a": 10, "b": 100}))
    assert "One pre-training run per source" in "\n".join(fewshot.finding_lines(comp, comp[:0], {"a": 0, "b": 1}))


def test_known_slope_is_recovered_within_its_interval():
    sizes = {"s1": 1_000, "s2": 10_000, "s3": 100_000, "s4": 1_000_000}
    bases = {s: 0.5 + 0.04 * np.log10(n / 1000) for s, n in sizes.items()}  # +0.04 per decade
    rng, found = np.random.default_rng(4), []
    for _ in range(200):
        cells = simulate(rng, bases, pretrain=2, seeds=3, sd_pretrain=0.02)
        c = fewshot.contrast(fewshot.source_grids(cells), fewshot.slope_weights(sizes))
        found.append((c["estimate"], c["low"], c["high"]))
    estimate, low, high = np.array(found).T
    slope = fewshot.scale_slopes(simulate(rng, bases, sizes=sizes, pretrain=2, seeds=3, sd_pretrain=0.02),
                                 fewshot.read_paper_reference()).iloc[0]
    assert slope["sources"] == "s1, s2, s3, s4" and slope["transfer"] == ""  # names of no known domain
    assert slope["low"] <= 0.04 <= slope["high"]
    assert estimate.mean() == pytest.approx(0.04, abs=0.003)  # unbiased
    assert 0.93 <= np.mean((low <= 0.04) & (0.04 <= high)) <= 0.995


def test_image_outcomes_average_to_the_metric():
    rng = np.random.default_rng(5)
    n = 300
    for multilabel, labels in [(False, 2), (False, 4), (True, 5)]:
        logits = np.round(rng.normal(size=(n, labels)), 1)  # ties
        if multilabel:
            targets = (rng.random((n, labels)) < 0.3).astype(float)
            targets[rng.random((n, labels)) < 0.1] = np.nan
            targets[:, -1] = 0  # a label without positives: no AUC, left out
        else:
            targets = np.eye(labels)[rng.integers(0, labels, n)]
        metrics = models.headline_metrics(logits, targets, multilabel)
        z = transfer.image_outcomes(logits, targets, multilabel, "auc")
        assert z.mean() == pytest.approx(metrics["auc"], abs=1e-6)
        if not multilabel:
            assert transfer.image_outcomes(logits, targets, False, "accuracy").mean() == pytest.approx(metrics["accuracy"])
    # resampling images from the pseudo-values varies the mean as resampling the AUC does
    y = rng.integers(0, 2, 400)
    logits = np.stack([np.zeros(400), rng.normal(size=400) + y], 1)
    z = transfer.image_outcomes(logits, np.eye(2)[y], False, "auc")
    boot = [models.headline_metrics(logits[i], np.eye(2)[y][i], False)["auc"]
            for i in rng.integers(0, 400, (500, 400))]
    assert z.std() / np.sqrt(400) == pytest.approx(np.std(boot), rel=0.15)


# ----------------------------------------------------------------------------------------
# The summary of a results file: non-finite rows, tables, comparisons, slopes, findings, figure

def write_results(folder, cells):
    """results.csv as transfer.py writes it, with each run's per-image outcomes in its file."""
    rows = []
    for i, r in enumerate(cells.to_dict("records")):
        np.save(folder / f"outcomes{i}.npy", r["outcomes"].astype(np.float32))
        rows.append({**{c: r[c] for c in transfer.KEY_COLUMNS + ["source_size", "headline", "accuracy", "auc", "map"]},
                     "ci_low": r["value"] - 0.05, "ci_high": r["value"] + 0.05, "outcomes": f"outcomes{i}.npy",
                     "num_eval": len(r["outcomes"]), "args": json.dumps({"init": "best.pt"})})
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)


def summarize(folder, monkeypatch=None):
    figures = []
    if monkeypatch:
        save = fewshot._save
        monkeypatch.setattr(fewshot, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    return fewshot.main(fewshot.get_args_parser().parse_args(["--summarize", str(folder)])), figures


def demo_like(rng):
    """The demo's design: scratch and two chest sources (3 pre-trainings x 3 seeds), 4 k."""
    cells = simulate(rng, {"chexpert": 0.70, "chexpert_mimic": 0.80}, pretrain=3, seeds=3, shots=(1, 5, 0),
                     sd_pretrain=0.01, sizes={"chexpert": 989, "chexpert_mimic": 1979})
    return pd.concat([cells, simulate(rng, {"scratch": 0.55}, seeds=3, shots=(1, 5, 0), sizes={"scratch": 0})])


def test_non_finite_results_are_named_and_left_out(tmp_path, capsys):
    cells = demo_like(np.random.default_rng(6))
    bad = (cells["source"] == "chexpert") & (cells["shots"] == 5)
    cells.loc[bad & (cells["seed"] == 0) & (cells["source_seed"] == "0"), "accuracy"] = np.nan
    cells.loc[bad & (cells["seed"] == 1) & (cells["source_seed"] == "0"), "accuracy"] = np.inf
    cells.loc[bad & (cells["seed"] == 2) & (cells["source_seed"] == "0"), "auc"] = -np.inf
    write_results(tmp_path, cells)
    summary, _ = summarize(tmp_path)
    out = capsys.readouterr().out
    kept = cells[bad & np.isfinite(cells["accuracy"])]
    row = summary[(summary["source"] == "chexpert") & (summary["shots"] == 5)].iloc[0]
    assert row["n_cells"] == 7 and row["accuracy_mean"] == pytest.approx(kept["accuracy"].mean())
    assert np.isnan(row["auc_mean"])  # the one infinite AUC is blanked, not averaged
    for line in ["tuberculosis finetune chexpert (pre-training seed 0) R14x0.5 5-shot seed 0: accuracy = nan (row left out)",
                 "chexpert (pre-training seed 0) R14x0.5 5-shot seed 1: accuracy = inf (row left out)",
                 "chexpert (pre-training seed 0) R14x0.5 5-shot seed 2: auc = -inf (left out of the auc means)"]:
        assert line in out and line in (tmp_path / "summary.md").read_text()
    comp = pd.read_csv(tmp_path / "comparisons.csv").set_index(["source", "baseline", "shots"])
    # pre-training seed 0 lacks fine-tuning seeds 0 and 1 at k = 5: the comparison keeps the seeds all ran
    assert comp.loc[("chexpert_mimic", "chexpert", "5"), "baseline_seeds"] == 2
    assert comp.loc[("chexpert_mimic", "chexpert", "full"), "baseline_seeds"] == 3
    assert np.isfinite(comp["estimate"]).all()


def test_summary_tables_findings_and_scale_figure(tmp_path, monkeypatch, capsys):
    write_results(tmp_path, demo_like(np.random.default_rng(7)))
    summary, figures = summarize(tmp_path, monkeypatch)
    md = (tmp_path / "summary.md").read_text()
    assert list(dict.fromkeys(summary["source"])) == ["scratch", "chexpert", "chexpert_mimic"]  # scale order
    assert not [c for c in summary.columns if "_paper_" in c]  # no paper cell for R14x0.5: no paper columns
    assert "| finetune | chexpert | 989 | R14x0.5 |" in md and "| 1-shot | 5-shot | full |" in md
    assert "0-shot" not in md and "shots=0" not in md
    comp = pd.read_csv(tmp_path / "comparisons.csv", dtype={"shots": str})
    assert list(comp["shots"].unique()) == ["1", "5", "full"] and set(comp["test"]) == {"per-image outcomes"}
    assert "| finetune | R14x0.5 | chexpert_mimic - chexpert | 3/3 x 3 |" in md
    slopes = pd.read_csv(tmp_path / "slopes.csv", dtype={"shots": str})
    assert set(slopes["transfer"]) == {"intra"} and slopes["sources"].iloc[0] == "chexpert, chexpert_mimic"
    assert ("| tuberculosis | chest axis -> tuberculosis (intra-domain) | finetune | R14x0.5 | "
            "chexpert, chexpert_mimic (989-1,979) |") in md
    findings = md[md.index("Findings:"):]
    for r in comp[(comp["source"] == "chexpert_mimic") & (comp["baseline"] == "chexpert")].itertuples():
        assert f"{r.verdict} at k = " in findings  # each verdict is stated, as the interval says
    assert "- chexpert vs scratch" in findings and "- chexpert_mimic vs scratch" not in findings  # steps only
    assert "Scale effect along the chest axis (intra-domain)" in findings and "One pre-training run" not in findings
    fig = figures[1]  # source_size.png
    ax = fig.axes[0]
    assert fig._suptitle.get_text() == "Transfer against pre-training scale"
    assert "95 % intervals" in fig.texts[-1].get_text()  # the caption
    assert ax.get_title() == "tuberculosis: accuracy, R14x0.5 finetune"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["k = 1", "k = 5", "k = full"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["989", "1,979"]  # the sizes: under two decades
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))
    assert sum(line.get_linestyle() == ":" for line in ax.lines) == 3  # scratch, one per k
    assert "± one std" in figures[0].texts[-1].get_text() and figures[0].axes[0].get_title() == "tuberculosis: accuracy"


def test_test_images_from_outcomes_else_cell_intervals_else_not_counted():
    cells = simulate(np.random.default_rng(8), {"a": 0.6, "b": 0.7})
    tests = [fewshot.contrast(fewshot.source_grids(c), {"b": 1, "a": -1})["test"]
             for c in (cells, cells.assign(outcomes=None, se=0.02), cells.assign(outcomes=None))]
    assert tests == ["per-image outcomes", "cell intervals", "not counted"]


def test_slope_beside_the_paper_from_its_published_cells():
    """Our slope along the chest axis on tuberculosis (R50x1, full), and beside it the paper's
    from its published cells of the same sources at the paper's sizes (reference/)."""
    sizes = {"chexpert": 191_010, "chexpert_mimic_nih_padchest": 692_521}
    assert {s: fewshot.paper_sizes()[s] for s in sizes} == sizes
    cells = simulate(np.random.default_rng(9), {"chexpert": 0.8, "chexpert_mimic_nih_padchest": 0.82}, shots=(0,),
                     sizes=sizes).assign(model="R50x1", args=json.dumps({"init": "best.pt"}))
    reference = fewshot.read_paper_reference()
    slope = fewshot.scale_slopes(cells, reference).iloc[0]
    published = reference[(reference["target"] == "tuberculosis_full") & (reference["model"] == "R50x1")
                          & (reference["shots"] == 0) & (reference["metric"] == "accuracy")].set_index("source")["mean"]
    rise = published["chexpert_mimic_nih_padchest"] - published["chexpert"]
    assert slope["paper_estimate"] == pytest.approx(rise / np.log10(692_521 / 191_010))
    assert slope["paper_sources"] == "chexpert, chexpert_mimic_nih_padchest" and slope["axis"] == "chest"
    assert slope["paper_low"] < slope["paper_estimate"] < slope["paper_high"]
