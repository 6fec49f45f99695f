"""prepare_data.py: parsers against the real layouts, label rules row by row, splits without
leakage, image decoding, rejects, resume, dry-run, merge and the command line."""
import argparse
import ast
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_data as P  # noqa: E402
import raw_layouts as R  # noqa: E402
from models import UserError  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
needs_real = pytest.mark.skipif(not REAL.exists(), reason="../shared/realdata not present")
# Expectations are written here, not taken from prepare_data: the label names are raw_layouts'
# (R.NIH_FINDINGS, R.CHEXPERT_COLUMNS), the views the paper's five kept for pre-training.
PAPER_VIEWS = ["PA", "AP", "AP Supine", "L", "COSTAL"]


def run(argv, stop_after=None):
    return P.main(P.get_args_parser().parse_args(argv), stop_after=stop_after)


def prepared(out):
    meta = json.load(open(out / "meta.json"))
    table = P.read_labels_csv(out, meta["labels"])
    return meta, table, np.load(out / "images.npy")


def no_leak(table):
    owners = table.groupby("patient")["split"].nunique()
    assert (owners == 1).all(), owners[owners > 1]


def cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *argv], capture_output=True,
                          text=True, cwd=ROOT)


# ----------------------------------------------------------------------------------------
# NIH

def test_nih_labels_official_and_patient_splits(tmp_path):
    raw = Path(R.nih(tmp_path / "nih", n=60, seed=1, size=40))
    table = run(["--dataset", "nih", "--root", str(raw), "--out", str(tmp_path / "out"), "--size", "16", "--workers", "1",
                 "--split-by", "patient"])
    meta, t, images = prepared(tmp_path / "out")
    assert images.shape == (60, 16, 16, 1) and meta["orig_size"] == [40, 40] and meta["task"] == "multilabel"
    assert meta["labels"] == sorted(R.NIH_FINDINGS)
    entry = pd.read_csv(raw / "Data_Entry_2017_v2020.csv").set_index("Image Index")
    for row in t.itertuples(index=False):
        name = row.path.split("/")[-1]
        tokens = set(entry.loc[name, "Finding Labels"].split("|"))
        assert {l for l in meta["labels"] if t.loc[t.path == row.path, l].item() == 1} == tokens - {"No Finding"}
        assert row.view == entry.loc[name, "View Position"]
    test_names = set(open(raw / "test_list.txt").read().split())
    assert set(t.path[t.split == "test"].str[len("images/"):]) == test_names
    assert (t.split == "valid").sum() > 0     # --split-by patient: a validation split by patient
    no_leak(t)
    # image i is the file in row i, through the same center-crop + resize
    first = np.asarray(Image.open(raw / t.path[0]).resize((16, 16), Image.BILINEAR))
    assert np.abs(images[0, :, :, 0].astype(int) - first).max() <= 1
    assert len(table) == 60


@needs_real
def test_nih_real_excerpt_eleven_field_rows(tmp_path):
    raw = tmp_path / "nih"
    raw.mkdir()
    shutil.copy(REAL / "metadata" / "nih_Data_Entry_2017_v2020.sample.csv", raw / "Data_Entry_2017_v2020.csv")
    lines = open(raw / "Data_Entry_2017_v2020.csv").read().splitlines()
    names = [l.split(",")[0] for l in lines[1:]]
    (raw / "test_list.txt").write_text("\n".join(names[::4]) + "\n")
    (raw / "train_val_list.txt").write_text("\n".join(n for i, n in enumerate(names) if i % 4) + "\n")
    run(["--dataset", "nih", "--root", str(raw), "--out", str(tmp_path / "out"), "--dry-run"])
    t = pd.read_csv(tmp_path / "out" / "labels.csv", dtype=str, keep_default_na=False)
    assert len(t) == len(names)
    for line, row in zip(lines[1:], t.itertuples(index=False)):
        fields = line.split(",")
        assert len(fields) == 11
        assert row.path == "images/" + fields[0] and row.patient == fields[3] and row.view == fields[6]
        tokens = set(fields[1].split("|"))
        assert {l for l in R.NIH_FINDINGS if t.loc[t.path == row.path, l].item() == "1"} == tokens - {"No Finding"}
    assert not (tmp_path / "out" / "meta.json").exists() and (tmp_path / "out" / "label_stats.csv").exists()


# ----------------------------------------------------------------------------------------
# CheXpert and MIMIC (same coding)

def expected_chexpert(row, name, uncertain="ignore", blank="ignore"):
    """The rule written out independently of prepare_data: No Finding = 1 -> 0, -1 -> per
    --uncertain, blank -> per --blank."""
    if str(row["No Finding"]) in ("1.0", "1"):
        return 0.0
    v = row[name]
    if v in ("", None) or (isinstance(v, float) and np.isnan(v)):
        return 0.0 if blank == "zeros" else np.nan
    v = float(v)
    if v == -1:
        return {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    return v


def check_chexpert_rows(raw_rows, t, uncertain, blank):
    assert len(raw_rows) == len(t)
    for (_, raw), (_, row) in zip(raw_rows.iterrows(), t.iterrows()):
        assert row["path"] == raw["Path"]
        for name in R.CHEXPERT_COLUMNS:
            col = "Effusion" if name == "Pleural Effusion" else name
            exp, got = expected_chexpert(raw, name, uncertain, blank), row[col]
            assert (np.isnan(exp) and np.isnan(got)) or exp == got, (raw["Path"], name, exp, got)


@pytest.mark.parametrize("uncertain,blank", [("ignore", "ignore"), ("ones", "zeros"), ("zeros", "ignore")])
def test_chexpert_label_rules_and_views(tmp_path, uncertain, blank):
    base = tmp_path / "raw"
    R.chexpert(base, n=40, seed=3, size=32)
    root = base / "CheXpert-v1.0-small"
    # one hand-written row with every case: No Finding with -1 and 1 (overridden to 0)
    train = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    special = train.iloc[0].copy()
    special["No Finding"], special["Cardiomegaly"], special["Support Devices"] = "1.0", "-1.0", "1.0"
    special["Path"] = special["Path"].replace("view1_frontal", "view3_frontal")  # a file listed once
    train = pd.concat([train, special.to_frame().T], ignore_index=True)
    train.to_csv(root / "train.csv", index=False)
    out = tmp_path / "out"
    run(["--dataset", "chexpert", "--root", str(base), "--out", str(out), "--dry-run",
         "--uncertain", uncertain, "--blank", blank])
    t = pd.read_csv(out / "labels.csv", dtype={"path": str, "view": str, "split": str, "patient": str})
    raw = pd.concat([train.assign(split="train"),
                     pd.read_csv(root / "valid.csv", dtype=str, keep_default_na=False).assign(split="valid")],
                    ignore_index=True)
    views = raw["AP/PA"].where(raw["Frontal/Lateral"] == "Frontal", "L")
    raw = raw[views.isin(PAPER_VIEWS)].reset_index(drop=True)
    check_chexpert_rows(raw, t, uncertain, blank)
    assert list(t.split) == list(raw.split) and set(t.view) == {"AP", "PA", "L"}
    special_row = t[t.split == "train"].iloc[-1]                    # the No Finding row
    assert special_row.path == special["Path"] and special_row.iloc[4:].eq(0).all()
    train.loc[3, "Edema"] = "2.0"                                     # not a CheXpert code
    train.to_csv(root / "train.csv", index=False)
    with pytest.raises(UserError, match=r"train.csv line 5 column 'Edema': '?2.0'? is not one of"):
        run(["--dataset", "chexpert", "--root", str(base), "--out", str(tmp_path / "bad"), "--dry-run"])
    no_leak(t)


@needs_real
def test_chexpert_real_excerpt(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    shutil.copy(REAL / "metadata" / "chexpert_train.sample.csv", root / "train.csv")
    header = open(root / "train.csv").readline()
    (root / "valid.csv").write_text(header)
    run(["--dataset", "chexpert", "--root", str(root), "--out", str(tmp_path / "out"), "--dry-run"])
    t = pd.read_csv(tmp_path / "out" / "labels.csv", dtype={"path": str, "view": str})
    raw = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    views = raw["AP/PA"].where(raw["Frontal/Lateral"] == "Frontal", "L")
    raw = raw[views.isin(PAPER_VIEWS)].reset_index(drop=True)
    check_chexpert_rows(raw, t, "ignore", "ignore")
    assert t.patient.str.match(r"patient\d{5}$").all() and t.path.str.startswith("CheXpert-v1.0-small/").all()


def test_mimic_layout_splits_and_views(tmp_path):
    root = tmp_path / "mimic"
    labels, meta, split = [], [], []
    for k in range(12):
        subject, study = 10000000 + k, 50000000 + k
        labels.append({"subject_id": subject, "study_id": study, "No Finding": 1.0 if k % 3 == 0 else np.nan,
                       **{n: [1.0, 0.0, -1.0, np.nan][(k + i) % 4] for i, n in enumerate(R.CHEXPERT_COLUMNS)}})
        for j, view in enumerate(["PA", "LATERAL"]):
            dicom = f"d{k}_{j}"
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                         "Rows": 40, "Columns": 40})
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                          "split": ["train", "validate", "test"][k % 3]})
            path = root / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.tile(np.linspace(40, 200, 40), (40, 1)).astype(np.uint8) + k  # smooth: JPEG ~ lossless
            Image.fromarray(pixels).save(path, quality=95)
            write_dicom(path.with_suffix(".dcm"), pixels, 8)  # the DICOM release: same layout, .dcm
    for name, rows in (("chexpert", labels), ("metadata", meta), ("split", split)):
        pd.DataFrame(rows).to_csv(root / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False)
    run(["--dataset", "mimic", "--root", str(root), "--out", str(tmp_path / "out"), "--size", "16", "--workers", "1"])
    m, t, images = prepared(tmp_path / "out")
    assert len(t) == 12 and set(t.view) == {"PA"} and set(t.split) == {"train", "valid", "test"}
    lab = pd.DataFrame(labels)
    for row in t.itertuples(index=False):
        k = int(row.patient) - 10000000
        assert row.split == ["train", "valid", "test"][k % 3]
        raw = {n: ("" if np.isnan(v) else str(v)) if isinstance(v, float) else v for n, v in lab.iloc[k].items()}
        raw["No Finding"] = "1.0" if lab.iloc[k]["No Finding"] == 1 else ""
        for n in R.CHEXPERT_COLUMNS:
            exp = expected_chexpert(raw, n)
            got = t.loc[t.path == row.path, "Effusion" if n == "Pleural Effusion" else n].item()
            assert (np.isnan(exp) and np.isnan(got)) or exp == got
    run(["--dataset", "mimic", "--root", str(root), "--out", str(tmp_path / "all"), "--dry-run", "--views", "all"])
    assert len(pd.read_csv(tmp_path / "all" / "labels.csv")) == 24
    run(["--dataset", "mimic-dicom", "--root", str(root), "--out", str(tmp_path / "dcm"), "--size", "16",
         "--workers", "1"])
    _, t_dcm, images_dcm = prepared(tmp_path / "dcm")
    assert (t_dcm.path == t.path.str.replace(".jpg", ".dcm")).all()
    assert t_dcm.drop(columns="path").equals(t.drop(columns="path"))
    assert np.abs(images_dcm.astype(int) - images.astype(int)).mean() < 3  # JPEG vs lossless pixels


# ----------------------------------------------------------------------------------------
# PadChest

# The paper's label rule written out here, independently of prepare_data's table: a label is
# positive when its lower-cased name or one of these strings occurs in one of the image's labels.
PADCHEST_RULE = {
    "Infiltration": ["infiltrates", "interstitial pattern", "ground glass pattern", "reticular interstitial pattern",
                     "reticulonodular interstitial pattern", "alveolar pattern", "consolidation", "air bronchogram"],
    "Pleural_Thickening": ["pleural thickening"], "Consolidation": ["air bronchogram"],
    "Hilar Enlargement": ["adenopathy", "pulmonary artery enlargement"], "Support Devices": ["device", "pacemaker"],
}
PADCHEST_27 = ["Air Trapping", "Aortic Atheromatosis", "Aortic Elongation", "Atelectasis", "Bronchiectasis",
               "Cardiomegaly", "Consolidation", "Costophrenic Angle Blunting", "Edema", "Effusion", "Emphysema",
               "Fibrosis", "Flattened Diaphragm", "Fracture", "Granuloma", "Hemidiaphragm Elevation", "Hernia",
               "Hilar Enlargement", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia",
               "Pneumothorax", "Scoliosis", "Support Devices", "Tuberculosis"]


def expected_padchest(cell):
    return {n: float(any(k in cell for k in [n.lower()] + PADCHEST_RULE.get(n, []))) for n in PADCHEST_27}


def test_padchest_synonyms_by_hand():
    """A few label lists with their positives worked out by hand."""
    cases = {("laminar atelectasis",): {"Atelectasis"},
             ("air bronchogram", "unchanged"): {"Infiltration", "Consolidation"},
             ("pacemaker", "pleural effusion"): {"Support Devices", "Effusion"},
             ("adenopathy",): {"Hilar Enlargement"}, ("normal",): set(),
             ("apical pleural thickening", "costophrenic angle blunting"): {"Pleural_Thickening",
                                                                           "Costophrenic Angle Blunting"}}
    table = P.padchest_labels([list(k) for k in cases])
    assert sorted(table.columns) == PADCHEST_27
    for row, positives in zip(table.itertuples(index=False), cases.values()):
        assert {n for n, v in zip(table.columns, row) if v == 1} == positives


def padchest_root(tmp_path, csv_rows=None):
    root = tmp_path / "padchest"
    root.mkdir()
    if csv_rows is None:
        shutil.copy(REAL / "metadata" / "padchest_labels_160K_01.02.19.sample.csv.gz", root / P.PADCHEST_CSV)
    else:
        with gzip.open(root / P.PADCHEST_CSV, "wt") as f:
            pd.DataFrame(csv_rows).to_csv(f)
    return root


# Two of the files the authors' padchest.py removes (missing or wrong in their download).
AUTHORS_EXCLUDED = ["269300710246070740096540277379121868595_e7zsan.png",
                    "216840111366964012819207061112010307142602253_04-014-084.png"]


def authors_padchest(raw, views=PAPER_VIEWS):
    """The authors' padchest.py written out: AP_horizontal -> AP Supine, keep the views, drop
    null Labels and their excluded files, RandomState(42).shuffle of the row indices; their train
    set (the first int(0.9 n) shuffled indices) then their test set, in that order. Labels: the
    lower-cased name or a synonym anywhere in the raw cell (their str.contains)."""
    view = raw["Projection"].replace({"AP_horizontal": "AP Supine"})
    kept = raw[view.isin(views) & raw["Labels"].notna() & ~raw["ImageID"].isin(AUTHORS_EXCLUDED)]
    kept = kept.reset_index(drop=True)
    order = np.arange(len(kept))
    np.random.RandomState(42).shuffle(order)
    n_train = int(len(kept) * 0.9)
    return kept.iloc[order].assign(split=["train"] * n_train + ["test"] * (len(kept) - n_train))


def assert_authors_rows(t, authors):
    assert list(t.path) == list(authors.ImageDir + "/" + authors.ImageID) and list(t.split) == list(authors.split)
    for row, cell in zip(t.to_dict("records"), authors.Labels):
        assert {n: row[n] for n in PADCHEST_27} == expected_padchest(cell)


@needs_real
def test_padchest_real_excerpt_labels_views_and_paper_split(tmp_path):
    root = padchest_root(tmp_path)
    argv = ["--dataset", "padchest", "--root", str(root), "--dry-run"]
    run(argv + ["--out", str(tmp_path / "out")])
    t = pd.read_csv(tmp_path / "out" / "labels.csv", dtype={"path": str, "patient": str, "view": str})
    raw = pd.read_csv(root / P.PADCHEST_CSV, dtype=str)
    authors = authors_padchest(raw)
    empty = authors["Labels"].map(lambda c: not [s for s in ast.literal_eval(c) if s.strip()])
    assert empty.sum() == 1 and (raw.Projection == "AP_horizontal").any()   # kept, every label 0
    assert len(t) == 269 and (t.split == "train").sum() == 242
    assert_authors_rows(t, authors)
    assert set(t.view) == set(PAPER_VIEWS)
    assert (t["Infiltration"] == 1).any() and (t["Support Devices"] == 1).any()
    run(argv + ["--out", str(tmp_path / "again")])  # deterministic
    assert pd.read_csv(tmp_path / "again" / "labels.csv").equals(pd.read_csv(tmp_path / "out" / "labels.csv"))
    run(argv + ["--out", str(tmp_path / "strict"), "--split-by", "patient"])
    strict = pd.read_csv(tmp_path / "strict" / "labels.csv", dtype={"patient": str})
    no_leak(strict)
    assert set(strict.split) == {"train", "valid", "test"}


def test_padchest_rows_and_split_are_the_authors_on_synthetic_metadata(tmp_path, capsys):
    """Every kind of row the rule meets, in the real format: null Labels, [] and [''] (kept, all
    negative), a cell that is no list literal (kept, matched as text), the authors' excluded
    files, the five views, EXCLUDE and UNK projections."""
    root = Path(R.padchest(tmp_path / "pc", n=80, size=16))
    csv = root / P.PADCHEST_CSV
    raw = pd.read_csv(csv, dtype=str)
    raw.loc[[3, 12], "ImageID"] = AUTHORS_EXCLUDED
    raw.loc[[4, 9], "Labels"] = ["['']", "[]"]
    raw.loc[10, "Labels"] = "pleural effusion"
    raw.loc[[14, 22], "Projection"] = "UNK"
    raw.drop(columns=raw.columns[0]).to_csv(csv)
    run(["--dataset", "padchest", "--root", str(root), "--out", str(tmp_path / "out"), "--dry-run"])
    t = pd.read_csv(tmp_path / "out" / "labels.csv", dtype={"path": str})
    authors = authors_padchest(raw)
    assert (authors.split == "train").sum() == int(len(authors) * 0.9) and len(authors) == 60
    assert set(raw.ImageID[[4, 9, 10]]) <= set(authors.ImageID) and not set(AUTHORS_EXCLUDED) & set(authors.ImageID)
    assert raw.Labels.isna().any() and {"EXCLUDE", "UNK", "COSTAL"} <= set(raw.Projection)
    assert_authors_rows(t, authors)
    assert "dropped: 2 rows (excluded by the paper)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "out" / "args.json"))["split_by"] == "paper"


def test_padchest_few_shot_subsets_are_the_authors(tmp_path):
    """Rows in the authors' dataset order make transfer's per-class rule on the single-label view
    pick their subsets: finetune.py's --multilabel-force-classification (rows with exactly one
    positive, argmax) and --examples_per_class (RandomState(seed), each class's indices shuffled
    in class order, the first k)."""
    import transfer
    root = Path(R.padchest(tmp_path / "pc", n=150, size=8))
    run(["--dataset", "padchest", "--root", str(root), "--out", str(tmp_path / "out"), "--size", "8", "--workers", "1"])
    ours = P.PreparedDataset(str(tmp_path / "out"), "train")
    keep, onehot = transfer.single_label(ours.targets)
    train = authors_padchest(pd.read_csv(root / P.PADCHEST_CSV, dtype=str)).query("split == 'train'")
    labels = np.array([[expected_padchest(cell)[n] for n in PADCHEST_27] for cell in train.Labels])
    single = np.flatnonzero(labels.sum(1) == 1)
    classes, paths = labels[single].argmax(1), list(train.ImageDir + "/" + train.ImageID)
    assert len(single) > 40 and ours.meta["shot_rule"] == "per_class"
    for k in (1, 2, 5):
        for seed in range(3):
            rng, chosen = np.random.RandomState(seed), []
            for c in range(27):
                members = np.arange(len(single))[classes == c]
                rng.shuffle(members)
                chosen += [paths[single[i]] for i in members[:k]]
            ours_chosen = ours.table.path[ours.rows[keep[transfer.select_shots(onehot, k, seed)]]]
            assert sorted(ours_chosen) == sorted(chosen)


def test_padchest_bad_bits_stored_is_one_line(tmp_path):
    root = Path(R.padchest(tmp_path / "pc", n=6, size=16))
    raw = pd.read_csv(root / P.PADCHEST_CSV, dtype=str)
    raw.loc[2, "BitsStored_DICOM"] = "20"
    raw.drop(columns=raw.columns[0]).to_csv(root / P.PADCHEST_CSV)
    r = cli("--dataset", "padchest", "--root", str(root), "--out", str(tmp_path / "o"), "--dry-run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "line 4 column 'BitsStored_DICOM': '20'" in r.stderr


def test_padchest_16bit_conversion_uses_bits_stored(tmp_path):
    rows = []
    for i, (bits, value) in enumerate([(12, 4095), (12, 2048), (10, 1023), (12, 0)]):
        name = f"img{i}.png"
        rows.append({"ImageID": name, "ImageDir": 0, "PatientID": f"p{i}", "Projection": "PA",
                     "Labels": "['pleural effusion', ' laminar atelectasis']" if i else "['normal']",
                     "BitsStored_DICOM": bits, "value": value})
    root = padchest_root(tmp_path, rows)
    (root / "0").mkdir()
    for r in rows:
        Image.fromarray(np.full((30, 40), r["value"], np.uint16)).save(root / "0" / r["ImageID"])
    run(["--dataset", "padchest", "--root", str(root), "--out", str(tmp_path / "out"), "--size", "8", "--workers", "1"])
    meta, t, images = prepared(tmp_path / "out")
    assert [int(images[list(t.path).index(f"0/img{i}.png")].mean()) for i in range(4)] == [255, 128, 255, 0]
    assert meta["orig_size"] == [30, 40]
    row = t[t.path == "0/img1.png"].iloc[0]
    assert row["Effusion"] == 1 and row["Atelectasis"] == 1 and row["Cardiomegaly"] == 0


def test_padchest_model_input_is_the_authors_value_over_65535(tmp_path, prepared):
    """A 12-bit (BitsStored 12) and a 16-bit PNG: the model input, through the full-range uint8
    store and labels.csv's scale, equals the authors' (padchest.py img / 65535, then their chest
    Normalize of the first channel, repeated) to within 1/255; --intensity bits-stored is the
    full range of BitsStored instead. In pre-training too, alone and merged."""
    import models
    import pretrain
    ramp = np.linspace(0, 1, 24 * 24).reshape(24, 24)
    rows = [{"ImageID": f"img{bits}.png", "ImageDir": 0, "PatientID": f"p{bits}", "Projection": "PA",
             "Labels": "['normal']", "BitsStored_DICOM": bits} for bits in (12, 16)]
    root = padchest_root(tmp_path, rows)
    (root / "0").mkdir()
    pngs = {}
    for bits in (12, 16):
        pngs[bits] = np.rint(ramp * (2 ** bits - 1)).astype(np.uint16)
        Image.fromarray(pngs[bits]).save(root / "0" / f"img{bits}.png")
    common = ["--dataset", "padchest", "--root", str(root), "--size", "24", "--workers", "1", "--test-fraction", "0"]
    for intensity in ("paper", "bits-stored"):
        out = tmp_path / intensity
        run(common + ["--out", str(out), "--intensity", intensity])
        ds = P.PreparedDataset(str(out))
        images, _, scale = ds.__getitems__(np.arange(len(ds)))
        for norm, (mean, std) in (("bit", (0.5, 0.5)), ("imagenet", (0.485, 0.229))):
            x = models.to_model_input(images, norm=norm, scale=scale, chest=True)
            for i, path in enumerate(ds.table.path):
                bits = int(path[len("0/img"):-len(".png")])
                white = 65535 if intensity == "paper" else 2 ** bits - 1
                authors = (pngs[bits] / white - mean) / std
                error = np.abs(x[i].numpy() - authors).max() * std   # in image units, [0, 1]
                print(f"{intensity} {norm} {bits}-bit: max |ours - authors'| = {error:.2e} (image units)")
                assert error <= 1 / 255, (intensity, norm, bits)
        assert json.load(open(out / "meta.json"))["intensity"] == intensity
    paper = P.PreparedDataset(str(tmp_path / "paper"))
    assert sorted(paper.scale.tolist()) == pytest.approx([4095 / 65535, 1.0])
    broken = pd.read_csv(tmp_path / "bits-stored" / "labels.csv", dtype=str).assign(scale=["0.5", "x"])
    broken.to_csv(tmp_path / "bits-stored" / "labels.csv", index=False)
    with pytest.raises(UserError, match="line 3 column 'scale': not a positive number"):
        P.PreparedDataset(str(tmp_path / "bits-stored"))
    other = prepared("other", size=24, task="multilabel")
    run(["--dataset", "merge", "--inputs", str(tmp_path / "paper"), str(other), "--out", str(tmp_path / "m"),
         "--labels", "union"])
    merged = pretrain.SourceDataset([str(tmp_path / "m")], None)
    images, _, scale = merged.__getitems__(np.arange(len(merged)))
    assert sorted(scale.tolist()[:2]) == pytest.approx([4095 / 65535, 1.0]) and (scale[2:] == 1).all()
    args = argparse.Namespace(eval_crop=1.0, image_size=24, channels_last=False, input_norm="bit")
    assert torch.equal(pretrain.eval_input(images, args, scale),
                       models.to_model_input(images, norm="bit", scale=scale, chest=True))
    assert pretrain.eval_input(images, args, scale)[scale < 1].max() == pytest.approx(4095 / 65535 * 2 - 1, abs=1e-6)


# ----------------------------------------------------------------------------------------
# COVIDx, Tuberculosis, natural datasets, the user's CSV

@needs_real
def test_covidx_real_lists_with_space_in_patient(tmp_path):
    root = tmp_path / "covidx"
    root.mkdir()
    train = open(REAL / "metadata" / "covidx_cxr2_train.sample.txt").read() + \
        open(REAL / "metadata" / "covidx8b_train.sample.txt").read()
    (root / "train.txt").write_text(train)
    shutil.copy(REAL / "metadata" / "covidx_cxr2_test.sample.txt", root / "test.txt")
    run(["--dataset", "covidx", "--root", str(root), "--out", str(tmp_path / "out"), "--dry-run"])
    t = pd.read_csv(tmp_path / "out" / "labels.csv", dtype=str, keep_default_na=False)
    assert len(t) == len({P.parse_covidx_line(line)[1] for line in train.splitlines()}) + 50  # the two lists share files
    row = t[t.path == "train/COVID(1).png"].iloc[0]
    assert row.patient == "COVID 1" and row.positive == "1" and row.negative == "0"
    assert (t[["negative", "positive"]].astype(int).sum(axis=1) == 1).all()
    assert set(t.split[t.path.str.startswith("test/")]) == {"test"}
    assert set(t.split[t.path.str.startswith("train/")]) == {"train"}     # a target: no validation carve-out
    no_leak(t)


def test_covidx_line_parser():
    assert P.parse_covidx_line("COVID 1 COVID(1).png positive sirm\n") == ("COVID 1", "COVID(1).png", "positive")
    assert P.parse_covidx_line("5 ARDSSevere.png negative cohen") == ("5", "ARDSSevere.png", "negative")
    assert P.parse_covidx_line("p1 a b.png COVID-19") == ("p1 a", "b.png", "COVID-19")


def test_tuberculosis_paper_split_per_folder(tmp_path):
    raw = Path(R.tuberculosis(tmp_path / "tb", n=60, size=24))
    argv = ["--dataset", "tuberculosis", "--root", str(raw), "--size", "16", "--workers", "2"]
    run(argv + ["--out", str(tmp_path / "out")])
    meta, t, images = prepared(tmp_path / "out")
    assert meta["labels"] == ["normal", "tuberculosis"] and meta["task"] == "multiclass" and len(t) == 60
    assert (t.tuberculosis == t.path.str[-5].astype(int)).all() and (t.normal + t.tuberculosis == 1).all()
    # the authors' tuberculosis.py per folder: sorted names, RandomState(42).shuffle, first 85 % train;
    # their Merge of the two folders (Shenzhen first) orders the train and the test sets
    train, test = [], []
    for folder in ("ChinaSet_AllFiles/CXR_png", "MontgomerySet/CXR_png"):
        files = sorted(f"{folder}/{n}" for n in os.listdir(raw / folder))
        np.random.RandomState(42).shuffle(files)
        n_train = int(len(files) * 0.85)
        train, test = train + files[:n_train], test + files[n_train:]
    assert list(t.path[t.split == "train"]) == train and list(t.path[t.split == "test"]) == test
    assert (t.split == "test").sum() == 40 - int(40 * 0.85) + 20 - int(20 * 0.85)   # 6 + 3; no valid
    assert meta["geometry"] == "squash" and meta["shot_rule"] == "loader" and (t.aspect == 1).all()
    run(argv + ["--out", str(tmp_path / "again")])
    assert prepared(tmp_path / "again")[1].equals(t)
    run(argv + ["--out", str(tmp_path / "strict"), "--split-by", "patient", "--valid-fraction", "0.1"])
    strict = prepared(tmp_path / "strict")[1]
    assert set(strict.split) == {"train", "valid", "test"}
    no_leak(strict)


def test_pets_offline_and_cifar_needs_download(tmp_path):
    R.pets(tmp_path / "pets", per_class=3)
    run(["--dataset", "pets", "--root", str(tmp_path / "pets"), "--out", str(tmp_path / "out"), "--size", "16", "--workers", "1"])
    meta, t, images = prepared(tmp_path / "out")
    assert images.shape == (18, 16, 16, 3) and meta["labels"] == ["Abyssinian", "American Bulldog", "Beagle"]
    assert meta["orig_size"] == [24, 24] and ((t.path.str.contains("Abyssinian")) == (t.Abyssinian == 1)).all()
    ids = t.path.str.extract(r"_(\d+)\.jpg")[0].astype(int)
    assert (t.split == np.where(ids % 2 == 0, "test", "train")).all()   # official split, no valid carve-out
    r = cli("--dataset", "cifar10", "--root", str(tmp_path / "pets"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--download" in r.stderr


def test_download_offline_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import urllib.error
    import torchvision.datasets

    def offline(root, *a, **k):
        os.makedirs(os.path.join(root, "cifar-10-batches-py"), exist_ok=True)   # as a partial download would
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="--download cifar10 failed \\(offline\\); nothing was kept"):
        run(["--dataset", "cifar10", "--root", str(tmp_path / "dl"), "--out", str(tmp_path / "c"), "--download"])
    assert not (tmp_path / "dl").exists() and not (tmp_path / "c").exists()


def test_cifar10_and_flowers102_from_torchvision_folders(tmp_path):
    """The files torchvision downloads, written in their real formats (CIFAR's pickled batches,
    Flowers-102's jpg/ + .mat files)."""
    import pickle
    R.cifar10(tmp_path / "cifar", per_class=1)
    run(["--dataset", "cifar10", "--root", str(tmp_path / "cifar"), "--out", str(tmp_path / "c10")])
    meta, t, images = prepared(tmp_path / "c10")
    names = pickle.load(open(tmp_path / "cifar" / "cifar-10-batches-py" / "batches.meta", "rb"))["label_names"]
    assert images.shape == (60, 32, 32, 3) and meta["labels"] == names and meta["orig_size"] == [32, 32]
    first = pickle.load(open(tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1", "rb"))
    assert (images[3] == first["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)).all()  # CHW rows -> HWC
    assert (t[names].to_numpy().argmax(1) == np.tile(np.arange(10), 6)).all()
    assert (t.split[:50] == "train").all() and (t.split[50:] == "test").all()

    R.flowers102(tmp_path / "flowers", train_per_class=2, valid_per_class=1, test_per_class=3, classes=4, size=20)
    argv = ["--dataset", "flowers102", "--root", str(tmp_path / "flowers"), "--size", "16", "--workers", "1"]
    run(argv + ["--out", str(tmp_path / "f")])
    meta, t, images = prepared(tmp_path / "f")
    assert images.shape == (24, 16, 16, 3) and len(meta["labels"]) == 102 and meta["orig_size"] == [20, 20]
    ids = t.path.str.extract(r"image_(\d+)")[0].astype(int).to_numpy()
    assert (t[meta["labels"]].to_numpy().argmax(1) == (ids - 1) // 6).all()
    official = np.array(["train", "train", "valid", "test", "test", "test"])[(ids - 1) % 6]
    # the paper's swap: train on the official test set, test on train + val
    assert (t.split == np.where(official == "test", "train", "test")).all()
    assert ((t.split == "train").sum(), (t.split == "test").sum()) == (12, 12)
    run(argv + ["--out", str(tmp_path / "official"), "--split-by", "patient"])
    assert (prepared(tmp_path / "official")[1].split == official).all()


def test_imagenet_from_ilsvrc_folders(tmp_path):
    R.imagenet(tmp_path / "in", classes=3, per_class=2, size=20)
    run(["--dataset", "imagenet", "--root", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "8",
         "--workers", "1"])
    meta, t, images = prepared(tmp_path / "out")
    assert meta["labels"] == ["n01440764", "n01440765", "n01440766"] and meta["task"] == "multiclass"
    assert images.shape == (12, 8, 8, 3) and list(t.split) == ["train"] * 6 + ["valid"] * 6
    assert (t[meta["labels"]].to_numpy().argmax(1) == [0, 0, 1, 1, 2, 2] * 2).all()


def test_user_csv_multiclass_and_imagefolder(tmp_path):
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24), np.uint8)).save(root / "a" / f"{i}.png")
        rows.append({"path": f"a/{i}.png", "label": ["cat", "dog"][i % 2], "patient": f"p{i // 2}",
                     "split": "test" if i >= 8 else ""})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    run(["--dataset", "csv", "--root", str(root), "--labels-csv", str(tmp_path / "labels.csv"),
         "--out", str(tmp_path / "out"), "--size", "8", "--workers", "1", "--valid-fraction", "0.25"])
    meta, t, images = prepared(tmp_path / "out")
    assert meta["labels"] == ["cat", "dog"] and images.shape == (10, 8, 8, 1)
    assert (t.dog == [i % 2 for i in range(10)]).all() and (t.split[8:] == "test").all()
    no_leak(t)
    run(["--dataset", "imagefolder", "--root", str(root), "--out", str(tmp_path / "if"), "--size", "8", "--workers", "1"])
    meta, t, images = prepared(tmp_path / "if")
    assert meta["labels"] == ["a"] and images.shape == (10, 8, 8, 3)


def test_bad_metadata_is_one_line_naming_file_line_column(tmp_path):
    rows = pd.DataFrame({"path": [f"{i}.png" for i in range(200)], "finding": ["1", "0"] * 100})
    rows.loc[150, "finding"] = "yes"                 # a stray value in a 0/1 column
    rows.to_csv(tmp_path / "stray.csv", index=False)
    (tmp_path / "latin1.csv").write_bytes("path,finding\nR\xe9sum\xe9.png,1\n".encode("latin-1"))
    packed = gzip.compress(b"path,finding\n" + b"".join(b"%d.png,1\n" % i for i in range(5000)))
    (tmp_path / "t.csv.gz").write_bytes(packed[:len(packed) // 2])
    (tmp_path / "split.csv").write_text("path,finding,split\na.png,1,train\nb.png,0,train\n")
    (tmp_path / "images").mkdir()  # --root: the output folder must not lie inside it
    for name, message in (("stray.csv", "stray.csv line 152 column 'finding': 'yes' is not 1, 0, -1 or empty"),
                          ("latin1.csv", "latin1.csv: unreadable table"), ("t.csv.gz", "t.csv.gz: unreadable table"),
                          ("split.csv", "the test split is empty")):
        r = cli("--dataset", "csv", "--root", str(tmp_path / "images"), "--labels-csv", str(tmp_path / name),
                "--out", str(tmp_path / "o"), "--dry-run", "--test-fraction", "0.5")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, \
            (name, r.stderr)


def test_symlink_loops_are_walked_once_and_files_listed_once(tmp_path):
    raw = Path(R.tuberculosis(tmp_path / "tb", n=12, size=16))
    os.symlink(raw, raw / "ChinaSet_AllFiles" / "loop")                  # a loop back to the root
    os.symlink(raw / "MontgomerySet", raw / "again")                    # a second path to the same files
    t = run(["--dataset", "tuberculosis", "--root", str(raw), "--out", str(tmp_path / "o"), "--dry-run"])
    assert len(t) == 12 and t.file.map(os.path.realpath).is_unique


# ----------------------------------------------------------------------------------------
# Image decoding

@needs_real
def test_real_images_png_jpeg_dicom():
    img = REAL / "images"
    png, orig = P.load_image(str(img / "00000001_000.png"), 512, 1)
    assert orig == (512, 512) and np.array_equal(png[..., 0], np.asarray(Image.open(img / "00000001_000.png")))
    jpg, orig = P.load_image(str(img / "16747_3_1.jpg"), 64, 1)
    assert orig == (885, 1036) and jpg.shape == (64, 64, 1) and 30 < jpg.mean() < 220
    assert P.load_image(str(img / "16747_3_1.jpg"), 64, 3)[0].shape == (64, 64, 3)
    mono2, orig = P.load_image(str(img / "siim_chest_cr_jpeg_baseline.dcm"), 1024, 1)
    mono1, _ = P.load_image(str(img / "siim_chest_cr_jpeg_baseline_monochrome1.dcm"), 1024, 1)
    assert orig == (1024, 1024) and mono2.std() > 10
    assert (mono1.astype(int) + mono2.astype(int) == 255).all()
    dx, orig = P.load_image(str(img / "nih_chest_dx_implicit_vr.dcm"), 128, 1)
    assert orig == (1024, 1024) and dx.shape == (128, 128, 1) and dx.std() > 10
    # a square image squashed is its centre crop (the demo's square target is unchanged); a
    # 1036 x 885 one is squashed whole, as a resize of the whole image (up to the JPEG draft's
    # DCT downscale)
    assert np.array_equal(P.load_image(str(img / "00000001_000.png"), 100, 1, squash=True)[0],
                          P.load_image(str(img / "00000001_000.png"), 100, 1)[0])
    whole = np.asarray(Image.open(img / "16747_3_1.jpg").convert("L").resize((64, 64), Image.BILINEAR))
    assert np.abs(P.load_image(str(img / "16747_3_1.jpg"), 64, 1, squash=True)[0][..., 0].astype(int) - whole).mean() < 2


def write_dicom(path, pixels, bits, photometric="MONOCHROME2", slope=1.0, intercept=0.0):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_bits_stored_rescale_and_monochrome1(tmp_path):
    pixels = np.tile(np.array([0, 1024, 2048, 4095], np.uint16), (4, 1))
    write_dicom(tmp_path / "m2.dcm", pixels, 12, slope=2.0, intercept=-100.0)
    write_dicom(tmp_path / "m1.dcm", pixels, 12, "MONOCHROME1")
    m2, _ = P.decode_dicom(str(tmp_path / "m2.dcm"), 1)
    m1, _ = P.decode_dicom(str(tmp_path / "m1.dcm"), 1)
    # range [0, 4095] after the same rescale maps to [0, 255]: the rescale cancels out
    assert list(m2[0]) == [0, 64, 128, 255] and list(m1[0]) == [255, 191, 127, 0]


# ----------------------------------------------------------------------------------------
# Rejects, resume, dry-run, merge

def bad_files_root(tmp_path):
    from pydicom.data import get_testdata_file
    root = tmp_path / "root"
    root.mkdir()
    rng = np.random.default_rng(0)
    good = [f"good{i}.png" for i in range(6)]
    for name in good:
        Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 255, (200, 200), np.uint8)).save(root / "full.png")
    (root / "truncated.png").write_bytes((root / "full.png").read_bytes()[:2000])
    (root / "full.png").unlink()
    (root / "text.png").write_text("not an image\n")
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), root / "jpegls.dcm")
    (tmp_path / "outside.png").write_bytes((root / "good0.png").read_bytes())
    bad = {"missing.png": "missing file", "truncated.png": "truncated", "text.png": "not an image",
           "jpegls.dcm": "pylibjpeg-libjpeg", "../outside.png": "outside the dataset root"}
    pd.DataFrame({"path": good + list(bad), "finding": [1, 0] * 3 + [1] * 5}).to_csv(tmp_path / "l.csv", index=False)
    return root, good, bad


def test_bad_files_go_to_rejects_and_good_ones_are_prepared(tmp_path):
    root, good, bad = bad_files_root(tmp_path)
    argv = ["--dataset", "csv", "--root", str(root), "--labels-csv", str(tmp_path / "l.csv"),
            "--out", str(tmp_path / "out"), "--size", "8", "--workers", "2"]
    with pytest.raises(UserError, match="5 of 11 images rejected"):
        run(argv)                                   # default threshold 1%
    assert not (tmp_path / "out" / "meta.json").exists()
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert dict(zip(rejects.path, rejects.reason)).keys() == bad.keys()
    for path, reason in zip(rejects.path, rejects.reason):
        assert bad[path] in reason, (path, reason)
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(root / "text.png")   # the user fixes one file
    run(argv + ["--max-rejects", "0.5"])            # resumes: only the changed reject is read again
    meta, t, images = prepared(tmp_path / "out")
    assert list(t.path) == good + ["text.png"] and list(t.finding) == [1, 0] * 3 + [1] and (images[6] == 7).all()
    for i, name in enumerate(good):
        assert np.array_equal(images[i, :, :, 0], P.load_image(str(root / name), 8, 1)[0][..., 0])


def test_strict_and_one_line_errors(tmp_path):
    root, good, bad = bad_files_root(tmp_path)
    r = cli("--dataset", "csv", "--root", str(root), "--labels-csv", str(tmp_path / "l.csv"), "--out",
            str(tmp_path / "o"), "--size", "8", "--strict", "--max-rejects", "0.9", "--workers", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--strict" in r.stderr
    pd.DataFrame({"file": ["a.png"], "x": [1]}).to_csv(tmp_path / "nopath.csv", index=False)
    r = cli("--dataset", "csv", "--root", str(root), "--labels-csv", str(tmp_path / "nopath.csv"), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "'path'" in r.stderr
    for argv in (["--dataset", "nope", "--out", "x"], ["--dataset", "nih", "--root", str(tmp_path / "absent"), "--out", "x"],
                 ["--dataset", "nih", "--root", str(tmp_path), "--out", str(tmp_path / "q")],
                 ["--dataset", "merge", "--inputs", str(tmp_path), "--out", "x"],
                 ["--dataset", "csv", "--root", str(root), "--labels-csv", str(tmp_path / "l.csv"), "--out",
                  str(tmp_path / "l.csv")],
                 ["--dataset", "csv", "--root", str(root), "--labels-csv", str(tmp_path / "l.csv"), "--out",
                  str(tmp_path / "w"), "--workers", "-1"]):
        r = cli(*argv)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)


def test_unsupported_dicom_codec_names_the_plugin():
    from pydicom.data import get_testdata_file
    for name in ("MR_small_jpeg_ls_lossless.dcm", "JPEG-lossy.dcm"):
        with pytest.raises(ValueError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
            P.decode_dicom(get_testdata_file(name), 1)


def test_resume_after_interruption_matches_one_shot_run(tmp_path):
    raw = R.nih(tmp_path / "nih", n=30, seed=2, size=32)
    argv = ["--dataset", "nih", "--root", str(raw), "--size", "16", "--workers", "2"]
    assert run(argv + ["--out", str(tmp_path / "a")], stop_after=11) is None
    assert not (tmp_path / "a" / "meta.json").exists() and not (tmp_path / "a" / "images.npy").exists()
    state = np.load(tmp_path / "a" / ".work" / "state.npz")
    assert 11 <= state["done"].sum() < 30
    run(argv + ["--out", str(tmp_path / "a")])
    run(argv + ["--out", str(tmp_path / "b"), "--workers", "1"])
    (ma, ta, ia), (mb, tb, ib) = prepared(tmp_path / "a"), prepared(tmp_path / "b")
    assert np.array_equal(ia, ib) and ta.equals(tb) and ma == mb and not (tmp_path / "a" / ".work").exists()
    with pytest.raises(UserError, match="--overwrite"):
        run(argv + ["--out", str(tmp_path / "a")])


def test_dead_worker_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch):
    raw = R.nih(tmp_path / "nih", n=24, seed=3, size=24)
    argv = ["--dataset", "nih", "--root", str(raw), "--out", str(tmp_path / "o"), "--size", "8", "--workers", "2"]
    real = P.load_image

    def killed_on_one_file(path, *a, **k):      # as the OOM killer would, in the forked worker
        if path.endswith("00000005_001.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *a, **k)
    monkeypatch.setattr(P, "load_image", killed_on_one_file)
    with pytest.raises(UserError, match="a decoding process died"):
        run(argv)
    assert not (tmp_path / "o" / "meta.json").exists()
    monkeypatch.setattr(P, "load_image", real)
    run(argv)
    meta, t, images = prepared(tmp_path / "o")
    assert len(t) == 24 and meta["counts"]["rejected"] == 0


def test_merge_intersection_and_union(tmp_path, capsys):
    R.nih(tmp_path / "nih", n=20, seed=4, size=32)
    R.chexpert(tmp_path / "chx", n=20, seed=5, size=32)
    common = ["--size", "8", "--workers", "1"]
    run(["--dataset", "nih", "--root", str(tmp_path / "nih"), "--out", str(tmp_path / "p_nih")] + common)
    run(["--dataset", "chexpert", "--root", str(tmp_path / "chx"), "--out", str(tmp_path / "p_chx")] + common)
    capsys.readouterr()
    run(["--dataset", "merge", "--inputs", str(tmp_path / "p_nih"), str(tmp_path / "p_chx"), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    seven = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia", "Pneumothorax"]
    assert "kept 7: " + ", ".join(seven) in out
    assert f"{tmp_path / 'p_nih'}: dropped 7 labels: Emphysema, Fibrosis, Hernia, Infiltration, Mass, Nodule, " \
           "Pleural_Thickening" in out
    meta, t, images = prepared(tmp_path / "m")
    _, tn, inih = prepared(tmp_path / "p_nih")
    _, tc, ichx = prepared(tmp_path / "p_chx")
    assert meta["labels"] == seven and len(t) == len(tn) + len(tc)
    assert np.array_equal(images, np.concatenate([inih, ichx]))
    assert t[seven].iloc[len(tn):].reset_index(drop=True).equals(tc[seven])
    # NIH (paper split: train / test) validates the merged source on its test rows, as the paper did
    assert set(tn.split) == {"train", "test"} and P.validation_split(tn) == "test"
    assert list(t.split) == list(tn.split.replace({"test": "valid"})) + list(tc.split)
    assert (t.patient.str.startswith("nih/")).sum() == len(tn)
    run(["--dataset", "merge", "--inputs", str(tmp_path / "p_nih"), str(tmp_path / "p_chx"), "--out",
         str(tmp_path / "u"), "--labels", "union"])
    meta, t, _ = prepared(tmp_path / "u")
    assert set(meta["labels"]) == set(R.NIH_FINDINGS) | {"Effusion" if l == "Pleural Effusion" else l for l in R.CHEXPERT_COLUMNS}
    assert t["Hernia"].iloc[len(tn):].isna().all() and t["Support Devices"].iloc[:len(tn)].isna().all()
    assert t["Hernia"].iloc[:len(tn)].notna().all()
    ds = P.PreparedDataset(str(tmp_path / "u"), "train")
    x, y, scale = ds.__getitems__([0, 1])
    assert x.shape == (2, 8, 8, 1) and y.shape == (2, len(meta["labels"])) and scale.tolist() == [1, 1]


def test_dry_run_writes_labels_and_stats_only(tmp_path, capsys):
    raw = R.nih(tmp_path / "nih", n=25, seed=6, size=32)
    run(["--dataset", "nih", "--root", str(raw), "--out", str(tmp_path / "d"), "--dry-run"])
    out = capsys.readouterr().out
    files = set(os.listdir(tmp_path / "d")) - {".lock"}   # models.folder_lock's file stays, free when unheld
    assert files == {"labels.csv", "label_stats.csv", "args.json"}
    t = pd.read_csv(tmp_path / "d" / "labels.csv")
    stats = pd.read_csv(tmp_path / "d" / "label_stats.csv")
    for r in stats.itertuples():
        v = t[r.label] if r.split == "all" else t[r.label][t.split == r.split]
        assert (r.positive, r.negative, r.masked) == ((v == 1).sum(), (v == 0).sum(), v.isna().sum())
        assert f"label {r.label!r} split {r.split}: positive {r.positive}" in out
    assert "images: " in out and "views: " in out and "dry run: metadata only, no image converted" in out


def test_help_lists_every_dataset_and_flag():
    r = cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for name, spec in P.DATASETS.items():
        assert f"{name} ({spec.task}, split: {spec.paper_split})" in text
    for action in P.get_args_parser()._actions:
        for opt in action.option_strings:
            assert opt in r.stdout
        assert action.help


def test_raw_layouts_write_all_every_dataset(tmp_path):
    R.write_all(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(R.FOLDERS)
