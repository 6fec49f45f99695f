"""Turn raw dataset downloads into prepared datasets that training reads without decoding.

    python prepare_data.py --dataset nih --root /data/NIH-ChestXRay-14 --out data/nih
    python prepare_data.py --dataset chexpert --root /data/CheXpert-v1.0-small --out data/chexpert --workers 16
    python prepare_data.py --dataset merge --inputs data/chexpert data/mimic data/nih data/padchest --out data/all4
    python prepare_data.py --dataset demo --out raw_demo        # synthetic raw folders in the real layouts

Conversion is a one-process job (no torchrun); --workers sets the decoding processes. The
prepared folder is then read by `torchrun pretrain.py` / `transfer.py` on any number of GPUs.

A prepared dataset is a folder:
    images.npy       uint8 array (N, S, S, C), C = 1 (X-rays) or 3 (natural images), memory-mapped
    labels.csv       row i describes images[i]: path, patient, view, split (train/valid/test), then one
                     column per label holding 1, 0 or empty (unknown; masked in the loss)
    meta.json        {"name", "size", "channels", "labels", "task": "multilabel" | "multiclass",
                      "orig_size": [H, W] median original size (BiT-HyperRule), "counts": {...}}
    rejects.csv      files that could not be prepared, with the reason
    label_stats.csv  positive / negative / masked counts per label and split
meta.json is written last: a folder without it is not a dataset. Work in progress lives in
OUT/.work (images, done-mask, rejects) so an interrupted run continues where it stopped.

Images. Every format goes through the same two steps:
 1. Intensity -> uint8 by one linear map of the format's nominal value range onto [0, 255]:
    8-bit PNG/JPEG [0, 255] (unchanged); 16-bit PNG [0, 2^bits - 1] with bits = the dataset's
    BitsStored when known (PadChest) else 16; DICOM: stored values pass the modality LUT
    (RescaleSlope/Intercept) and the range is that of BitsStored (and PixelRepresentation)
    after the same rescale. MONOCHROME1 is inverted (255 - v). DICOM windowing (WindowCenter /
    WidthWidth) is NOT applied: windows are display presets that differ between vendors and
    would clip information; the full stored range is kept, as the PNG/JPEG exports of the
    public datasets do. Colour images become grayscale for X-ray datasets (ITU-R 601 luma,
    Pillow's "L") and RGB for natural ones (alpha dropped, palettes expanded).
 2. Geometry: center crop to a square of the shorter side, then resize to --size with Pillow's
    bilinear filter, whose support widens with the downscale factor (antialiased). JPEGs are
    DCT-downscaled first when they are at least twice the target (Pillow's draft mode).
--size defaults to 512 (BiT-HyperRule resizes to 512 and crops 480 for images larger than
96x96); CIFAR is kept at its native 32 px (HyperRule: 160/128, done on the device).
"""
import ast
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

import models
from models import UserError

META_COLUMNS = ["path", "patient", "view", "split"]
SPLITS = ["train", "valid", "test"]


# ----------------------------------------------------------------------------------------
# The prepared format: writer and reader

def write_meta(out, meta):
    """meta.json marks a folder complete, so it is written under a temporary name and renamed."""
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))


def save_prepared(out, images, table, labels, task, name="", extra_meta=None):
    """Write an in-memory dataset (uint8 images (N, S, S, C) and a table with META_COLUMNS +
    labels) as a prepared folder. Files are written under temporary names and meta.json,
    which marks the folder complete, comes last."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    assert len(images) == len(table) and images.shape[1] == images.shape[2]
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "images.tmp.npy"), images)
    os.replace(os.path.join(out, "images.tmp.npy"), os.path.join(out, "images.npy"))
    write_labels_csv(os.path.join(out, "labels.csv"), table, labels)
    write_meta(out, {"name": name, "size": int(images.shape[1]), "channels": int(images.shape[3]),
                     "labels": list(labels), "task": task, **(extra_meta or {})})


def write_labels_csv(path, table, labels):
    """labels.csv with label cells written as 1, 0 or empty (unknown)."""
    out = table[META_COLUMNS].copy()
    for label in labels:
        out[label] = table[label].astype("Float64").round().astype("Int64")
    out.to_csv(path, index=False)


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no meta.json); "
                                "run prepare_data.py first")
    with open(path) as f:
        return json.load(f)


def read_labels_csv(folder, labels):
    return pd.read_csv(os.path.join(folder, "labels.csv"),
                       dtype={"path": str, "patient": str, "view": str, "split": str},
                       keep_default_na=False, na_values={l: [""] for l in labels})


class PreparedDataset(torch.utils.data.Dataset):
    """Rows of one split (or all rows) of a prepared folder. Indexing returns
    (uint8 tensor (S, S, C), float32 targets (L,) with NaN = unknown); `__getitems__`
    reads a whole batch with one fancy index into the memory map."""

    def __init__(self, folder, split=None, views=None):
        """split: "train" / "valid" / "test", or None for all rows. views: keep only rows whose
        view is one of these (e.g. ["PA", "AP"]), or None for all; a folder is prepared once
        with every view a recipe may need and each recipe picks its own at training time."""
        meta = read_meta(folder)
        self.folder, self.meta = folder, meta
        self.labels = meta["labels"]
        self.multilabel = meta["task"] == "multilabel"
        self.table = read_labels_csv(folder, self.labels)
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        keep = np.ones(len(self.table), bool) if split is None else (self.table["split"] == split).to_numpy()
        if views is not None:
            keep &= self.table["view"].isin(views).to_numpy()
        rows = np.flatnonzero(keep)
        self.rows = rows
        self.targets = self.table[self.labels].to_numpy(np.float32)[rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[self.rows[i]])), torch.from_numpy(self.targets[i])

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        return (torch.from_numpy(self.images[self.rows[indices]]),
                torch.from_numpy(self.targets[indices]))


# ----------------------------------------------------------------------------------------
# Label sets and harmonization rules (those of the paper's code, SLAMPAI/large-scale-pretraining-transfer)

PRETRAIN_VIEWS = ["PA", "AP", "AP Supine", "L", "COSTAL"]
CHEXPERT_LABELS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                   "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
NIH_LABELS = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
              "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
              "Mass", "Hernia"]
PADCHEST_LABELS = NIH_LABELS + ["Fracture", "Granuloma", "Flattened Diaphragm", "Bronchiectasis",
                                "Aortic Elongation", "Scoliosis", "Hilar Enlargement", "Support Devices",
                                "Tuberculosis", "Air Trapping", "Costophrenic Angle Blunting",
                                "Aortic Atheromatosis", "Hemidiaphragm Elevation"]
# A PadChest label is positive when its lower-cased name or a synonym occurs inside one of the
# image's label strings (so "laminar atelectasis" counts as Atelectasis, as in the paper).
PADCHEST_SYNONYMS = {
    "Infiltration": ["infiltrates", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern",
                     "alveolar pattern", "consolidation", "air bronchogram"],
    "Pleural_Thickening": ["pleural thickening"],
    "Consolidation": ["air bronchogram"],
    "Hilar Enlargement": ["adenopathy", "pulmonary artery enlargement"],
    "Support Devices": ["device", "pacemaker"],
}
PAPER_MERGED_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
                       "Pneumonia", "Pneumothorax"]
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


def chexpert_labels(table, uncertain="ignore", blank="ignore"):
    """CheXpert/MIMIC coding -> 13 float columns (NaN = unknown), sorted, Pleural Effusion named
    Effusion. uncertain (-1): ignore (mask) | ones | zeros; blank (not mentioned): ignore | zeros.
    A row with No Finding = 1 has every pathology 0 (the paper's rule, applied last)."""
    missing = [c for c in CHEXPERT_LABELS + ["No Finding"] if c not in table.columns]
    if missing:
        raise UserError(f"label file lacks column {missing[0]!r}")
    out = pd.DataFrame(index=table.index)
    healthy = pd.to_numeric(table["No Finding"], errors="coerce") == 1
    for name in sorted(CHEXPERT_LABELS):
        v = pd.to_numeric(table[name], errors="coerce").astype(np.float64)
        v = v.mask(v == -1, {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain])
        if blank == "zeros":
            v = v.mask(pd.to_numeric(table[name], errors="coerce").isna(), 0.0)
        v[healthy] = 0.0
        out["Effusion" if name == "Pleural Effusion" else name] = v
    return out


def padchest_labels(label_lists):
    """PadChest label strings per image (lists) -> 0/1 columns for the paper's 27 labels."""
    out = {}
    for name in sorted(PADCHEST_LABELS):
        keys = [name.lower()] + PADCHEST_SYNONYMS.get(name, [])
        out[name] = [float(any(k in s for k in keys for s in strings)) for strings in label_lists]
    return pd.DataFrame(out)


def parse_padchest_list(cell):
    """"['pleural effusion', ' unchanged']" -> ['pleural effusion', 'unchanged'] (lower-cased,
    stripped, empties removed); None when the cell holds no label."""
    if not isinstance(cell, str) or not cell.strip():
        return None
    try:
        items = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError):
        return None
    items = [str(s).strip().lower() for s in (items if isinstance(items, (list, tuple)) else [items])]
    items = [s for s in items if s]
    return items or None


def one_hot(names, classes):
    index = {c: i for i, c in enumerate(classes)}
    eye = np.eye(len(classes), dtype=np.float64)
    return pd.DataFrame(eye[[index[n] for n in names]], columns=classes)


def patient_split(patients, fractions, seed):
    """Seeded split of rows by patient: every patient goes to exactly one split. `fractions`
    maps split name -> fraction of patients; the rest goes to "train"."""
    unique = np.array(sorted(set(patients)))
    order = np.random.default_rng(seed).permutation(len(unique))
    assigned = np.full(len(unique), "train", dtype=object)
    start = 0
    for name, fraction in fractions.items():
        n = int(round(fraction * len(unique)))
        assigned[order[start:start + n]] = name
        start += n
    lookup = dict(zip(unique, assigned))
    return np.array([lookup[p] for p in patients], dtype=object)


def is_inside(path, root):
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def require_columns(table, columns, source):
    for c in columns:
        if c not in table.columns:
            raise UserError(f"{source} has no column {c!r}")


def require_file(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    return path


# ----------------------------------------------------------------------------------------
# Parsers: raw layout -> table with path (as written in the dataset), file (where to read it),
# patient, view, split, optional bits, and label columns. Each returns (table, labels, task,
# channels, base, dropped), `base` being the folder that file paths must stay inside.

def parse_chexpert(args):
    """CheXpert v1.0 or v1.0-small: --root is the dataset folder (holding train.csv) or the folder
    holding it. Paths in the CSVs start with the dataset folder's name."""
    root = args.root
    if not os.path.exists(os.path.join(root, "train.csv")):
        found = [d for d in ("CheXpert-v1.0-small", "CheXpert-v1.0") if os.path.exists(os.path.join(root, d, "train.csv"))]
        if not found:
            raise FileNotFoundError(f"no train.csv in {root} or {root}/CheXpert-v1.0[-small]")
        root = os.path.join(root, found[0])
    base = os.path.dirname(os.path.abspath(root))
    parts = []
    for split, name in (("train", "train.csv"), ("valid", "valid.csv")):
        t = pd.read_csv(require_file(os.path.join(root, name)), dtype={"Path": str, "AP/PA": str})
        require_columns(t, ["Path", "Frontal/Lateral", "AP/PA"], name)
        t["split"] = split
        parts.append(t)
    t = pd.concat(parts, ignore_index=True)
    view = t["AP/PA"].where(t["Frontal/Lateral"] == "Frontal", "L")
    labels = chexpert_labels(t, args.uncertain, args.blank)
    table = pd.DataFrame({"path": t["Path"], "file": [os.path.join(base, p) for p in t["Path"]],
                          "patient": t["Path"].str.extract(r"(patient\d+)", expand=False).fillna(t["Path"]),
                          "view": view.fillna(""), "split": t["split"]})
    table = pd.concat([table, labels], axis=1)
    return table, list(labels.columns), "multilabel", 1, base, {}


def parse_mimic(args, ext):
    """MIMIC-CXR-JPG 2.0.0 (ext "jpg") or MIMIC-CXR DICOM files (ext "dcm") with the JPG release's
    chexpert, metadata and split tables in --root."""
    read = lambda name: pd.read_csv(require_file(os.path.join(args.root, name)))
    labels_t = read("mimic-cxr-2.0.0-chexpert.csv.gz")
    meta_t = read("mimic-cxr-2.0.0-metadata.csv.gz")
    split_t = read("mimic-cxr-2.0.0-split.csv.gz")
    require_columns(labels_t, ["subject_id", "study_id"], "mimic-cxr-2.0.0-chexpert.csv.gz")
    require_columns(meta_t, ["dicom_id", "subject_id", "study_id", "ViewPosition"], "mimic-cxr-2.0.0-metadata.csv.gz")
    require_columns(split_t, ["dicom_id", "split"], "mimic-cxr-2.0.0-split.csv.gz")
    # One row per image of a labelled study (the paper joins labels onto the metadata).
    t = meta_t.merge(labels_t, on=["subject_id", "study_id"], how="inner")
    t = t.merge(split_t[["dicom_id", "split"]], on="dicom_id", how="left")
    sid, study = t["subject_id"].astype(str), t["study_id"].astype(str)
    paths = "files/p" + sid.str[:2] + "/p" + sid + "/s" + study + "/" + t["dicom_id"].astype(str) + "." + ext
    labels = chexpert_labels(t, args.uncertain, args.blank)
    table = pd.DataFrame({"path": paths, "file": [os.path.join(args.root, p) for p in paths],
                          "patient": sid, "view": t["ViewPosition"].fillna(""),
                          "split": t["split"].replace({"validate": "valid"}).fillna("")})
    dropped = {"no official split": int((table["split"] == "").sum())}
    keep = table["split"] != ""
    table = pd.concat([table, labels], axis=1)[keep].reset_index(drop=True)
    return table, list(labels.columns), "multilabel", 1, args.root, dropped


def nih_image_index(root):
    """Image name -> file: images/ (flat), or images_001/images/ ... as in the Box/Kaggle download."""
    folders = [os.path.join(root, "images")] if os.path.isdir(os.path.join(root, "images")) else \
        sorted(glob.glob(os.path.join(root, "images_*", "images")))
    return folders


def parse_nih(args):
    """NIH ChestX-ray14: Data_Entry_2017_v2020.csv, official train_val_list.txt / test_list.txt;
    valid = a seeded patient-level split of train_val."""
    csv = os.path.join(args.root, "Data_Entry_2017_v2020.csv")
    if not os.path.exists(csv):
        csv = require_file(os.path.join(args.root, "Data_Entry_2017.csv"))
    # The header names 9 columns but rows have 11 (two bracketed pairs); pandas splits the
    # header the same way, so names line up and only the first 7 columns are used.
    t = pd.read_csv(csv, dtype={"Image Index": str, "Patient ID": str, "Finding Labels": str})
    require_columns(t, ["Image Index", "Finding Labels", "Patient ID", "View Position"], os.path.basename(csv))
    read_list = lambda name: set(open(require_file(os.path.join(args.root, name))).read().split())
    train_val, test = read_list("train_val_list.txt"), read_list("test_list.txt")
    official = np.array(["test" if n in test else "train" if n in train_val else "" for n in t["Image Index"]],
                        dtype=object)
    dropped = {"not in the official split lists": int((official == "").sum())}
    t, official = t[official != ""].reset_index(drop=True), official[official != ""]
    patients = t["Patient ID"].str.lstrip("0").replace("", "0")
    split = official.copy()
    tv = official == "train"
    split[tv] = patient_split(patients[tv].to_numpy(), {"valid": args.valid_fraction}, args.seed)
    tokens = [set(s.split("|")) for s in t["Finding Labels"].fillna("")]
    labels = pd.DataFrame({name: [float(name in tok) for tok in tokens] for name in sorted(NIH_LABELS)})
    folders = nih_image_index(args.root) or [os.path.join(args.root, "images")]
    if len(folders) == 1:
        files = [os.path.join(folders[0], n) for n in t["Image Index"]]
    else:
        where = {n: f for f in folders for n in os.listdir(f)}
        files = [os.path.join(where.get(n, folders[0]), n) for n in t["Image Index"]]
    table = pd.DataFrame({"path": "images/" + t["Image Index"], "file": files, "patient": patients,
                          "view": t["View Position"].fillna(""), "split": split})
    return pd.concat([table, labels], axis=1), list(labels.columns), "multilabel", 1, args.root, dropped


def parse_padchest(args):
    """PadChest: the labels CSV and 16-bit PNGs in folders ImageDir (0..54). No official split:
    seeded patient-level train/valid/test."""
    t = pd.read_csv(require_file(os.path.join(args.root, PADCHEST_CSV)), low_memory=False,
                    dtype={"ImageID": str, "PatientID": str, "ImageDir": str, "Projection": str})
    require_columns(t, ["ImageID", "ImageDir", "PatientID", "Projection", "Labels", "BitsStored_DICOM"], PADCHEST_CSV)
    lists = [parse_padchest_list(c) for c in t["Labels"]]
    has = np.array([l is not None for l in lists])
    dropped = {"no labels": int((~has).sum())}
    t = t[has].reset_index(drop=True)
    lists = [l for l in lists if l is not None]
    labels = padchest_labels(lists)
    bits = pd.to_numeric(t["BitsStored_DICOM"], errors="coerce").fillna(16).astype(int)
    paths = t["ImageDir"].astype(str).str.replace(r"\.0$", "", regex=True) + "/" + t["ImageID"]
    test_fraction = 0.1 if args.test_fraction is None else args.test_fraction  # paper: 90/10
    split = patient_split(t["PatientID"].to_numpy(), {"test": test_fraction, "valid": args.valid_fraction}, args.seed)
    table = pd.DataFrame({"path": paths, "file": [os.path.join(args.root, p) for p in paths],
                          "patient": t["PatientID"], "view": t["Projection"].replace({"AP_horizontal": "AP Supine"}).fillna(""),
                          "split": split, "bits": bits})
    return pd.concat([table, labels], axis=1), list(labels.columns), "multilabel", 1, args.root, dropped


COVIDX_CLASSES = {"positive", "negative", "normal", "pneumonia", "covid-19"}


def parse_covidx_line(line):
    """COVIDx list line -> (patient, filename, label). Lines are `patient file label source`, or
    `patient file label` in old lists; the patient id may itself contain spaces
    ("COVID 1 COVID(1).png positive sirm"), so fields are taken from the right."""
    tokens = line.split()
    k = len(tokens) - 1 if tokens[-1].lower() in COVIDX_CLASSES else len(tokens) - 2
    if k < 2:
        raise UserError(f"cannot parse COVIDx line {line.strip()!r}")
    return " ".join(tokens[:k - 1]), tokens[k - 1], tokens[k]


def parse_covidx(args):
    """COVIDx CXR-2: train.txt / test.txt with images in train/ and test/; valid = a seeded
    patient-level split of train."""
    rows = []
    for split in ("train", "test"):
        with open(require_file(os.path.join(args.root, f"{split}.txt"))) as f:
            for line in f:
                if line.strip():
                    patient, name, label = parse_covidx_line(line)
                    rows.append((f"{split}/{name}", patient, label, split))
    t = pd.DataFrame(rows, columns=["path", "patient", "label", "split"])
    train = (t["split"] == "train").to_numpy()
    split = t["split"].to_numpy().copy()
    split[train] = patient_split(t["patient"][train].to_numpy(), {"valid": args.valid_fraction}, args.seed)
    classes = sorted(t["label"].unique())
    table = pd.DataFrame({"path": t["path"], "file": [os.path.join(args.root, p) for p in t["path"]],
                          "patient": t["patient"], "view": "", "split": split})
    return pd.concat([table, one_hot(t["label"], classes)], axis=1), classes, "multiclass", 1, args.root, {}


def parse_tuberculosis(args):
    """Shenzhen (CHNCXR_0001_0.png) and Montgomery (MCUCXR_0001_1.png) anywhere under --root;
    the last digit is the label. Seeded patient-level train/valid/test (paper: 85/15)."""
    files = sorted(f for f in glob.glob(os.path.join(args.root, "**", "*.png"), recursive=True)
                   if os.path.basename(f)[:7] in ("CHNCXR_", "MCUCXR_") and f[-6:-5] == "_" and f[-5] in "01")
    if not files:
        raise UserError(f"no CHNCXR_*_[01].png or MCUCXR_*_[01].png under {args.root}")
    names = [os.path.basename(f) for f in files]
    patients = [n[:-6] for n in names]
    test_fraction = 0.15 if args.test_fraction is None else args.test_fraction
    split = patient_split(patients, {"test": test_fraction, "valid": args.valid_fraction}, args.seed)
    classes = ["normal", "tuberculosis"]
    table = pd.DataFrame({"path": [os.path.relpath(f, args.root) for f in files], "file": files,
                          "patient": patients, "view": "PA", "split": split})
    labels = one_hot([classes[int(n[-5])] for n in names], classes)
    return pd.concat([table, labels], axis=1), classes, "multiclass", 1, args.root, {}


def parse_imagefolder(args):
    """root/CLASS/*.ext, or root/{train,valid|val,test}/CLASS/*.ext with those splits kept;
    without split folders, a seeded split (every image its own "patient")."""
    split_dirs = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
    tops = [d for d in sorted(os.listdir(require_file(args.root))) if os.path.isdir(os.path.join(args.root, d))]
    has_splits = bool(tops) and all(d in split_dirs for d in tops)
    rows = []
    for top in (tops if has_splits else [""]):
        folder = os.path.join(args.root, top)
        for cls in sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))):
            for name in sorted(os.listdir(os.path.join(folder, cls))):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rows.append((os.path.join(top, cls, name), cls, split_dirs.get(top, "")))
    if not rows:
        raise UserError(f"no images in class folders under {args.root}")
    t = pd.DataFrame(rows, columns=["path", "label", "split"])
    if not has_splits:
        t["split"] = patient_split(t["path"].to_numpy(), {"test": 0.15 if args.test_fraction is None
                                                          else args.test_fraction, "valid": args.valid_fraction}, args.seed)
    classes = sorted(t["label"].unique())
    table = pd.DataFrame({"path": t["path"], "file": [os.path.join(args.root, p) for p in t["path"]],
                          "patient": t["path"], "view": "", "split": t["split"]})
    return pd.concat([table, one_hot(t["label"], classes)], axis=1), classes, "multiclass", args.channels or 3, args.root, {}


def parse_csv(args):
    """The user's own data: --labels-csv with a `path` column (relative to --root) and label
    columns, optional patient/view/split. One label column with class names -> multiclass;
    otherwise multilabel with 1 / 0 / empty (unknown) / -1 (uncertain, see --uncertain)."""
    if not args.labels_csv:
        raise UserError("--dataset csv needs --labels-csv")
    t = pd.read_csv(require_file(args.labels_csv), dtype=str, keep_default_na=False)
    require_columns(t, ["path"], args.labels_csv)
    label_cols = [c for c in t.columns if c not in META_COLUMNS]
    if not label_cols:
        raise UserError(f"{args.labels_csv} has no label column (columns other than {', '.join(META_COLUMNS)})")
    binary = all(set(t[c].str.strip()) <= {"", "0", "1", "-1", "0.0", "1.0", "-1.0"} for c in label_cols)
    if binary:
        labels = pd.DataFrame({c: pd.to_numeric(t[c].str.strip(), errors="coerce") for c in label_cols})
        labels = labels.mask(labels == -1, {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[args.uncertain])
        names, task = label_cols, "multilabel"
    elif len(label_cols) == 1:
        names, task = sorted(t[label_cols[0]].unique()), "multiclass"
        labels = one_hot(t[label_cols[0]], names)
    else:
        raise UserError(f"{args.labels_csv}: label columns must hold 1/0/empty, or be one column of class names")
    patient = t["patient"] if "patient" in t else t["path"]
    split = t["split"].replace({"val": "valid", "validate": "valid"}) if "split" in t else pd.Series([""] * len(t))
    bad = set(split) - set(SPLITS) - {""}
    if bad:
        raise UserError(f"{args.labels_csv}: unknown split {sorted(bad)[0]!r} (use train, valid, test)")
    split = split.to_numpy().copy()
    todo = split == ""
    if todo.any():
        split[todo] = patient_split(patient[todo].to_numpy(), {"test": 0.15 if args.test_fraction is None else
                                                               args.test_fraction, "valid": args.valid_fraction}, args.seed)
    table = pd.DataFrame({"path": t["path"], "file": [os.path.join(args.root, p) for p in t["path"]],
                          "patient": patient, "view": t["view"] if "view" in t else "", "split": split})
    return pd.concat([table, labels], axis=1), names, task, args.channels or 1, args.root, {}


TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "flowers102": "Flowers102", "pets": "OxfordIIITPet"}


def torchvision_dataset(args, split):
    import torchvision.datasets as tvd
    cls = getattr(tvd, TORCHVISION[args.dataset])
    try:
        if args.dataset.startswith("cifar"):
            return cls(args.root, train=split == "train", download=args.download)
        return cls(args.root, split=split, download=args.download)
    except RuntimeError as e:
        raise UserError(f"{args.dataset} not found under {args.root} ({e}); pass --download to fetch it")


def parse_natural(args):
    """Flowers-102 (official train/val/test) and Oxford-IIIT Pets (trainval/test, valid = seeded
    split of trainval) from torchvision's download folders."""
    splits = {"flowers102": [("train", "train"), ("val", "valid"), ("test", "test")],
              "pets": [("trainval", "train"), ("test", "test")]}[args.dataset]
    rows, classes = [], None
    for tv_split, split in splits:
        ds = torchvision_dataset(args, tv_split)
        files = ds._image_files if args.dataset == "flowers102" else ds._images
        classes = getattr(ds, "classes", None) or [str(i + 1) for i in range(102)]
        rows += [(str(f), classes[y], split) for f, y in zip(files, ds._labels)]
    t = pd.DataFrame(rows, columns=["file", "label", "split"])
    if args.dataset == "pets":
        train = (t["split"] == "train").to_numpy()
        split = t["split"].to_numpy().copy()
        split[train] = patient_split(t["file"][train].to_numpy(), {"valid": args.valid_fraction}, args.seed)
        t["split"] = split
    paths = [os.path.relpath(f, args.root) for f in t["file"]]
    table = pd.DataFrame({"path": paths, "file": t["file"], "patient": paths, "view": "", "split": t["split"]})
    return pd.concat([table, one_hot(t["label"], classes)], axis=1), classes, "multiclass", 3, args.root, {}


def prepare_cifar(args):
    """CIFAR-10/100 live in pickled arrays: converted in memory (no files, no resume needed)."""
    parts = [torchvision_dataset(args, s) for s in ("train", "test")]
    images = np.concatenate([p.data for p in parts])
    size = args.size or 32
    if size != 32:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
    targets = np.concatenate([p.targets for p in parts])
    split = np.array(["train"] * len(parts[0].data) + ["test"] * len(parts[1].data), dtype=object)
    n_train = len(parts[0].data)
    split[:n_train] = patient_split(np.arange(n_train).astype(str), {"valid": args.valid_fraction}, args.seed)
    classes = parts[0].classes
    paths = [f"{s}/{i}" for s, i in zip(["train"] * n_train + ["test"] * len(parts[1].data),
                                        list(range(n_train)) + list(range(len(parts[1].data))))]
    table = pd.concat([pd.DataFrame({"path": paths, "patient": paths, "view": "", "split": split}),
                       one_hot([classes[y] for y in targets], classes)], axis=1)
    report(table, classes, args.out)
    save_prepared(args.out, images, table, classes, "multiclass", args.dataset,
                  {"orig_size": [32, 32], "counts": counts(table)})
    return table


# ----------------------------------------------------------------------------------------
# Image decoding: one file -> uint8 (size, size, channels)

# Compressed DICOM transfer syntaxes Pillow cannot decode, and the plugin that can.
DICOM_PLUGINS = {
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
}


def to_uint8(values, lo, hi):
    """The one intensity map: [lo, hi] -> [0, 255] linearly, rounded, clipped."""
    scaled = (np.asarray(values, np.float32) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def is_dicom(path):
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def decode_dicom(path, channels):
    """DICOM -> (uint8 (H, W) or (H, W, 3), (H, W)): modality LUT, BitsStored range, MONOCHROME1
    inverted, windowing not applied (see the module docstring)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise ValueError(f"not a DICOM file ({e})")
    if "PixelData" not in ds:
        raise ValueError("DICOM file without pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        plugin = DICOM_PLUGINS.get(str(syntax), "pylibjpeg-libjpeg or python-gdcm")
        if "Pillow does not support" in str(e) or str(syntax) in DICOM_PLUGINS or "missing dependencies" in str(e):
            raise ValueError(f"DICOM compression {getattr(syntax, 'name', syntax)} ({syntax}) needs a decoder "
                             f"plugin: pip install pylibjpeg {plugin}")
        raise ValueError(f"DICOM pixel data unreadable ({str(e).splitlines()[0]})")
    color = int(ds.get("SamplesPerPixel", 1)) == 3
    if pixels.ndim == (4 if color else 3):      # multi-frame: the first frame
        pixels = pixels[0]
    if color:
        img = Image.fromarray(to_uint8(pixels, 0, 255)).convert("L" if channels == 1 else "RGB")
        return np.asarray(img), pixels.shape[:2]
    bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    out = to_uint8(pixels.astype(np.float32) * slope + intercept, lo, hi)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        out = 255 - out
    return out, pixels.shape


def decode_pillow(path, channels, size, bits=None):
    """PNG/JPEG/... -> (uint8 (H', W') or (H', W', 3), original (H, W)). 16-bit grayscale maps
    [0, 2^bits - 1] to [0, 255] (bits = 16 unless the dataset says otherwise)."""
    with Image.open(path) as img:
        orig = (img.height, img.width)
        if img.format == "JPEG" and size:
            img.draft("L" if channels == 1 else "RGB", (size, size))
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            v = np.asarray(img)
            out = to_uint8(v, 0, 2 ** (bits or 16) - 1)
            return (out if channels == 1 else np.repeat(out[..., None], 3, 2)), orig
        if img.mode == "F":
            raise ValueError("floating-point images are not supported")
        return np.asarray(img.convert("L" if channels == 1 else "RGB")), orig


def load_image(path, size, channels, bits=None):
    """One file -> (uint8 (size, size, channels), original (H, W)). Raises on unreadable input."""
    if is_dicom(path):
        pixels, orig = decode_dicom(path, channels)
    else:
        pixels, orig = decode_pillow(path, channels, size, bits)
    h, w = pixels.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=(left, top, left + s, top + s))
    out = np.asarray(img)
    return (out[..., None] if out.ndim == 2 else out), (int(orig[0]), int(orig[1]))


def reject_reason(e):
    if isinstance(e, FileNotFoundError):
        return "missing file"
    if isinstance(e, UnidentifiedImageError):
        return "not an image"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"truncated image ({text})"
    return text


# ----------------------------------------------------------------------------------------
# Parallel, resumable conversion into OUT/.work, then compaction into the prepared folder

_worker = {}


def _init_worker(images_path, size, channels):
    _worker.update(images=np.load(images_path, mmap_mode="r+"), size=size, channels=channels)


def _convert(task):
    """Worker: decode one file straight into the shared memory map; return (index, orig, reason)."""
    i, file, bits = task
    try:
        pixels, orig = load_image(file, _worker["size"], _worker["channels"], bits)
    except Exception as e:  # every failure of one file is a reject, never a crash of the run
        return i, None, reject_reason(e)
    _worker["images"][i] = pixels
    return i, orig, None


class WorkState:
    """OUT/.work: images.npy (all rows, memory-mapped), state.npz (done-mask, original sizes) and
    rejects.json. A row counts as converted only once the done-mask saying so is on disk."""

    def __init__(self, out, files, size, channels):
        self.dir = os.path.join(out, ".work")
        self.images_path = os.path.join(self.dir, "images.npy")
        n = len(files)
        plan = {"n": n, "size": size, "channels": channels,
                "files": hashlib.sha1("\n".join(files).encode()).hexdigest()}
        old = None
        if os.path.exists(os.path.join(self.dir, "plan.json")):
            with open(os.path.join(self.dir, "plan.json")) as f:
                old = json.load(f)
        if old == plan and os.path.exists(os.path.join(self.dir, "state.npz")):
            state = np.load(os.path.join(self.dir, "state.npz"))
            self.done, self.orig = state["done"].copy(), state["orig"].copy()
            with open(os.path.join(self.dir, "rejects.json")) as f:
                self.rejects = {int(k): v for k, v in json.load(f).items()}
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
            np.lib.format.open_memmap(self.images_path, "w+", np.uint8, (n, size, size, channels)).flush()
            self.done, self.orig, self.rejects = np.zeros(n, bool), np.zeros((n, 2), np.int32), {}
            self.save()
            with open(os.path.join(self.dir, "plan.json"), "w") as f:
                json.dump(plan, f)

    def save(self):
        with open(os.path.join(self.dir, "rejects.json.tmp"), "w") as f:
            json.dump(self.rejects, f)
        os.replace(os.path.join(self.dir, "rejects.json.tmp"), os.path.join(self.dir, "rejects.json"))
        with open(os.path.join(self.dir, "state.tmp.npz"), "wb") as f:
            np.savez(f, done=self.done, orig=self.orig)
        os.replace(os.path.join(self.dir, "state.tmp.npz"), os.path.join(self.dir, "state.npz"))


def convert_all(table, out, size, channels, workers, refused=None, stop_after=None):
    """Convert every row of `table` (columns file, optional bits) not yet done; resumable.
    `refused` ({row: reason}) are rejected without being read. `stop_after` (tests) stops after
    that many new images, as an interruption would."""
    from tqdm import tqdm
    files = table["file"].tolist()
    bits = table["bits"].tolist() if "bits" in table else [None] * len(files)
    state = WorkState(out, files, size, channels)
    for i, reason in (refused or {}).items():
        state.rejects[i], state.done[i] = reason, True
    todo = [(int(i), files[i], None if bits[i] is None else int(bits[i])) for i in np.flatnonzero(~state.done)]
    if state.done.any():
        print(f"resume: {int(state.done.sum())} of {len(files)} images already converted", flush=True)
    n_total, t0, last_save, new = len(files), time.time(), time.time(), 0
    log_every = max(1, n_total // 10)
    bar = tqdm(total=n_total, initial=int(state.done.sum()), unit="img", disable=not sys.stderr.isatty())
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, _init_worker, (state.images_path, size, channels))
        results = pool.imap_unordered(_convert, todo, chunksize=4)
    else:
        pool = None
        _init_worker(state.images_path, size, channels)
        results = map(_convert, todo)
    try:
        for i, orig, reason in results:
            if reason is None:
                state.orig[i] = orig
            else:
                state.rejects[i] = reason
            state.done[i] = True
            new += 1
            bar.update(1)
            done = int(state.done.sum())
            if done % log_every == 0 or done == n_total:
                print(f"convert: {done}/{n_total} images  rejects {len(state.rejects)}  "
                      f"{new / max(time.time() - t0, 1e-9):.1f} img/s", flush=True)
            if time.time() - last_save > 5:
                if pool is None:
                    _worker["images"].flush()
                state.save()
                last_save = time.time()
            if stop_after is not None and new >= stop_after:
                break
    finally:
        # Also on Ctrl-C: workers wrote into the shared file mapping, so marking what came
        # back as done is safe; anything in flight is redone on the next run.
        if pool is not None:
            pool.terminate()
            pool.join()
        else:
            _worker["images"].flush()
        _worker.clear()
        state.save()
        bar.close()
    return state


def compact(state, keep, out):
    """Copy the kept rows of the work array into OUT/images.npy (temp name, then rename)."""
    if keep.all():
        os.replace(state.images_path, os.path.join(out, "images.npy"))
        return
    src = np.load(state.images_path, mmap_mode="r")
    rows = np.flatnonzero(keep)
    tmp = os.path.join(out, "images.tmp.npy")
    dst = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(rows),) + src.shape[1:])
    for start in range(0, len(rows), 512):
        dst[start:start + 512] = src[rows[start:start + 512]]
    dst.flush()
    del dst
    os.replace(tmp, os.path.join(out, "images.npy"))


# ----------------------------------------------------------------------------------------
# Statistics

def counts(table):
    return {"split": {k: int(v) for k, v in table["split"].value_counts().sort_index().items()},
            "view": {(k or "(none)"): int(v) for k, v in table["view"].value_counts().sort_index().items()}}


def label_stats(table, labels):
    rows = []
    for label in labels:
        v = pd.to_numeric(table[label], errors="coerce")
        for split in [s for s in SPLITS if (table["split"] == s).any()] + ["all"]:
            x = v if split == "all" else v[table["split"] == split]
            rows.append({"label": label, "split": split, "positive": int((x == 1).sum()),
                         "negative": int((x == 0).sum()), "masked": int(x.isna().sum())})
    return pd.DataFrame(rows)


def report(table, labels, out):
    """Print images per split and view and per-label counts; write label_stats.csv."""
    c = counts(table)
    print("images: " + "  ".join(f"{k} {v}" for k, v in c["split"].items()) + f"  total {len(table)}", flush=True)
    print("views: " + "  ".join(f"{k} {v}" for k, v in c["view"].items()), flush=True)
    stats = label_stats(table, labels)
    stats.to_csv(os.path.join(out, "label_stats.csv"), index=False)
    for r in stats.itertuples():
        print(f"label {r.label!r} split {r.split}: positive {r.positive} negative {r.negative} "
              f"masked {r.masked}", flush=True)
    return stats


# ----------------------------------------------------------------------------------------
# Merge: several prepared folders -> one

def merge(inputs, out, label_mode="intersection"):
    """Concatenate prepared multilabel folders (same size and channels). Labels: the sorted
    intersection, or the union with unknown (empty) where a source lacks a label. Paths and
    patient ids get the source's name as prefix so they stay unique."""
    metas = [read_meta(d) for d in inputs]
    if len({(m["size"], m["channels"]) for m in metas}) > 1:
        raise UserError("merge: inputs differ in size or channels: " + ", ".join(
            f"{d} {m['size']}px x{m['channels']}" for d, m in zip(inputs, metas)))
    if any(m["task"] != "multilabel" for m in metas):
        raise UserError("merge: only multilabel datasets can be merged")
    sets = [set(m["labels"]) for m in metas]
    labels = sorted(set.intersection(*sets) if label_mode == "intersection" else set.union(*sets))
    if not labels:
        raise UserError("merge: the inputs share no label; use --labels union")
    tables = []
    for d, m in zip(inputs, metas):
        t = read_labels_csv(d, m["labels"])
        name = m["name"] or os.path.basename(os.path.normpath(d))
        t["path"], t["patient"] = name + "/" + t["path"], name + "/" + t["patient"]
        for label in labels:
            t[label] = t[label] if label in t else np.nan
        tables.append(t[META_COLUMNS + labels])
    table = pd.concat(tables, ignore_index=True)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "images.tmp.npy")
    size, ch = metas[0]["size"], metas[0]["channels"]
    dst = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(table), size, size, ch))
    start = 0
    for d in inputs:
        src = np.load(os.path.join(d, "images.npy"), mmap_mode="r")
        for i in range(0, len(src), 512):
            dst[start + i:start + i + len(src[i:i + 512])] = src[i:i + 512]
        start += len(src)
    dst.flush()
    del dst
    os.replace(tmp, os.path.join(out, "images.npy"))
    write_labels_csv(os.path.join(out, "labels.csv"), table, labels)
    # Per-row original sizes are not kept; the median over images is approximated by the
    # median of the sources' medians weighted by their image counts.
    orig = np.repeat(np.array([m.get("orig_size", [size, size]) for m in metas]),
                     [len(t) for t in tables], axis=0)
    report(table, labels, out)
    write_meta(out, {"name": "+".join(m["name"] for m in metas), "size": size, "channels": ch,
                     "labels": labels, "task": "multilabel",
                     "orig_size": [int(v) for v in np.median(orig, axis=0)], "counts": counts(table),
                     "sources": [os.path.abspath(d) for d in inputs]})
    return table


# ----------------------------------------------------------------------------------------
# Synthetic raw data in the real on-disk layouts (demo runs and test fixtures)

DEMO_NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia",
                     "Pneumothorax", "Nodule", "Mass", "Infiltration", "Emphysema", "Pleural_Thickening"]
DEMO_CHEXPERT_FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia",
                          "Pneumothorax", "Support Devices", "Lung Lesion", "Pleural Other"]


def synthetic_chest(rng, findings, size=112, lateral=False):
    """A chest-like grayscale uint8 image: two dark lung fields (one on a lateral view), bright
    mediastinum and heart, smooth lung texture, noise, random brightness/contrast/shift; each
    finding drawn as its own pattern. "Tuberculosis" = upper-zone fuzzy patches, i.e. a
    variant of the Pneumonia pattern, so features learned on sources transfer."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    dx, dy = rng.uniform(-0.04, 0.04, 2)
    x, y = xx - dx, yy - dy
    ell = lambda cx, cy, rx, ry: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    blob = lambda cx, cy, r: np.exp(-ell(cx, cy, r, r))
    lungs = [(0.5, 0.5, 0.27, 0.33)] if lateral else [(0.3, 0.5, 0.15, 0.32), (0.7, 0.5, 0.15, 0.32)]
    img = 0.6 - 0.15 * ((x - 0.5) / 0.5) ** 2                     # soft tissue, darker at the sides
    texture = np.asarray(Image.fromarray(rng.normal(0, 1, (16, 16)).astype(np.float32), "F")
                         .resize((size, size), Image.BILINEAR))
    in_lung = np.zeros((size, size), bool)
    for cx, cy, rx, ry in lungs:
        in_lung |= ell(cx, cy, rx, ry) < 1
    lung_level = 0.08 if "Emphysema" in findings else 0.2
    img = np.where(in_lung, lung_level + 0.04 * texture, img)
    heart_r = (0.2, 0.16) if "Cardiomegaly" in findings else (0.12, 0.11)
    if not lateral:
        img = np.where((np.abs(x - 0.5) < 0.05) & (y > 0.08) & (y < 0.75), 0.75, img)   # mediastinum
    img = np.where(ell(0.4 if lateral else 0.55, 0.64, *heart_r) < 1, 0.72, img)
    pick = lambda: lungs[rng.integers(len(lungs))]
    for f in findings:
        cx, cy, rx, ry = pick()
        side = 1 if cx >= 0.5 else -1
        inside = ell(cx, cy, rx, ry) < 1
        if f == "Effusion":           # bright meniscus at a lung base, rising laterally
            img = np.where(inside & (y > cy + 0.55 * ry - 0.8 * ry * np.clip((x - cx) * side / rx, 0, 1) ** 2), 0.7, img)
        elif f == "Pneumothorax":     # dark rim without texture, with a visible pleural line
            r = ell(cx, cy - 0.05, rx * 0.7, ry * 0.8)
            img = np.where(inside & (r >= 1) & (y < cy + 0.1), 0.02, img)
            img = np.where(inside & (np.abs(r - 1) < 0.08) & (y < cy + 0.1), 0.45, img)
        elif f == "Consolidation":    # one large dense homogeneous blob
            img = img + 0.5 * inside * (blob(cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(0, 0.15), 0.08) > 0.5)
        elif f == "Pneumonia":        # several fuzzy patches in the lower zones
            for _ in range(4):
                img = img + 0.3 * inside * blob(cx + rng.uniform(-0.08, 0.08), cy + rng.uniform(0.0, 0.22), 0.04)
        elif f == "Edema":            # bilateral perihilar streaks
            for lcx, lcy, lrx, lry in lungs:
                lin = ell(lcx, lcy, lrx, lry) < 1
                for k in range(4):
                    img = img + 0.25 * lin * (np.abs(y - (lcy - 0.1 + 0.07 * k) - 0.3 * (x - lcx)) < 0.012)
        elif f == "Atelectasis":      # bright horizontal band
            img = img + 0.4 * inside * (np.abs(y - cy - rng.uniform(0.05, 0.15)) < 0.02)
        elif f == "Nodule" or f == "Lung Lesion":
            for _ in range(3):
                img = img + 0.45 * inside * (ell(cx + rng.uniform(-0.07, 0.07), cy + rng.uniform(-0.2, 0.2), 0.02, 0.02) < 1)
        elif f == "Mass":
            img = img + 0.5 * inside * (ell(cx, cy + rng.uniform(-0.1, 0.1), 0.07, 0.07) < 1)
        elif f == "Infiltration":     # diffuse haze over a lung
            img = img + 0.15 * inside * (1 + texture) / 2
        elif f in ("Pleural_Thickening", "Pleural Other"):   # bright rim along the lung edge
            r = ell(cx, cy, rx, ry)
            img = img + 0.35 * ((r > 0.55) & (r < 1.0) & ((x - cx) * side > 0))
        elif f == "Support Devices":  # a tube and a pacemaker box
            img = np.where((np.abs(x - 0.47) < 0.008) & (y > 0.02) & (y < 0.55), 0.95, img)
            img = np.where((np.abs(x - 0.22) < 0.04) & (np.abs(y - 0.12) < 0.03), 0.95, img)
        elif f == "Tuberculosis":     # fuzzy patches in the upper zones: the Pneumonia pattern of
            # the sources, moved up, so features learned there transfer
            for _ in range(4):
                img = img + 0.3 * inside * blob(cx + rng.uniform(-0.08, 0.08), cy - rng.uniform(0.0, 0.22), 0.045)
    img = (img - 0.45) * rng.uniform(0.8, 1.2) + 0.45 + rng.uniform(-0.08, 0.08)
    img = img + rng.normal(0, 0.03, img.shape)
    return to_uint8(img, 0.0, 1.0)


def demo_findings(rng, names, p):
    return [n for n in names if rng.random() < p]


def write_nih_raw(root, n=2400, seed=0, image_size=112, p=0.1):
    """An NIH-ChestX-ray14-style folder: images/*.png, Data_Entry_2017_v2020.csv with the real
    11-field rows, train_val_list.txt and test_list.txt (split by patient)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows, names_by_patient, patient = [], {}, 0
    while len(rows) < n:
        patient += 1
        for follow_up in range(min(int(rng.integers(1, 5)), n - len(rows))):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = demo_findings(rng, DEMO_NIH_FINDINGS, p)
            view = "PA" if rng.random() < 0.6 else "AP"
            Image.fromarray(synthetic_chest(rng, findings, image_size)).save(os.path.join(root, "images", name))
            rows.append(f"{name},{'|'.join(findings) or 'No Finding'},{follow_up},{patient},{int(rng.integers(20, 90))},"
                        f"{'MF'[int(rng.integers(2))]},{view},2500,2048,0.168,0.168")
            names_by_patient.setdefault(patient, []).append(name)
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n" + "\n".join(rows) + "\n")
    test_patients = set(rng.permutation(sorted(names_by_patient))[:max(1, len(names_by_patient) // 5)].tolist())
    for fname, pick in (("test_list.txt", True), ("train_val_list.txt", False)):
        with open(os.path.join(root, fname), "w") as f:
            f.write("".join(f"{n}\n" for p_, ns in names_by_patient.items() if (p_ in test_patients) == pick for n in ns))
    return root


def chexpert_cell(rng, present, valid):
    """Real CheXpert coding: present -> 1.0 (sometimes -1.0 uncertain); absent -> mostly blank
    (not mentioned), else 0.0, rarely -1.0. The validation set has only 1.0 / 0.0."""
    if valid:
        return "1.0" if present else "0.0"
    r = rng.random()
    if present:
        return "1.0" if r < 0.85 else "-1.0"
    return "" if r < 0.6 else "0.0" if r < 0.95 else "-1.0"


def chexpert_report(rng, findings, valid=False):
    """The CheXpert labeller's row for drawn `findings`: No Finding, then one cell per
    CHEXPERT_LABELS (the parent labels Lung Opacity / Enlarged Cardiomediastinum follow their
    children, as the labeller's hierarchy does). MIMIC-CXR-JPG uses the same labeller."""
    present = set(findings)
    if present & {"Consolidation", "Pneumonia", "Edema", "Atelectasis"}:
        present.add("Lung Opacity")
    if "Cardiomegaly" in findings:
        present.add("Enlarged Cardiomediastinum")
    present = {"Pleural Effusion" if f == "Effusion" else f for f in present}
    no_finding = "1.0" if not present else ("0.0" if valid else "")
    return [no_finding] + [chexpert_cell(rng, name in present, valid) for name in CHEXPERT_LABELS]


def write_chexpert_raw(root, n=600, seed=0, image_size=112, p=0.12, folder="CheXpert-v1.0-small"):
    """A CheXpert-style folder: root/FOLDER/{train,valid}.csv with 1/0/-1/blank and
    root/FOLDER/{train,valid}/patientNNNNN/studyN/view1_frontal.jpg (+ view2_lateral.jpg)."""
    rng = np.random.default_rng(seed)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding"] + CHEXPERT_LABELS
    lines = {"train": [], "valid": []}
    count, patient = 0, 0
    while count < n:
        patient += 1
        split = "valid" if rng.random() < 0.1 else "train"
        for study in range(1, int(rng.integers(1, 3)) + 1):
            findings = demo_findings(rng, DEMO_CHEXPERT_FINDINGS, p)
            views = [("view1_frontal.jpg", "Frontal")] + ([("view2_lateral.jpg", "Lateral")] if rng.random() < 0.2 else [])
            for fname, fl in views[:n - count]:
                rel = f"{folder}/{split}/patient{patient:05d}/study{study}/{fname}"
                os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
                Image.fromarray(synthetic_chest(rng, findings, image_size, lateral=fl == "Lateral")).save(
                    os.path.join(root, rel), quality=95)
                ap_pa = ("PA" if rng.random() < 0.3 else "AP") if fl == "Frontal" else ""
                lines[split].append(",".join([rel, "Female" if rng.random() < 0.5 else "Male", str(int(rng.integers(20, 90))),
                                              fl, ap_pa] + chexpert_report(rng, findings, split == "valid")))
                count += 1
    for split, rows in lines.items():
        with open(os.path.join(root, folder, f"{split}.csv"), "w") as f:
            f.write(",".join(header) + "\n" + "".join(r + "\n" for r in rows))
    return os.path.join(root, folder)


def write_mimic_raw(root, n=2400, seed=0, image_size=112, p=0.12):
    """A MIMIC-CXR-JPG-2.0.0-style folder: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg and the
    mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz tables (the CheXpert labeller's coding per
    study, official train / validate / test by subject), with the sources' findings."""
    rng = np.random.default_rng(seed)
    reports, meta, split_rows = [], [], []
    subject, study = 10000000, 50000000
    while len(meta) < n:
        subject += 1
        split = str(rng.choice(["train", "validate", "test"], p=[0.9, 0.05, 0.05]))
        for _ in range(int(rng.integers(1, 3))):
            study += 1
            findings = demo_findings(rng, DEMO_CHEXPERT_FINDINGS, p)
            reports.append(f"{subject},{study}," + ",".join(chexpert_report(rng, findings)))
            views = ["PA" if rng.random() < 0.4 else "AP"] + (["LATERAL"] if rng.random() < 0.2 else [])
            for view in views[:n - len(meta)]:
                dicom = f"{rng.integers(16 ** 8):08x}-{rng.integers(16 ** 8):08x}"
                folder = os.path.join(root, "files", f"p{str(subject)[:2]}", f"p{subject}", f"s{study}")
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(synthetic_chest(rng, findings, image_size, lateral=view == "LATERAL")).save(
                    os.path.join(folder, dicom + ".jpg"), quality=95)
                meta.append(f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},{image_size},{image_size}")
                split_rows.append(f"{dicom},{study},{subject},{split}")
    tables = {"chexpert": ("subject_id,study_id,No Finding," + ",".join(CHEXPERT_LABELS), reports),
              "metadata": ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns", meta),
              "split": ("dicom_id,study_id,subject_id,split", split_rows)}
    for name, (header, rows) in tables.items():
        pd.DataFrame([r.split(",") for r in rows], columns=header.split(",")).to_csv(
            os.path.join(root, f"mimic-cxr-2.0.0-{name}.csv.gz"), index=False)
    return root


def write_tuberculosis_raw(root, n=600, seed=0, image_size=112):
    """Shenzhen/Montgomery-style target: ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png and
    MontgomerySet/CXR_png/MCUCXR_0001_1.png, balanced."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 2
        prefix, folder = ("CHNCXR", "ChinaSet_AllFiles") if i < n * 2 // 3 else ("MCUCXR", "MontgomerySet")
        # No other findings: with few shots, source findings present in both classes would be
        # what the pre-trained features see first (measured: few-shot AUC near 0.5).
        findings = ["Tuberculosis"] if label else []
        os.makedirs(os.path.join(root, folder, "CXR_png"), exist_ok=True)
        Image.fromarray(synthetic_chest(rng, findings, image_size)).save(
            os.path.join(root, folder, "CXR_png", f"{prefix}_{i + 1:04d}_{label}.png"))
    return root


def make_demo(raw_root, seed=0, n_chexpert=800, n_mimic=2000, n_target=800, image_size=64):
    """Synthetic raw data for a no-download run, in the real layouts: raw_root/chexpert (holding
    CheXpert-v1.0-small), raw_root/mimic-cxr-jpg and raw_root/tuberculosis. CheXpert and MIMIC
    share the labeller and the findings, so CheXpert alone and CheXpert + MIMIC are two sources
    of different size with the same 13 labels (the first step of the paper's scale axis).
    Findings are more frequent than in the real sets (p 0.25) so that a few hundred steps of
    pre-training learn them."""
    write_chexpert_raw(os.path.join(raw_root, "chexpert"), n_chexpert, seed + 1, image_size, p=0.25)
    write_mimic_raw(os.path.join(raw_root, "mimic-cxr-jpg"), n_mimic, seed + 3, image_size, p=0.25)
    write_tuberculosis_raw(os.path.join(raw_root, "tuberculosis"), n_target, seed + 2, image_size)
    return raw_root


# ----------------------------------------------------------------------------------------
# Command line

PARSERS = {"chexpert": parse_chexpert, "mimic": lambda a: parse_mimic(a, "jpg"),
           "mimic-dicom": lambda a: parse_mimic(a, "dcm"), "nih": parse_nih, "padchest": parse_padchest,
           "covidx": parse_covidx, "tuberculosis": parse_tuberculosis, "flowers102": parse_natural,
           "pets": parse_natural, "imagefolder": parse_imagefolder, "csv": parse_csv}
DATASETS = ["chexpert", "mimic", "mimic-dicom", "nih", "padchest", "covidx", "tuberculosis", "cifar10",
            "cifar100", "flowers102", "pets", "imagefolder", "csv", "merge", "demo"]


def get_args_parser():
    p = models.ArgumentParser(description="Prepare a dataset: raw download -> images.npy + labels.csv + meta.json.")
    p.add_argument("--dataset", required=True, choices=DATASETS, metavar="NAME",
                   help="one of: " + ", ".join(DATASETS) + " (demo writes synthetic raw folders to --out)")
    p.add_argument("--root", help="raw dataset folder (as downloaded)")
    p.add_argument("--out", required=True, help="output folder (prepared dataset, or raw folders for demo)")
    p.add_argument("--size", type=int, default=None, help="side of the stored square images (default 512; CIFAR 32)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="stored channels for imagefolder/csv (default: imagefolder 3, csv 1)")
    p.add_argument("--views", nargs="+", default=PRETRAIN_VIEWS,
                   help="views kept for the X-ray sources (PadChest AP_horizontal = 'AP Supine', CheXpert lateral = "
                        "'L'; MIMIC ViewPosition as is); 'all' keeps every view")
    p.add_argument("--uncertain", choices=["ignore", "ones", "zeros"], default="ignore",
                   help="CheXpert/MIMIC/csv uncertain (-1) labels: ignore = unknown (masked), or map to 1 / 0")
    p.add_argument("--blank", choices=["ignore", "zeros"], default="ignore",
                   help="CheXpert/MIMIC blank (not mentioned) labels: unknown (masked) or 0")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="patients moved to 'valid' where there is no official validation split")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="patients in 'test' where there is no official test split (default: PadChest 0.1, "
                        "Tuberculosis/imagefolder/csv 0.15, the paper's ratios)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level splits and of the demo data")
    p.add_argument("--labels-csv", help="csv dataset: CSV with a path column (relative to --root) and label columns")
    p.add_argument("--inputs", nargs="+", help="merge: prepared folders to combine")
    p.add_argument("--labels", choices=["intersection", "union"], default="intersection",
                   help="merge: keep labels shared by all inputs, or all (unknown where a source lacks one)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (1 = in this process)")
    p.add_argument("--max-rejects", type=float, default=0.01,
                   help="fail (exit 2, dataset left incomplete and resumable) when more than this fraction of "
                        "images is rejected")
    p.add_argument("--strict", action="store_true", help="fail on any rejected image")
    p.add_argument("--dry-run", action="store_true",
                   help="read metadata only: write labels.csv and label_stats.csv, print the counts")
    p.add_argument("--download", action="store_true", help="torchvision datasets: download if absent")
    p.add_argument("--overwrite", action="store_true", help="rebuild an already prepared --out")
    return p


def save_args(args):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)


def main(args, stop_after=None):
    if args.size is not None and args.size < 1:
        raise UserError("--size must be positive")
    if not 0 <= args.valid_fraction < 1 or not 0 <= (args.test_fraction or 0) < 1:
        raise UserError("--valid-fraction and --test-fraction must be in [0, 1)")
    if args.dataset == "demo":
        make_demo(args.out, seed=args.seed)
        print(f"demo: raw folders written to {args.out}/chexpert, {args.out}/mimic-cxr-jpg, {args.out}/tuberculosis",
              flush=True)
        return None
    if args.dataset == "merge":
        if not args.inputs or len(args.inputs) < 2:
            raise UserError("merge needs --inputs with at least two prepared folders")
    elif not args.root:
        raise UserError(f"--dataset {args.dataset} needs --root")
    elif not os.path.isdir(args.root) and not (args.download and args.dataset in TORCHVISION):
        raise FileNotFoundError(f"--root {args.root} is not a folder")
    if os.path.exists(os.path.join(args.out, "meta.json")):
        if not args.overwrite:
            raise UserError(f"{args.out} already holds a prepared dataset; pass --overwrite to rebuild it")
        os.remove(os.path.join(args.out, "meta.json"))
    save_args(args)
    if args.dataset == "merge":
        return merge(args.inputs, args.out, args.labels)
    if args.dataset in ("cifar10", "cifar100"):
        return prepare_cifar(args)

    table, labels, task, channels, base, dropped = PARSERS[args.dataset](args)
    if args.dataset in ("chexpert", "mimic", "mimic-dicom", "nih", "padchest") and "all" not in args.views:
        keep = table["view"].isin(args.views).to_numpy()
        dropped["view not in --views"] = int((~keep).sum())
        table = table[keep].reset_index(drop=True)
    for reason, n in dropped.items():
        if n:
            print(f"dropped: {n} rows ({reason})", flush=True)
    if table.empty:
        raise UserError("no image left to prepare (check --views and the label files)")
    if args.dry_run:
        write_labels_csv(os.path.join(args.out, "labels.csv"), table, labels)
        report(table, labels, args.out)
        return table

    size = args.size or 512
    refused = {i: "path outside the dataset root" for i, f in enumerate(table["file"]) if not is_inside(f, base)}
    state = convert_all(table, args.out, size, channels, args.workers, refused, stop_after)
    if not state.done.all():
        print(f"stopped: {int(state.done.sum())} of {len(table)} images converted; run again to continue", flush=True)
        return None
    rejected = np.zeros(len(table), bool)
    rejected[list(state.rejects)] = True
    rejects = pd.DataFrame({"path": table["path"][rejected], "reason": [state.rejects[i] for i in np.flatnonzero(rejected)]})
    rejects.to_csv(os.path.join(args.out, "rejects.csv"), index=False)
    for r in rejects.head(20).itertuples():
        print(f"reject: {r.path}: {r.reason}", flush=True)
    limit = 0 if args.strict else args.max_rejects
    print(f"rejects: {int(rejected.sum())} of {len(table)} images (list in {args.out}/rejects.csv)", flush=True)
    if rejected.mean() > limit:
        raise UserError(f"{int(rejected.sum())} of {len(table)} images rejected ({rejected.mean():.2%} > "
                        f"{'--strict' if args.strict else f'--max-rejects {limit:.2%}'}); see {args.out}/rejects.csv. "
                        "Nothing is lost: fix or allow them and run again")
    keep = ~rejected
    compact(state, keep, args.out)
    kept = table[keep].reset_index(drop=True)
    write_labels_csv(os.path.join(args.out, "labels.csv"), kept, labels)
    report(kept, labels, args.out)
    orig = state.orig[keep]
    write_meta(args.out, {"name": args.dataset, "size": size, "channels": channels, "labels": labels,
                          "task": task, "orig_size": [int(v) for v in np.median(orig, axis=0)],
                          "counts": {**counts(kept), "rejected": int(rejected.sum()), "dropped": dropped}})
    shutil.rmtree(state.dir, ignore_errors=True)
    return kept


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
