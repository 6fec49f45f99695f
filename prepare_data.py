"""Raw dataset downloads -> prepared datasets that training reads without decoding.

    python prepare_data.py --dataset nih --root /data/NIH-ChestXRay-14 --out data/nih
    python prepare_data.py --dataset chexpert --root /data/CheXpert-v1.0-small --out data/chexpert --workers 16
    python prepare_data.py --dataset merge --inputs data/chexpert data/mimic data/nih data/padchest --out data/all4
    python prepare_data.py --dataset imagenet --root /data/ILSVRC2012 --out data/imagenet   # train/, val/<wnid>/
    python prepare_data.py --dataset demo --out raw_demo        # synthetic raw folders in the real layouts

A prepared dataset is a folder, read by `torchrun pretrain.py` / `transfer.py` on any number of GPUs:
    images.npy       uint8 array (N, S, S, C), C = 1 (X-rays) or 3 (natural images), memory-mapped
    labels.csv       row i describes images[i]: path, patient, view, split (train/valid/test), the
                     optional ROW_COLUMNS (scale, aspect), then one column per label holding 1, 0 or
                     empty (unknown; masked in the loss). Rows are in the authors' dataset order
                     (where they split at random: their shuffled order, train first)
    meta.json        name, size, channels, labels, task (multilabel | multiclass), orig_size (median
                     original [H, W], for the BiT-HyperRule), counts, pipeline (transfer.py's input
                     pipeline: bit | chest), geometry (crop | squash), shot_rule (transfer.py's
                     k-shot rule: per_class | loader), split_by; written last: a folder without it
                     is not a dataset
    rejects.csv      files that could not be prepared, with the reason
    label_stats.csv  positive / negative / masked counts per label and split
Conversion is resumable: the work in progress lives in OUT/.work.

Images, every format alike: (1) one linear map of the format's nominal value range onto uint8
[0, 255]: 8-bit PNG/JPEG as they are; 16-bit PNG [0, 2^bits - 1], bits = the dataset's
BitsStored (PadChest) else 16; DICOM the range of BitsStored (and PixelRepresentation) after
the modality LUT (RescaleSlope/Intercept), MONOCHROME1 inverted. DICOM windows are not applied:
they are vendors' display presets that would clip, and the public datasets' PNG/JPEG exports
keep the full range too. Colour becomes grayscale (ITU-R 601 luma) for X-rays, RGB for natural
images. PadChest is stored full range too; by default the model reads it as the authors did,
value / 65535 (labels.csv `scale`, see --intensity). (2) Sources and the chest pipeline: a centre
crop to the square of the shorter side (the authors' XRayCenterCrop); targets of the BiT
pipeline (Spec.bit_target): the whole image squashed, its width / height in labels.csv `aspect`
(transfer.py crops it as the authors' Resize(512) + RandomCrop(480), and evaluates the squash,
their Resize((480, 480))). Resized to --size by Pillow's bilinear filter, antialiased (JPEGs at
least twice the target are DCT-downscaled first).
"""
import ast
import concurrent.futures
import contextlib
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import time
import zlib
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

import models
from models import UserError, print0

META_COLUMNS = ["path", "patient", "view", "split"]
# Optional per-row numbers of labels.csv and their value where a folder has none: scale, the
# model input is stored / 255 x scale (PadChest: the authors' value / 65535); aspect, the original
# width / height of an image stored squashed.
ROW_COLUMNS = {"scale": 1.0, "aspect": 1.0}
SPLITS = ["train", "valid", "test"]


# ----------------------------------------------------------------------------------------
# The prepared format: writer and reader

PREPARED_FILES = ["images.npy", "labels.csv", "rejects.csv", "label_stats.csv", "args.json", "meta.json"]
META_KEYS = {"name": str, "size": int, "channels": int, "labels": list, "task": str}


def save_prepared(out, images, table, labels, task, name="", extra_meta=None):
    """An in-memory dataset (uint8 images (N, S, S[, C]), a table of META_COLUMNS + labels) as a
    prepared folder."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    assert len(images) == len(table) and images.shape[1] == images.shape[2]
    os.makedirs(out, exist_ok=True)
    with models.atomic_write(os.path.join(out, "images.npy"), "wb") as f:
        np.save(f, images)
    write_labels_csv(out, table, labels)
    write_meta(out, {"name": name, "size": int(images.shape[1]), "channels": int(images.shape[3]),
                     "labels": list(labels), "task": task, **(extra_meta or {})})


def write_images(path, shape, parts):
    """images.npy from the rows of (array, rows) parts, 512 at a time: a dataset larger than
    memory is copied in bounded memory."""
    tmp = f"{path}.tmp.{os.getpid()}"
    dst = np.lib.format.open_memmap(tmp, "w+", np.uint8, shape)
    start = 0
    for src, rows in parts:
        for k in range(0, len(rows), 512):
            chunk = src[rows[k:k + 512]]
            dst[start:start + len(chunk)] = chunk
            start += len(chunk)
    dst.flush()
    del dst
    models.replace_file(tmp, path)


def write_meta(out, meta):
    """Every writer calls this last: meta.json marks a folder complete."""
    with models.atomic_write(os.path.join(out, "meta.json")) as f:
        json.dump(meta, f, indent=1)


def write_csv(path, table):
    with models.atomic_write(path) as f:
        table.to_csv(f, index=False)


def write_labels_csv(out, table, labels):
    out_table = table[META_COLUMNS + [c for c in ROW_COLUMNS if c in table]].copy()
    for label in labels:   # 1, 0 or empty
        out_table[label] = table[label].astype("Float64").round().astype("Int64")
    write_csv(os.path.join(out, "labels.csv"), out_table)


def counts(table):
    return {"split": {k: int(v) for k, v in table["split"].value_counts().sort_index().items()},
            "view": {(k or "(none)"): int(v) for k, v in table["view"].value_counts().sort_index().items()}}


def report(table, labels, out):
    """Print the images per split and view and the label counts; write label_stats.csv."""
    c = counts(table)
    print0("images: " + "  ".join(f"{k} {v}" for k, v in c["split"].items()) + f"  total {len(table)}")
    print0("views: " + "  ".join(f"{k} {v}" for k, v in c["view"].items()))
    rows = []
    for label in labels:
        v = pd.to_numeric(table[label], errors="coerce")
        for split in [s for s in SPLITS if (table["split"] == s).any()] + ["all"]:
            x = v if split == "all" else v[table["split"] == split]
            rows.append((label, split, int((x == 1).sum()), int((x == 0).sum()), int(x.isna().sum())))
            print0("label {!r} split {}: positive {} negative {} masked {}".format(*rows[-1]))
    write_csv(os.path.join(out, "label_stats.csv"),
              pd.DataFrame(rows, columns=["label", "split", "positive", "negative", "masked"]))


def read_meta(folder):
    """meta.json of a prepared folder, its keys checked; a missing, broken or incomplete one is
    a one-line error."""
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no meta.json); run prepare_data.py first")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path}: not valid JSON ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a JSON object")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{path}: key {key!r} missing or not a {kind.__name__}")
    if meta["task"] not in ("multilabel", "multiclass"):
        raise UserError(f"{path}: task {meta['task']!r} is not multilabel or multiclass")
    return meta


def read_labels_csv(folder, labels, multiclass=False):
    """labels.csv of a prepared folder: label cells other than 1, 0 or empty (and a multiclass
    row without exactly one 1) are a one-line error naming line and column."""
    path = os.path.join(folder, "labels.csv")
    t = read_table(path, dtype=str, keep_default_na=False)
    require_columns(t, META_COLUMNS + list(labels), path)
    for column in [c for c in ROW_COLUMNS if c in t]:
        t[column] = pd.to_numeric(t[column], errors="coerce")
        if not (t[column] > 0).all():
            raise UserError(f"{path} line {first_true(~(t[column] > 0)) + 2} column {column!r}: not a positive number")
    for label in labels:
        t[label] = check_codes(t[label], {0.0, 1.0}, path, label).astype(np.float64)
        if multiclass and t[label].isna().any():
            raise UserError(f"{path} line {first_true(t[label].isna()) + 2} column {label!r}: "
                            "empty in a multiclass dataset")
    ones = t[list(labels)].sum(axis=1)
    if multiclass and (ones != 1).any():
        raise UserError(f"{path} line {first_true(ones != 1) + 2}: a multiclass row needs exactly one 1")
    return t


def open_images(folder, meta, rows):
    """images.npy of a prepared folder, memory-mapped; one that is truncated or disagrees with
    meta.json (side, channels) or labels.csv (rows) is a one-line error."""
    path = require_file(os.path.join(folder, "images.npy"))
    try:
        images = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: truncated or not a .npy file ({str(e).splitlines()[0]})") from None
    want = (rows, meta["size"], meta["size"], meta["channels"])
    if images.dtype != np.uint8 or images.shape != want:
        raise UserError(f"{path}: {images.dtype} {images.shape}, but meta.json (size, channels) and "
                        f"labels.csv ({rows} rows) say uint8 {want}")
    return images


def validation_split(table):
    """The split a pre-training run validates on: "valid", or "test" where a folder has no
    valid rows (the paper validated NIH on its test list and PadChest on its held-out 10 %)."""
    return "valid" if (table["split"] == "valid").any() else "test"


class PreparedDataset(torch.utils.data.Dataset):
    """Rows of one split ("train" / "valid" / "test", None: all) of a prepared folder, of the
    given views only (None: all; a folder holds every view a recipe may need). Indexing returns
    (uint8 tensor (S, S, C), float32 targets (L,) with NaN = unknown, float32 intensity scale);
    `__getitems__` reads a whole batch with one fancy index into the memory map. `scale` and
    `aspect` hold ROW_COLUMNS per row of the table (index them with `rows`)."""

    def __init__(self, folder, split=None, views=None):
        self.folder, self.meta = folder, read_meta(folder)
        self.labels = self.meta["labels"]
        self.multilabel = self.meta["task"] == "multilabel"
        self.table = read_labels_csv(folder, self.labels, multiclass=not self.multilabel)
        self.images = open_images(folder, self.meta, len(self.table))
        keep = np.ones(len(self.table), bool) if split is None else (self.table["split"] == split).to_numpy()
        if views is not None:
            keep = keep & self.table["view"].isin(views).to_numpy()  # pandas may hand back a read-only array
        self.rows = np.flatnonzero(keep)
        self.targets = self.table[self.labels].to_numpy(np.float32)[self.rows]
        self.scale, self.aspect = (self.table[c].to_numpy(np.float32) if c in self.table else
                                   np.full(len(self.table), default, np.float32) for c, default in ROW_COLUMNS.items())

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        images, targets, scale = self.__getitems__([i])
        return images[0], targets[0], scale[0]

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        rows = self.rows[indices]
        return (torch.from_numpy(self.images[rows]), torch.from_numpy(self.targets[indices]),
                torch.from_numpy(self.scale[rows]))


# ----------------------------------------------------------------------------------------
# Harmonization: labels, renames, synonyms and views of every dataset, in one place (the rules
# of the paper's code, SLAMPAI/large-scale-pretraining-transfer, transfer_learning/datasets/*.py)

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
# CheXpert's and MIMIC's "Pleural Effusion" is NIH's and PadChest's "Effusion", so that merged
# sources share it (the 7-label intersection of the paper).
LABEL_RENAMES = {"Pleural Effusion": "Effusion"}
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
# Raw view values -> harmonised names (others kept as they are). CheXpert rows carry their AP/PA
# value when frontal, "Lateral" otherwise. MIMIC's ViewPosition is kept as is, as in the paper's
# code: LATERAL / LL never match "L", so the paper's five-view recipe took CheXpert and PadChest
# laterals but no MIMIC lateral. NIH has PA and AP only.
VIEW_NAMES = {"chexpert": {"Lateral": "L"}, "padchest": {"AP_horizontal": "AP Supine"}}
# The views an X-ray dataset keeps by default: the paper's five-view recipe; each recipe picks
# its own subset at training time (PreparedDataset(..., views=...), pretrain.py --views).
PRETRAIN_VIEWS = ["PA", "AP", "AP Supine", "L", "COSTAL"]
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
# Images the authors removed from PadChest (missing or wrong in their download) before their
# random split; removing the same ones first reproduces their split row for row.
PADCHEST_PAPER_EXCLUDED = frozenset(f"{name}.png" for name in """
216840111366964012819207061112010307142602253_04-014-084 216840111366964012989926673512011074122523403_00-163-058
216840111366964012959786098432011033083840143_00-176-115 216840111366964012558082906712009327122220177_00-102-064
216840111366964012339356563862009072111404053_00-043-192 216840111366964013076187734852011291090445391_00-196-188
216840111366964012373310883942009117084022290_00-064-025 216840111366964012283393834152009033102258826_00-059-087
216840111366964012373310883942009170084120009_00-097-074 216840111366964012819207061112010315104455352_04-024-184
216840111366964013829543166512013353113303615_02-092-190 216840111366964012904401302362010337093236130_03-198-079
216840111366964012904401302362010336141343749_03-198-010 216840111366964012989926673512011151082430686_00-157-045
216840111366964012989926673512011083134050913_00-168-009 216840111366964012373310883942009077082646386_00-047-124
216840111366964013686042548532013208193054515_02-026-007 216840111366964013962490064942014134093945580_01-178-104
216840111366964012819207061112010281134410801_00-129-131 216840111366964013590140476722013043111952381_02-065-198
216840111366964012283393834152009027091819347_00-007-136 216840111366964012373310883942009152114636712_00-102-045
216840111366964012283393834152009033140208626_00-059-118 216840111366964013590140476722013058110301622_02-056-111
216840111366964012487858717522009280135853083_00-075-001 216840111366964013590140476722013049100117076_02-063-097
216840111366964013649110343042013092101343018_02-075-146 216840111366964012819207061112010306085429121_04-020-102
269300710246070740096540277379121868595_e7zsan 216840111366964012373310883942009180082307973_00-097-011
""".split())
CHEXPERT_CODES = {-1.0, 0.0, 1.0}   # uncertain, negative, positive; blank = not mentioned
UNCERTAIN = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}   # what --uncertain makes of a -1
# COVIDx classes as its documentation spells them (CXR-2: positive / negative; older lists: normal /
# pneumonia / COVID-19), matched whatever the case: NEGATIVE, Negative and negative are one class.
COVIDX_CLASSES = {name.casefold(): name for name in ("positive", "negative", "normal", "pneumonia", "COVID-19")}


def chexpert_labels(table, file, uncertain="ignore", blank="ignore"):
    """CheXpert/MIMIC coding -> 13 float columns (NaN = unknown), renamed by LABEL_RENAMES:
    uncertain (-1) and blank (not mentioned) as --uncertain and --blank say; a row with
    No Finding = 1 has every pathology 0 (the paper's rule, applied last)."""
    require_columns(table, CHEXPERT_LABELS + ["No Finding"], file)
    out = pd.DataFrame(index=table.index)
    healthy = check_codes(table["No Finding"], CHEXPERT_CODES, file, "No Finding") == 1
    for name in sorted(CHEXPERT_LABELS):
        raw = check_codes(table[name], CHEXPERT_CODES, file, name).astype(np.float64)
        v = raw.mask(raw == -1, UNCERTAIN[uncertain])
        if blank == "zeros":
            v = v.mask(raw.isna(), 0.0)
        v[healthy] = 0.0
        out[LABEL_RENAMES.get(name, name)] = v
    return out


def padchest_labels(label_lists):
    """PadChest label strings per image (lists) -> 0/1 columns for the paper's 27 labels."""
    out = {}
    for name in sorted(PADCHEST_LABELS):
        keys = [name.lower()] + PADCHEST_SYNONYMS.get(name, [])
        out[name] = [float(any(k in s for k in keys for s in strings)) for strings in label_lists]
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------
# Parsers: raw layout -> Raw, one row per image. finish() does the rest for every dataset.

class Raw(NamedTuple):
    """What a parser read. table: path (as in the dataset, relative to `base`), patient, view
    (raw value), split ("train" / "valid" / "test" where the dataset says, "" = to assign),
    optional group (rows split separately per group, e.g. per folder), optional bits (PadChest
    BitsStored) and ROW_COLUMNS, and either the label columns (multilabel) or one `label`
    column of class names (multiclass).
    labels: the label columns, or the classes in order (None: sorted)."""
    table: pd.DataFrame
    labels: list = None
    base: str = ""
    dropped: dict = {}
    images: np.ndarray = None     # in-memory uint8 images, row i of table (CIFAR)
    task: str = None              # multiclass | multilabel where the data decides (csv), else Spec.task


def listed(rows, base, classes=None, images=None):
    """Raw of a multiclass dataset from (path, patient, view, split, class name) rows."""
    return Raw(pd.DataFrame(rows, columns=META_COLUMNS + ["label"]), classes, base, images=images)


# Reading raw files: a bad file, table or cell is a one-line error naming it

def require_file(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    return path


def require_columns(table, columns, source):
    for c in columns:
        if c not in table.columns:
            raise UserError(f"{source} has no column {c!r}")


def first_true(mask):
    return int(np.flatnonzero(np.asarray(mask))[0])


def check_codes(values, allowed, file, column):
    """A column as read (strings or numbers) -> numbers; a value outside `allowed` (blank
    cells pass) is a one-line error naming file, line and column."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = ~(pd.isna(values) | (values.astype(str).str.strip() == "")) & ~numbers.isin(allowed)
    if bad.any():
        pos = first_true(bad)
        allowed_text = f"{min(allowed)}..{max(allowed)}" if len(allowed) > 3 else ", ".join(map(str, sorted(allowed)))
        raise UserError(f"{file} line {pos + 2} column {column!r}: {str(values.iloc[pos])!r} is not one of "
                        f"{allowed_text} or blank")
    return numbers


def check_split_names(values, allowed, file):
    bad = ~values.isin(allowed)
    if bad.any():
        pos = first_true(bad)
        raise UserError(f"{file} line {pos + 2}: split {values.iloc[pos]!r} is not one of {', '.join(sorted(allowed))}")


def read_table(path, **kwargs):
    """pandas.read_csv, with a malformed, non-UTF-8 or truncated (.gz) file a one-line error."""
    require_file(path)
    try:
        if path.endswith(".gz"):   # decompressed whole first: pandas reads a truncated .gz silently up to the cut
            with gzip.open(path) as f:
                return pd.read_csv(io.BytesIO(f.read()), **kwargs)
        return pd.read_csv(path, **kwargs)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, EOFError, OSError,
            zlib.error) as e:
        raise UserError(f"{path}: unreadable table ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def read_lines(path):
    try:
        with open(require_file(path), encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")


def list_files(root, keep):
    """Every file under root whose name passes `keep`, sorted. Directory symlinks are followed,
    but a folder reached twice (a loop, or two links to it) is walked once, and a file reached
    by two paths is listed once."""
    seen_dirs, seen_files, out = set(), set(), []
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if keep(name) and real not in seen_files and os.path.isfile(path):
                seen_files.add(real)
                out.append(path)
    return sorted(out)


def parse_chexpert(args):
    """CheXpert v1.0 or v1.0-small: --root is the dataset folder (holding train.csv) or the folder
    holding it; the CSVs' paths start with the dataset folder's name."""
    root = args.root
    if not os.path.exists(os.path.join(root, "train.csv")):
        found = [d for d in ("CheXpert-v1.0-small", "CheXpert-v1.0")
                 if os.path.exists(os.path.join(root, d, "train.csv"))]
        if not found:
            raise FileNotFoundError(f"no train.csv in {root} or {root}/CheXpert-v1.0[-small]")
        root = os.path.join(root, found[0])
    tables = []
    for split in ("train", "valid"):
        name = os.path.join(root, f"{split}.csv")
        t = read_table(name, dtype={"Path": str, "AP/PA": str})
        require_columns(t, ["Path", "Frontal/Lateral", "AP/PA"], name)
        tables.append(chexpert_labels(t, name, args.uncertain, args.blank).assign(
            path=t["Path"], patient=t["Path"].str.extract(r"(patient\d+)", expand=False).fillna(t["Path"]),
            view=t["AP/PA"].where(t["Frontal/Lateral"] == "Frontal", t["Frontal/Lateral"]), split=split))
    labels = sorted(LABEL_RENAMES.get(name, name) for name in CHEXPERT_LABELS)
    table = pd.concat(tables, ignore_index=True)[META_COLUMNS + labels]
    return Raw(table, labels, os.path.dirname(os.path.abspath(root)))


def parse_mimic(args, ext):
    """MIMIC-CXR-JPG 2.0.0 (ext "jpg") or MIMIC-CXR DICOM files (ext "dcm") with the JPG release's
    chexpert, metadata and split tables in --root."""
    names = {k: f"mimic-cxr-2.0.0-{k}.csv.gz" for k in ("chexpert", "metadata", "split")}
    labels_t, meta_t, split_t = (read_table(os.path.join(args.root, n)) for n in names.values())
    require_columns(labels_t, ["subject_id", "study_id"], names["chexpert"])
    require_columns(meta_t, ["dicom_id", "subject_id", "study_id", "ViewPosition"], names["metadata"])
    require_columns(split_t, ["dicom_id", "split"], names["split"])
    check_split_names(split_t["split"], {"train", "validate", "test"}, names["split"])
    labels = chexpert_labels(labels_t, names["chexpert"], args.uncertain, args.blank)
    # One row per image of a labelled study (the paper joins labels onto the metadata).
    t = meta_t.merge(pd.concat([labels_t[["subject_id", "study_id"]], labels], axis=1), on=["subject_id", "study_id"])
    t = t.merge(split_t[["dicom_id", "split"]], on="dicom_id", how="left")
    sid, study = t["subject_id"].astype(str), t["study_id"].astype(str)
    paths = "files/p" + sid.str[:2] + "/p" + sid + "/s" + study + "/" + t["dicom_id"].astype(str) + "." + ext
    split = t["split"].replace({"validate": "valid"}).fillna("")
    keep = (split != "").to_numpy()
    table = pd.DataFrame({"path": paths, "patient": sid, "view": t["ViewPosition"].fillna(""), "split": split})
    table = pd.concat([table, t[list(labels.columns)]], axis=1)[keep].reset_index(drop=True)
    return Raw(table, list(labels.columns), args.root, {"no official split": int((~keep).sum())})


def parse_nih(args):
    """NIH ChestX-ray14: Data_Entry_2017_v2020.csv and the official train_val_list.txt /
    test_list.txt (split by patient). Images in images/ (flat) or images_001/images/ ..."""
    csv = os.path.join(args.root, "Data_Entry_2017_v2020.csv")
    if not os.path.exists(csv):
        csv = os.path.join(args.root, "Data_Entry_2017.csv")
    # The header names 9 columns but rows have 11 (two bracketed pairs); pandas splits the
    # header the same way, so names line up and only the first 7 columns are used.
    t = read_table(csv, dtype={"Image Index": str, "Patient ID": str, "Finding Labels": str})
    require_columns(t, ["Image Index", "Finding Labels", "Patient ID", "View Position"], csv)
    tokens = [set(s.split("|")) for s in t["Finding Labels"].fillna("")]
    known = set(NIH_LABELS) | {"No Finding"}
    for line, tok in enumerate(tokens, 2):
        if not tok <= known:
            raise UserError(f"{csv} line {line} column 'Finding Labels': unknown finding {sorted(tok - known)[0]!r}")
    train_val, test = (set(read_lines(os.path.join(args.root, n))) for n in ("train_val_list.txt", "test_list.txt"))
    split = pd.Series(["test" if n in test else "train" if n in train_val else "" for n in t["Image Index"]])
    keep = (split != "").to_numpy()
    folders = ["images"] if os.path.isdir(os.path.join(args.root, "images")) else \
        [os.path.relpath(f, args.root) for f in sorted(glob.glob(os.path.join(args.root, "images_*", "images")))]
    where = {n: f for f in folders for n in os.listdir(os.path.join(args.root, f))} if len(folders) > 1 else {}
    paths = [f"{where.get(n, (folders or ['images'])[0])}/{n}" for n in t["Image Index"]]
    table = pd.DataFrame({"path": paths, "patient": t["Patient ID"].str.lstrip("0").replace("", "0"),
                          "view": t["View Position"].fillna(""), "split": split})
    labels = sorted(NIH_LABELS)
    table = pd.concat([table, pd.DataFrame({n: [float(n in s) for s in tokens] for n in labels})], axis=1)
    return Raw(table[keep].reset_index(drop=True), labels, args.root,
               {"not in the official split lists": int((~keep).sum())})


def parse_padchest_list(cell):
    """"['pleural effusion', ' unchanged']" -> ['pleural effusion', 'unchanged'] (stripped,
    empties removed; case kept, as the paper matched case-sensitively); None when the cell is
    not a list literal."""
    try:
        items = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return [s for s in (str(i).strip() for i in items) if s] if isinstance(items, (list, tuple)) else None


def parse_padchest(args):
    """PadChest: the labels CSV and 16-bit PNGs in folders ImageDir (0..54). No official split.
    Rows as the authors' padchest.py keeps them: Labels not null and not in
    PADCHEST_PAPER_EXCLUDED (finish() keeps the views); an empty list ([], ['']) is a row with
    every label 0, and a cell that is not a list literal is matched as raw text, as their
    substring match on the cell does. `scale` reads the full-range store as --intensity says."""
    csv = os.path.join(args.root, PADCHEST_CSV)
    t = read_table(csv, low_memory=False, dtype={"ImageID": str, "PatientID": str, "ImageDir": str,
                                                 "Projection": str, "Labels": str})
    require_columns(t, ["ImageID", "ImageDir", "PatientID", "Projection", "Labels", "BitsStored_DICOM"], csv)
    bits = check_codes(t["BitsStored_DICOM"], set(range(1, 17)), csv, "BitsStored_DICOM")
    excluded = t["ImageID"].isin(PADCHEST_PAPER_EXCLUDED).to_numpy()
    keep = t["Labels"].notna().to_numpy() & ~excluded
    dropped = {"no Labels": int(t["Labels"].isna().sum()),
               "excluded by the paper": int((t["Labels"].notna().to_numpy() & excluded).sum())}
    lines = np.arange(len(t))[keep] + 2
    t, bits = t[keep].reset_index(drop=True), bits[keep].fillna(16).astype(int).reset_index(drop=True)
    lists = [parse_padchest_list(c) for c in t["Labels"]]
    if None in lists:
        print0(f"padchest: {csv} line {lines[lists.index(None)]} column 'Labels' is not a list literal "
               f"({lists.count(None)} rows; their labels are matched in the raw text)")
    # The authors read value / 65535: a 12-bit image reaches the model at most 4095 / 65535.
    scale = (2.0 ** bits - 1) / 65535 if args.intensity == "paper" else 1.0
    table = pd.DataFrame({
        "path": t["ImageDir"].astype(str).str.replace(r"\.0$", "", regex=True) + "/" + t["ImageID"],
        "patient": t["PatientID"], "view": t["Projection"].fillna(""), "split": "", "bits": bits, "scale": scale})
    labels = padchest_labels([[cell] if ls is None else ls for ls, cell in zip(lists, t["Labels"])])
    return Raw(pd.concat([table, labels], axis=1), list(labels.columns), args.root, dropped)


def parse_covidx_line(line):
    """COVIDx list line -> (patient, filename, label). Lines are `patient file label source`, or
    `patient file label` in old lists; the patient id may itself contain spaces
    ("COVID 1 COVID(1).png positive sirm"), so fields are taken from the right."""
    tokens = line.split()
    k = len(tokens) - 1 if tokens[-1].casefold() in COVIDX_CLASSES else len(tokens) - 2
    if k < 2 or tokens[k].casefold() not in COVIDX_CLASSES:
        raise UserError(f"cannot parse COVIDx line {line.strip()!r}")
    return " ".join(tokens[:k - 1]), tokens[k - 1], COVIDX_CLASSES[tokens[k].casefold()]


def parse_covidx(args):
    """COVIDx CXR-2: train.txt / test.txt (official split) with images in train/ and test/."""
    rows = []
    for split in ("train", "test"):
        for line in read_lines(os.path.join(args.root, f"{split}.txt")):
            if line.strip():
                patient, name, label = parse_covidx_line(line)
                rows.append((f"{split}/{name}", patient, "", split, label))
    return listed(rows, args.root)


def parse_tuberculosis(args):
    """Shenzhen (CHNCXR_0001_0.png) and Montgomery (MCUCXR_0001_1.png) anywhere under --root; the
    last digit is the label. Split per folder, as the paper's (Shenzhen and Montgomery apart)."""
    files = list_files(args.root, lambda n: n[:7] in ("CHNCXR_", "MCUCXR_") and n[-6:] in ("_0.png", "_1.png"))
    if not files:
        raise UserError(f"no CHNCXR_*_[01].png or MCUCXR_*_[01].png under {args.root}")
    names = [os.path.basename(f) for f in files]
    paths = [os.path.relpath(f, args.root) for f in files]
    classes = ["normal", "tuberculosis"]
    table = pd.DataFrame({"path": paths, "patient": [n[:-6] for n in names], "view": "PA", "split": "",
                          "group": [os.path.dirname(p) for p in paths], "label": [classes[int(n[-5])] for n in names]})
    return Raw(table, classes, args.root)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


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
            for f in list_files(os.path.join(folder, cls), lambda n: n.lower().endswith(IMAGE_EXTENSIONS)):
                path = os.path.relpath(f, args.root)
                rows.append((path, path, "", split_dirs.get(top, ""), cls))
    if not rows:
        raise UserError(f"no images in class folders under {args.root}")
    return listed(rows, args.root)


def parse_imagenet(args):
    """ImageNet-1k (ILSVRC2012) extracted: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted
    into class folders, as PyTorch's ImageNet example expects; torchvision's ImageNet would also
    need the devkit and the tarballs). Classes: the sorted wnids, torchvision's index order."""
    from torchvision.datasets import ImageFolder
    rows, classes = [], None
    for sub, split in (("train", "train"), ("val", "valid")):
        folder = os.path.join(args.root, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} not found (expected ILSVRC2012 train/ and val/<wnid>/)")
        ds = ImageFolder(folder)
        if classes is not None and ds.classes != classes:
            raise UserError(f"{args.root}/val has other class folders than {args.root}/train")
        classes = ds.classes
        for f, y in ds.samples:
            rows.append((os.path.relpath(f, args.root), os.path.relpath(f, args.root), "", split, classes[y]))
    return listed(rows, args.root, classes)


def parse_csv(args):
    """The user's own data: --labels-csv with a `path` column (relative to --root) and label
    columns, optional patient/view/split. One column of class names -> multiclass; label columns
    holding 1 / 0 / empty (unknown) / -1 (uncertain, see --uncertain) -> multilabel, or with
    --task multiclass, one 0/1 column per class with one 1 per row -> multiclass; that layout
    fits both, so it needs --task."""
    if not args.labels_csv:
        raise UserError("--dataset csv needs --labels-csv")
    file = args.labels_csv
    t = read_table(file, dtype=str, keep_default_na=False)
    require_columns(t, ["path"], file)
    label_cols = [c for c in t.columns if c not in META_COLUMNS]
    if not label_cols:
        raise UserError(f"{file} has no label column (columns other than {', '.join(META_COLUMNS)})")
    cells = {c: t[c].str.strip() for c in label_cols}
    coded = {c: cells[c].isin({"", "0", "1", "-1", "0.0", "1.0", "-1.0"}) for c in label_cols}
    # A column is 0/1-coded when nearly all its cells are, or when all are numbers; a stray value
    # there is an error, not a reason to read the file as class names.
    binary = [c for c in label_cols if coded[c].mean() >= 0.9 or pd.to_numeric(cells[c], errors="coerce").notna().all()]
    if len(label_cols) == 1 and not binary:
        if args.task == "multilabel":
            raise UserError(f"{file}: --task multilabel needs 0/1 label columns, not one column of class names")
        t["label"], labels = cells[label_cols[0]], None
        if (t["label"] == "").any():
            raise UserError(f"{file} line {first_true(t['label'] == '') + 2} column {label_cols[0]!r}: "
                            "empty class name")
    else:
        for c in label_cols:
            if not coded[c].all():
                pos = first_true(~coded[c])
                raise UserError(f"{file} line {pos + 2} column {c!r}: {t[c].iloc[pos]!r} is not 1, 0, -1 or empty "
                                "(label columns hold 1/0/empty, or are one column of class names, which are not "
                                "numbers)")
        v = pd.DataFrame({c: pd.to_numeric(cells[c], errors="coerce") for c in label_cols})
        one_hot = len(label_cols) > 1 and v.isin([0, 1]).all(axis=None) and (v.sum(axis=1) == 1).all()
        if one_hot and not args.task:
            raise UserError(f"{file}: every row has exactly one 1 in the columns {', '.join(label_cols)}: one class "
                            "per image or labels that may co-occur? Pass --task multiclass or --task multilabel")
        if args.task == "multiclass" and not one_hot:
            raise UserError(f"{file}: --task multiclass needs one column of class names, or 0/1 columns with "
                            "exactly one 1 per row")
        if one_hot and args.task == "multiclass":
            t["label"], labels = v.idxmax(axis=1), None
        else:
            t[label_cols], labels = v.mask(v == -1, UNCERTAIN[args.uncertain]), label_cols
    split = t["split"].replace({"val": "valid", "validate": "valid"}) if "split" in t else pd.Series([""] * len(t))
    check_split_names(split, set(SPLITS) | {""}, file)
    table = pd.DataFrame({"path": t["path"], "patient": t["patient"] if "patient" in t else t["path"],
                          "view": t["view"] if "view" in t else "", "split": split})
    return Raw(pd.concat([table, t[["label"] if labels is None else labels]], axis=1), labels, args.root,
               task="multiclass" if labels is None else "multilabel")


TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "flowers102": "Flowers102", "pets": "OxfordIIITPet"}


def download(args):
    """torchvision fetches the files into --root; the parsers below read them as downloaded."""
    import torchvision.datasets
    made = not os.path.exists(args.root)
    cls = getattr(torchvision.datasets, TORCHVISION[args.dataset])
    try:
        if args.dataset.startswith("cifar"):
            cls(args.root, train=True, download=True)
            cls(args.root, train=False, download=True)
        else:
            cls(args.root, split="test", download=True)
    except (OSError, RuntimeError) as e:    # URLError is an OSError: offline, DNS, refused
        if made:
            shutil.rmtree(args.root, ignore_errors=True)
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        raise UserError(f"--download {args.dataset} failed ({reason}); nothing was kept in {args.root}")


def downloaded_folder(args, name, what):
    folder = os.path.join(args.root, name)
    if not os.path.isdir(folder):
        raise UserError(f"{args.dataset}: no {name}/ under {args.root} ({what}); pass --download to fetch it")
    return folder


def parse_cifar(args):
    """CIFAR-10/100 as torchvision downloads them (python pickles of uint8 rows), read into
    memory: no file per image."""
    name, files, key, (meta_file, names_key) = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels",
                    ("batches.meta", "label_names")),
        "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", ("meta", "fine_label_names"))}[args.dataset]
    folder = downloaded_folder(args, name, "the python version of CIFAR")

    def load(f):
        with open(require_file(os.path.join(folder, f)), "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    classes = load(meta_file)[names_key]
    images, rows = [], []
    for f in files:
        batch = load(f)
        split = "test" if f.startswith("test") else "train"
        images.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        start = sum(r[3] == split for r in rows)
        rows += [(f"{split}/{start + i}", f"{split}/{start + i}", "", split, classes[y])
                 for i, y in enumerate(batch[key])]
    return listed(rows, args.root, classes, np.concatenate(images))


def parse_flowers102(args):
    """Flowers-102 as torchvision downloads it: flowers-102/jpg/image_00001.jpg, imagelabels.mat
    (1-based class per image) and setid.mat (trnid / valid / tstid)."""
    import scipy.io
    folder = downloaded_folder(args, "flowers-102", "jpg/, imagelabels.mat, setid.mat")
    labels = scipy.io.loadmat(require_file(os.path.join(folder, "imagelabels.mat")))["labels"].ravel()
    ids = scipy.io.loadmat(require_file(os.path.join(folder, "setid.mat")))
    classes = [str(i + 1) for i in range(102)]
    rows = [(f"flowers-102/jpg/image_{i:05d}.jpg", f"image_{i:05d}", "", split, classes[labels[i - 1] - 1])
            for key, split in (("trnid", "train"), ("valid", "valid"), ("tstid", "test")) for i in ids[key].ravel()]
    return listed(rows, args.root, classes)


def parse_pets(args):
    """Oxford-IIIT Pets as torchvision downloads it: oxford-iiit-pet/images/*.jpg and
    annotations/{trainval,test}.txt (`name class_id species breed_id`); class names as torchvision's,
    read off the image names."""
    folder = downloaded_folder(args, "oxford-iiit-pet", "images/ and annotations/")
    rows, names = [], {}
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        for line in read_lines(os.path.join(folder, "annotations", file)):
            if line.strip() and not line.startswith("#"):
                image, class_id = line.split()[:2]
                names[int(class_id)] = " ".join(w.title() for w in image.rsplit("_", 1)[0].split("_"))
                rows.append((f"oxford-iiit-pet/images/{image}.jpg", image, "", split, int(class_id)))
    rows = [(path, patient, view, split, names[class_id]) for path, patient, view, split, class_id in rows]
    return listed(rows, args.root, [names[k] for k in sorted(names)])


# ----------------------------------------------------------------------------------------
# Datasets as data: one row per dataset; finish() turns any parser's Raw into the final table

class Spec(NamedTuple):
    reader: object            # args -> Raw
    task: str                 # multilabel | multiclass
    channels: int             # stored channels (--channels overrides)
    size: int                 # default --size
    test_fraction: float      # held out as test where the dataset has no official test split
    valid_fraction: tuple     # default validation carve-out from train: (--split-by paper, patient)
    views: bool               # has X-ray views (--views applies)
    paper_split: str          # how the paper split it (shown in --help and the README)
    paper_renames: dict = {}  # --split-by paper: official split -> the paper's use of it
    image_split: bool = False  # --split-by paper splits over images (RandomState(42)), not patients
    pipeline: str = "bit"     # transfer.py's input pipeline for it as a target: bit | chest
    # A target the authors read as a torchvision dataset of PIL images: stored squashed with its
    # aspect (their bit transforms), k-shot subsets by their loader rule (fs.find_fewshot_indices);
    # else centre-cropped, and the per-class rule of their datasets that carry a labels array.
    bit_target: bool = False


DATASETS = {
    "chexpert": Spec(parse_chexpert, "multilabel", 1, 512, 0, (0, 0), True, "official train / valid"),
    "mimic": Spec(lambda a: parse_mimic(a, "jpg"), "multilabel", 1, 512, 0, (0, 0), True,
                  "official train / validate / test"),
    "mimic-dicom": Spec(lambda a: parse_mimic(a, "dcm"), "multilabel", 1, 512, 0, (0, 0), True,
                        "official train / validate / test (MIMIC-CXR DICOM files)"),
    "nih": Spec(parse_nih, "multilabel", 1, 512, 0, (0, 0.1), True,
                "official train_val / test lists; the paper validated on the test list"),
    "padchest": Spec(parse_padchest, "multilabel", 1, 512, 0.1, (0, 0.1), True,
                     "random 90/10 over images, seed 42; the held-out part is the target's test "
                     "and the source's validation", image_split=True, pipeline="chest"),
    "covidx": Spec(parse_covidx, "multiclass", 1, 512, 0, (0, 0), False, "official train / test", bit_target=True),
    "tuberculosis": Spec(parse_tuberculosis, "multiclass", 1, 512, 0.15, (0, 0), False,
                         "random 85/15 per folder (Shenzhen, Montgomery), seed 42", image_split=True, bit_target=True),
    "cifar10": Spec(parse_cifar, "multiclass", 3, 32, 0, (0, 0), False, "official train / test", bit_target=True),
    "cifar100": Spec(parse_cifar, "multiclass", 3, 32, 0, (0, 0), False, "official train / test", bit_target=True),
    "flowers102": Spec(parse_flowers102, "multiclass", 3, 512, 0, (0, 0), False,
                       "trains on the official test set (6,149), tests on train + val (2,040)",
                       paper_renames={"train": "test", "valid": "test", "test": "train"}, bit_target=True),
    "pets": Spec(parse_pets, "multiclass", 3, 512, 0, (0, 0), False, "official trainval / test", bit_target=True),
    "imagenet": Spec(parse_imagenet, "multiclass", 3, 256, 0, (0, 0), False, "official train / val"),
    "imagefolder": Spec(parse_imagefolder, "multiclass", 3, 512, 0.15, (0.1, 0.1), False,
                        "split folders if present, else by image", bit_target=True),
    "csv": Spec(parse_csv, "multilabel", 1, 512, 0.15, (0.1, 0.1), False,
                "the csv's split column if present, else by patient"),
}
SPLIT_RULES = ["paper", "patient"]
PAPER_SEED = 42          # the seed of the paper's random splits (PadChest, Tuberculosis)


def patient_split(patients, name, fraction, seed):
    """Seeded: a fraction of the patients, with all their rows, go to split `name`, the others
    to "train", so that no patient is on both sides."""
    unique = np.array(sorted(set(patients)))
    chosen = unique[np.random.default_rng(seed).permutation(len(unique))[:int(round(fraction * len(unique)))]]
    lookup = dict.fromkeys(unique, "train") | dict.fromkeys(chosen, name)
    return np.array([lookup[p] for p in patients], dtype=object)


def image_split(n, test_fraction, seed=PAPER_SEED):
    """The paper's random split over images (its padchest.py and tuberculosis.py): the row
    indices shuffled by np.random.RandomState(seed), the first int(n * (1 - test)) are train.
    Returns (split per row, the shuffled indices: the authors' order, their train set then test)."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    split = np.full(n, "test", dtype=object)
    split[order[:int(n * (1 - test_fraction))]] = "train"
    return split, order


def assign_splits(t, spec, args, test_fraction, valid_fraction):
    """The dataset's own split where it says one; the rest held out as test, over images per
    group where the paper did so (--split-by paper), else by patient; the paper's renames of
    official splits; then the validation carve-out from train, by patient. Returns (split per
    row, row order): the authors' dataset order where they split over images (per group, in
    turn, their shuffled order; transfer's k-shot subsets depend on it), else the table's."""
    todo = (t["split"] == "").to_numpy()
    split, order = t["split"].to_numpy().copy(), np.arange(len(t))
    if todo.any() and args.split_by == "paper" and spec.image_split:
        groups = (t["group"] if "group" in t else pd.Series("", index=t.index)).to_numpy()
        order = [np.flatnonzero(~todo)]
        for g in sorted(set(groups[todo])):
            rows = np.flatnonzero(todo & (groups == g))
            split[rows], shuffled = image_split(len(rows), test_fraction)
            order.append(rows[shuffled])
        order = np.concatenate(order)
    elif todo.any():
        split[todo] = patient_split(t["patient"][todo].to_numpy(), "test", test_fraction, args.seed)
    if args.split_by == "paper":
        split = np.array([s if new else spec.paper_renames.get(s, s) for s, new in zip(split, todo)], dtype=object)
    if valid_fraction:
        train = split == "train"
        split[train] = patient_split(t["patient"][train].to_numpy(), "valid", valid_fraction, args.seed)
        if not (split == "valid").any():  # small data: train without one rather than refuse
            print0(f"no validation split: --valid-fraction {valid_fraction:g} of {len(set(t['patient'][train]))} "
                   "training patients rounds to none")
    return split, order


def drop_listed_twice(table, dropped):
    """A file listed twice (also as ./x.png or a/../x.png) is kept once when its rows agree;
    rows that disagree (labels, split, patient) are a one-line error naming both."""
    key = table["path"].map(lambda p: os.path.normpath(str(p)))
    if not key.duplicated().any():
        return table
    distinct = table.drop(columns="path").astype(str).assign(_key=key.to_numpy()).drop_duplicates()
    clash = distinct["_key"].duplicated()
    if clash.any():
        rows = np.flatnonzero((key == distinct["_key"][clash].iloc[0]).to_numpy())[:2]
        raise UserError(f"{table['path'].iloc[rows[0]]!r} is listed twice with different labels or split "
                        f"(rows {rows[0] + 1} and {rows[1] + 1} of the label table)")
    dropped["listed twice"] = int(key.duplicated().sum())
    return table[~key.duplicated().to_numpy()]


def finish(raw, spec, args):
    """A parser's Raw -> (table, labels, dropped): views harmonised and filtered, splits assigned
    and rows in the order assign_splits gives, classes one-hot, `file` joined to the base folder.
    The table's index is the row of `raw.table` (CIFAR's in-memory images follow it)."""
    dropped = dict(raw.dropped)
    t = drop_listed_twice(raw.table.fillna({"path": ""}), dropped)   # an empty path: a reject (prepare)
    if spec.views:
        t["view"] = t["view"].fillna("").replace(VIEW_NAMES.get(args.dataset, {}))
        if "all" not in args.views:
            keep = t["view"].isin(args.views)
            dropped["view not in --views"] = int((~keep).sum())
            t = t[keep]
    test_fraction = spec.test_fraction if args.test_fraction is None else args.test_fraction
    valid_fraction = spec.valid_fraction[SPLIT_RULES.index(args.split_by)] if args.valid_fraction is None \
        else args.valid_fraction
    applies = {"--test-fraction": bool(test_fraction > 0 and (t["split"] == "").any()),  # rows without a split
               "--valid-fraction": valid_fraction > 0}
    t["split"], order = assign_splits(t, spec, args, test_fraction, valid_fraction)
    t = t.iloc[order]
    if t.empty:
        raise UserError("no image left to prepare (check --views and the label files)")
    for name, asked, flags in (("train", True, applies), ("test", test_fraction > 0, ["--test-fraction"])):
        if asked and not (t["split"] == name).any():
            hint = " / ".join(f for f in flags if applies[f])
            raise UserError(f"the {name} split is empty ({len(t)} images; "
                            + (f"check {hint})" if hint else "the dataset's own split gives none)"))
    labels = raw.labels
    if "label" in t:
        labels = labels or sorted(t["label"].unique())
        column = {c: i for i, c in enumerate(labels)}
        one_hot = np.eye(len(labels))[[column[c] for c in t["label"]]]
        t = pd.concat([t, pd.DataFrame(one_hot, columns=labels, index=t.index)], axis=1)
    t["file"] = [os.path.join(raw.base, p) for p in t["path"]]
    for reason, n in dropped.items():
        if n:
            print0(f"dropped: {n} rows ({reason})")
    return t, list(labels), dropped


# ----------------------------------------------------------------------------------------
# Image decoding: one file -> uint8 (size, size, channels)

# Compressed DICOM transfer syntaxes Pillow cannot decode, and the plugin that can.
DICOM_PLUGINS = {**{f"1.2.840.10008.1.2.4.{n}": "pylibjpeg-libjpeg" for n in (51, 57, 70, 80, 81)},
                 **{f"1.2.840.10008.1.2.4.{n}": "pylibjpeg-openjpeg" for n in (201, 202, 203)}}


def to_uint8(values, lo, hi):
    """The one intensity map: [lo, hi] -> [0, 255] linearly, rounded, clipped."""
    scaled = (np.asarray(values, np.float32) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def check_pixels(pixels, what):
    """Refuse an image that declares more pixels than the budget before decoding it, whatever its
    format: Pillow's MAX_IMAGE_PIXELS (89.5 Mpx), so that a small file never expands to GBs."""
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} of {pixels} pixels exceeds the budget of {Image.MAX_IMAGE_PIXELS} "
                         "(Pillow's MAX_IMAGE_PIXELS; possible decompression bomb)")


def read_dicom(path):
    """pydicom's dataset of `path`, pixels not decoded. pydicom inflates a deflated file whole,
    whatever its size: here it is inflated to at most 2 bytes per pixel of the budget (+ 16 MB)."""
    import pydicom
    from pydicom.filereader import read_dataset, read_file_meta_info
    try:
        meta = read_file_meta_info(path)
    except pydicom.errors.InvalidDicomError as e:
        raise ValueError(f"not a DICOM file ({e})")
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(path)
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 1 << 40) + (16 << 20)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    with open(path, "rb") as f:
        f.seek(132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0)))  # preamble, group length
        data = inflate.decompress(f.read(), limit)
    if inflate.unconsumed_tail:
        raise ValueError(f"deflated DICOM inflates beyond {limit} bytes, the pixel budget (possible "
                         "decompression bomb)")
    ds = read_dataset(pydicom.filebase.DicomBytesIO(data), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    return ds


def decode_dicom(path, channels):
    """DICOM -> (uint8 (H, W) or (H, W, 3), (H, W)), by the module docstring's rules."""
    ds = read_dicom(path)
    if "PixelData" not in ds:
        raise ValueError("DICOM file without pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    check_pixels(int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1) or 1)
                 * int(ds.get("SamplesPerPixel", 1)), "DICOM")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        plugin = DICOM_PLUGINS.get(str(syntax), "pylibjpeg-libjpeg or python-gdcm")
        if "Pillow does not support" in str(e) or str(syntax) in DICOM_PLUGINS or "missing dependencies" in str(e):
            raise ValueError(f"DICOM compression {getattr(syntax, 'name', syntax)} ({syntax}) needs a decoder plugin: "
                             f"pip install pylibjpeg {plugin}")
        raise ValueError(f"DICOM pixel data unreadable ({str(e).splitlines()[0]})")
    color = int(ds.get("SamplesPerPixel", 1)) == 3
    if pixels.ndim == (4 if color else 3):      # multi-frame: the first frame
        pixels = pixels[0]
    if color:
        return np.asarray(Image.fromarray(to_uint8(pixels, 0, 255)).convert("L" if channels == 1 else "RGB")), \
            pixels.shape[:2]
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
    """PNG/JPEG/... -> (uint8 (H', W') or (H', W', 3), original (H, W))."""
    with Image.open(path) as img:
        orig = (img.height, img.width)
        check_pixels(img.width * img.height, img.format or "image")
        if img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (size, size))
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            out = to_uint8(np.asarray(img), 0, 2 ** (bits or 16) - 1)
            return (out if channels == 1 else np.repeat(out[..., None], 3, 2)), orig
        if img.mode == "F":
            raise ValueError("floating-point images are not supported")
        return np.asarray(img.convert("L" if channels == 1 else "RGB")), orig


def load_image(path, size, channels, bits=None, squash=False):
    """One file -> (uint8 (size, size, channels), original (H, W)): the centre square, or with
    squash=True the whole image, resized. Raises on unreadable input."""
    dicom = path.lower().endswith((".dcm", ".dicom"))
    if not dicom:
        with open(path, "rb") as f:
            dicom = f.read(132)[128:] == b"DICM"
    pixels, orig = decode_dicom(path, channels) if dicom else decode_pillow(path, channels, size, bits)
    h, w = pixels.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    box = (0, 0, w, h) if squash else (left, top, left + s, top + s)
    out = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=box))
    return (out[..., None] if out.ndim == 2 else out), (int(orig[0]), int(orig[1]))


def reject_reason(e):
    if isinstance(e, FileNotFoundError):
        return "missing file"
    if isinstance(e, UnidentifiedImageError):
        return "not an image"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"truncated image ({text})" if "truncated" in text.lower() or isinstance(e, EOFError) else text


# ----------------------------------------------------------------------------------------
# Parallel, resumable conversion into OUT/.work, then compaction into the prepared folder

_worker = {}   # in a decoding process: the work array (memory-mapped), size, channels, squash


def _init_worker(images_path, size, channels, squash):
    _worker.update(images=np.load(images_path, mmap_mode="r+"), size=size, channels=channels, squash=squash)


def _init_pool_worker(*args):
    models.die_with_parent()   # an orphaned worker would go on holding OUT's folder lock
    for s in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill of the group: the main process stops the pool
        signal.signal(s, signal.SIG_IGN)
    _init_worker(*args)


def _convert(tasks):
    """Decode files straight into the shared memory map: [(row, original size, reject reason)]."""
    results = []
    for i, file, bits in tasks:
        try:
            pixels, orig = load_image(file, _worker["size"], _worker["channels"], bits, _worker["squash"])
        except Exception as e:  # a file that fails is a reject, never a crash of the run
            results.append((i, None, reject_reason(e)))
        else:
            _worker["images"][i] = pixels
            results.append((i, orig, None))
    return results


def file_stamp(path):
    """(size, mtime) of a file, None when missing: a rejected file is read again once this changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class WorkState:
    """OUT/.work: images.npy (all rows, memory-mapped), state.npz (done-mask, original sizes),
    rejects.json ({row: [reason, file stamp]}) and plan.json (what the work is for; another plan
    starts afresh). A row counts as converted only once the done-mask saying so is on disk."""

    def __init__(self, out, files, size, channels, squash=False):
        self.dir = os.path.join(out, ".work")
        self.images_path = os.path.join(self.dir, "images.npy")
        shape = (len(files), size, size, channels)
        plan = {"n": len(files), "size": size, "channels": channels,
                "files": hashlib.sha1("\n".join(files).encode()).hexdigest(), "squash": squash}
        old = None
        if os.path.exists(os.path.join(self.dir, "plan.json")):
            with open(os.path.join(self.dir, "plan.json")) as f:
                old = json.load(f)
        moved = os.path.join(out, "images.npy")
        if old == plan and not os.path.exists(self.images_path) and os.path.exists(moved) and \
                np.load(moved, mmap_mode="r").shape == shape:
            # A run killed after compact() moved the whole work array out, before meta.json:
            # the array goes back, and this run compacts and finishes again.
            os.replace(moved, self.images_path)
        if old == plan and os.path.exists(os.path.join(self.dir, "state.npz")) and os.path.exists(self.images_path):
            state = np.load(os.path.join(self.dir, "state.npz"))
            self.done, self.orig = state["done"].copy(), state["orig"].copy()
            with open(os.path.join(self.dir, "rejects.json")) as f:
                self.rejects = {int(k): v for k, v in json.load(f).items()}
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
            np.lib.format.open_memmap(self.images_path, "w+", np.uint8, shape).flush()
            self.done, self.orig, self.rejects = np.zeros(len(files), bool), np.zeros((len(files), 2), np.int32), {}
            self.save()
            with models.atomic_write(os.path.join(self.dir, "plan.json")) as f:
                json.dump(plan, f)

    def save(self):
        with models.atomic_write(os.path.join(self.dir, "rejects.json")) as f:
            json.dump(self.rejects, f)
        with models.atomic_write(os.path.join(self.dir, "state.npz"), "wb") as f:
            np.savez(f, done=self.done, orig=self.orig)

    def refresh(self, files, refused):
        """Rejected files that changed since are read again; `refused` rows are rejected unread."""
        changed = [i for i, (_, stamp) in self.rejects.items() if i not in refused and file_stamp(files[i]) != stamp]
        for i in changed:
            del self.rejects[i]
            self.done[i] = False
        if changed:
            print0(f"retry: {len(changed)} rejected files changed since they were rejected")
        for i, reason in refused.items():
            self.rejects[i], self.done[i] = [reason, None], True


def pool_results(todo, workers, init_args):
    """Results of _convert over `todo` from `workers` processes, as they come, with a bounded
    number of chunks of 4 in flight. A worker that dies (killed, out of memory) ends the run with a
    one-line error instead of a hang; what came back before is kept by the caller."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                                                  initargs=init_args)
    chunks = iter([todo[k:k + 4] for k in range(0, len(todo), 4)])
    pending = set()
    try:
        while True:
            while len(pending) < 4 * workers and (chunk := next(chunks, None)) is not None:
                pending.add(pool.submit(_convert, chunk))
            if not pending:
                return
            finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                yield from future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise UserError("a decoding process died (killed, e.g. out of memory); the images converted so far are "
                        "kept: run again to continue, with fewer --workers if memory is short")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def convert_all(table, out, size, channels, workers, refused=None, stop_after=None, squash=False):
    """Convert every row of `table` (columns file, optional bits) not yet done; resumable.
    `refused` ({row: reason}) are rejected without being read. `stop_after` (tests) stops after
    that many new images, as an interruption would. squash: see load_image."""
    files = table["file"].tolist()
    bits = table["bits"].tolist() if "bits" in table else [None] * len(files)
    state = WorkState(out, files, size, channels, squash)
    state.refresh(files, refused or {})
    todo = [(int(i), files[i], None if bits[i] is None else int(bits[i])) for i in np.flatnonzero(~state.done)]
    if state.done.any():
        print0(f"resume: {int(state.done.sum())} of {len(files)} images already converted")
    if workers > 1:
        results = pool_results(todo, workers, (state.images_path, size, channels, squash))
    else:
        _init_worker(state.images_path, size, channels, squash)
        results = (result for task in todo for result in _convert([task]))
    n, t0, last_save, new, rejected_now = len(files), time.time(), time.time(), 0, []
    bar = models.progress(n, int(state.done.sum()))
    try:
        for i, orig, reason in results:
            models.stop_point()
            if reason is None:
                state.orig[i] = orig
            else:
                state.rejects[i] = [reason, file_stamp(files[i])]
                rejected_now.append(i)
            state.done[i] = True
            new += 1
            if new == ALL_REJECTED_STOP and len(rejected_now) == new:  # a systematic cause: the rerun reads them again
                state.done[rejected_now] = False
                reason = state.rejects[rejected_now[0]][0]
                for j in rejected_now:
                    del state.rejects[j]
                raise UserError(f"the first {new} images read were all rejected ({files[rejected_now[0]]}: {reason}); "
                                "stopped before reading the rest: check the files under --root")
            bar.update(1)
            done = int(state.done.sum())
            if done % max(1, n // 10) == 0 or done == n:
                print0(f"convert: {done}/{n} images  rejects {len(state.rejects)}  "
                       f"{new / max(time.time() - t0, 1e-9):.1f} img/s")
            if time.time() - last_save > 5:
                if workers == 1:
                    _worker["images"].flush()
                state.save()
                last_save = time.time()
            if stop_after is not None and new >= stop_after:
                break
    finally:
        # Also on Ctrl-C or a dead worker: workers wrote into the shared file mapping, so
        # marking what came back as done is safe; anything in flight is redone on the next run.
        if workers > 1:
            results.close()
        else:
            _worker["images"].flush()
        _worker.clear()
        state.save()
        bar.close()
    return state


def compact(state, keep, out):
    """OUT/images.npy from the kept rows of the work array; with nothing to drop the work array
    itself is moved (WorkState moves it back if no meta.json follows)."""
    path = os.path.join(out, "images.npy")
    if keep.all():
        models.replace_file(state.images_path, path)
    else:
        src = np.load(state.images_path, mmap_mode="r")
        write_images(path, (int(keep.sum()),) + src.shape[1:], [(src, np.flatnonzero(keep))])


# ----------------------------------------------------------------------------------------
# Merge: several prepared folders -> one

def merge(inputs, out, label_mode="intersection"):
    """Concatenate prepared multilabel folders (same size and channels) into one pre-training
    source. Labels: the sorted intersection (the paper's rule, its 7 labels for CheXpert + MIMIC
    + NIH + PadChest), or with --labels union all of them, unknown (empty) where a source lacks
    one. Validation: each input's valid rows, or its test rows where it has no valid split (as
    the paper's merged source validated on each dataset's validation set). Paths and patient
    ids get the source's name as prefix so they stay unique."""
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
    print0(f"merge: {label_mode} of labels, kept {len(labels)}: {', '.join(labels)}")
    for d, m in zip(inputs, metas):
        gone = sorted(set(m["labels"]) - set(labels))
        print0(f"merge: {d}: dropped {len(gone)} labels" + (f": {', '.join(gone)}" if gone else ""))
    tables, arrays = [], []
    for d, m in zip(inputs, metas):
        t = read_labels_csv(d, m["labels"])
        arrays.append(open_images(d, m, len(t)))  # every input checked before anything is written
        name = m["name"] or os.path.basename(os.path.normpath(d))
        t["path"], t["patient"] = name + "/" + t["path"], name + "/" + t["patient"]
        if validation_split(t) == "test":
            print0(f"merge: {d} has no valid split; its test rows validate the merged source")
            t["split"] = t["split"].replace({"test": "valid"})
        for label in labels:
            t[label] = t[label] if label in t else np.nan
        tables.append(t[META_COLUMNS + [c for c in ROW_COLUMNS if c in t] + labels])
    table = pd.concat(tables, ignore_index=True)
    for column in [c for c in ROW_COLUMNS if c in table]:   # e.g. PadChest's scale; the default for the others
        table[column] = table[column].fillna(ROW_COLUMNS[column])
    size, channels = metas[0]["size"], metas[0]["channels"]
    os.makedirs(out, exist_ok=True)
    write_images(os.path.join(out, "images.npy"), (len(table), size, size, channels),
                 [(a, np.arange(len(a))) for a in arrays])
    write_labels_csv(out, table, labels)
    write_csv(os.path.join(out, "rejects.csv"), pd.DataFrame(columns=["path", "reason"]))
    report(table, labels, out)
    # Per-row original sizes are not kept; the median over images is approximated by the
    # median of the sources' medians weighted by their image counts.
    orig = np.repeat(np.array([m.get("orig_size", [size, size]) for m in metas]), [len(t) for t in tables], axis=0)
    write_meta(out, {"name": "+".join(m["name"] for m in metas), "size": size, "channels": channels,
                     "labels": labels, "task": "multilabel",
                     "orig_size": [int(v) for v in np.median(orig, axis=0)], "counts": counts(table),
                     "sources": [os.path.abspath(d) for d in inputs]})
    return table


# ----------------------------------------------------------------------------------------
# Synthetic raw data in the real on-disk layouts (the demo run)

DEMO_CHEXPERT_FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia",
                          "Pneumothorax", "Support Devices", "Lung Lesion", "Pleural Other"]


def ellipse(x, y, cx, cy, rx, ry):
    """< 1 inside the ellipse centred at (cx, cy) with radii (rx, ry)."""
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def blob(x, y, cx, cy, r):
    return np.exp(-ellipse(x, y, cx, cy, r, r))


def upsample(a, size):
    """Bilinear upsampling of a square array to (size, size), pixel centres aligned and edges
    held (as Pillow's BILINEAR), in elementwise numpy: the demo's images depend on no Pillow or
    torch version (the files' codecs aside: lossless PNG, and JPEG where the layout says .jpg)."""
    at = np.clip((np.arange(size) + 0.5) * len(a) / size - 0.5, 0, len(a) - 1)
    i = np.minimum(at.astype(int), len(a) - 2)
    f = at - i
    a = a[i] * (1 - f[:, None]) + a[i + 1] * f[:, None]
    return a[:, i] * (1 - f) + a[:, i + 1] * f


def synthetic_chest(rng, findings, size=112, lateral=False):
    """A chest-like grayscale uint8 image: two dark lung fields (one on a lateral view) crossed
    by ribs, bright mediastinum and heart, smooth lung texture, label-free patches on the soft
    tissue outside the lungs, noise, random brightness/contrast/shift; each finding of
    DEMO_CHEXPERT_FINDINGS and "Tuberculosis" drawn as its own pattern. Ribs and soft-tissue
    patches keep "something bright" from being enough for a model that learns from a few target
    images alone, so that pre-training on the sources is what helps."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    dx, dy = rng.uniform(-0.04, 0.04, 2)
    x, y = xx - dx, yy - dy
    lungs = [(0.5, 0.5, 0.27, 0.33)] if lateral else [(0.3, 0.5, 0.15, 0.32), (0.7, 0.5, 0.15, 0.32)]
    img = 0.6 - 0.15 * ((x - 0.5) / 0.5) ** 2                     # soft tissue, darker at the sides
    texture = upsample(rng.normal(0, 1, (16, 16)), size)
    in_lung = np.zeros((size, size), bool)
    for lung in lungs:
        in_lung |= ellipse(x, y, *lung) < 1
    img = np.where(in_lung, 0.2 + 0.04 * texture, img)
    if not lateral:                   # posterior ribs: bright arcs across both lungs, a random phase
        gap, phase, bend = rng.uniform(0.09, 0.12), rng.uniform(0, 0.12), rng.uniform(0.3, 0.6)
        ribs = np.abs(((y - phase - bend * (x - 0.5) ** 2) % gap) - gap / 2) < 0.012
        img = img + rng.uniform(0.1, 0.18) * (in_lung & ribs)
        img = np.where((np.abs(x - 0.5) < 0.05) & (y > 0.08) & (y < 0.75), 0.75, img)   # mediastinum
    heart = (0.2, 0.16) if "Cardiomegaly" in findings else (0.12, 0.11)
    img = np.where(ellipse(x, y, 0.4 if lateral else 0.55, 0.64, *heart) < 1, 0.72, img)
    for finding in findings:
        img = draw_finding(img, finding, rng, x, y, lungs)
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.5 else 0):
        # label-free fuzzy patches outside the lungs (soft tissue): a blob is a finding only where
        # it lies in a lung, which pre-training learns and a few target images cannot teach
        cx, cy = rng.uniform(0.05, 0.95, 2)
        while any(ellipse(cx, cy, *lung) < 1.3 for lung in lungs):
            cx, cy = rng.uniform(0.05, 0.95, 2)
        img = img + 0.3 * blob(x, y, cx, cy, 0.045)
    img = (img - 0.45) * rng.uniform(0.8, 1.2) + 0.45 + rng.uniform(-0.08, 0.08)
    return to_uint8(img + rng.normal(0, 0.03, img.shape), 0.0, 1.0)


def draw_finding(img, finding, rng, x, y, lungs):
    """`img` with one finding's pattern in a lung drawn at random (Cardiomegaly is the heart's size)."""
    cx, cy, rx, ry = lungs[rng.integers(len(lungs))]
    side = 1 if cx >= 0.5 else -1
    inside = ellipse(x, y, cx, cy, rx, ry) < 1
    if finding == "Effusion":         # bright meniscus at a lung base, rising laterally
        img = np.where(inside & (y > cy + 0.55 * ry - 0.8 * ry * np.clip((x - cx) * side / rx, 0, 1) ** 2), 0.7, img)
    elif finding == "Pneumothorax":   # dark rim without texture, with a visible pleural line
        r = ellipse(x, y, cx, cy - 0.05, rx * 0.7, ry * 0.8)
        img = np.where(inside & (r >= 1) & (y < cy + 0.1), 0.02, img)
        img = np.where(inside & (np.abs(r - 1) < 0.08) & (y < cy + 0.1), 0.45, img)
    elif finding == "Consolidation":  # one large dense homogeneous blob
        center = (cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(0, 0.15))
        img = img + 0.5 * inside * (blob(x, y, *center, 0.08) > 0.5)
    elif finding in ("Pneumonia", "Tuberculosis"):
        # fuzzy patches in the lower zones; Tuberculosis: fainter, in the upper zones, i.e. the
        # sources' Pneumonia pattern moved up, so that features learned there transfer
        level, sign, r = (0.3, 1, 0.04) if finding == "Pneumonia" else (0.22, -1, 0.045)
        for _ in range(4):
            center = (cx + rng.uniform(-0.08, 0.08), cy + sign * rng.uniform(0.0, 0.22))
            img = img + level * inside * blob(x, y, *center, r)
    elif finding == "Edema":          # bilateral perihilar streaks
        for lcx, lcy, lrx, lry in lungs:
            in_this_lung = ellipse(x, y, lcx, lcy, lrx, lry) < 1
            for k in range(4):
                img = img + 0.25 * in_this_lung * (np.abs(y - (lcy - 0.1 + 0.07 * k) - 0.3 * (x - lcx)) < 0.012)
    elif finding == "Atelectasis":    # bright horizontal band
        img = img + 0.4 * inside * (np.abs(y - cy - rng.uniform(0.05, 0.15)) < 0.02)
    elif finding == "Lung Lesion":    # small dense nodules
        for _ in range(3):
            nodule = (cx + rng.uniform(-0.07, 0.07), cy + rng.uniform(-0.2, 0.2), 0.02, 0.02)
            img = img + 0.45 * inside * (ellipse(x, y, *nodule) < 1)
    elif finding == "Pleural Other":  # bright rim along the lung edge
        r = ellipse(x, y, cx, cy, rx, ry)
        img = img + 0.35 * ((r > 0.55) & (r < 1.0) & ((x - cx) * side > 0))
    elif finding == "Support Devices":  # a tube and a pacemaker box
        img = np.where((np.abs(x - 0.47) < 0.008) & (y > 0.02) & (y < 0.55), 0.95, img)
        img = np.where((np.abs(x - 0.22) < 0.04) & (np.abs(y - 0.12) < 0.03), 0.95, img)
    return img


def save_chest(path, rng, findings, size, lateral=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(synthetic_chest(rng, findings, size, lateral)).save(path, quality=95)  # PNG ignores quality


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


def write_chexpert_raw(root, n, seed, image_size, p):
    """A CheXpert-style folder: root/CheXpert-v1.0-small/{train,valid}.csv with 1/0/-1/blank and
    root/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/view1_frontal.jpg (+ view2_lateral.jpg)."""
    rng = np.random.default_rng(seed)
    lines = {"train": [], "valid": []}
    count, patient = 0, 0
    while count < n:
        patient += 1
        split = "valid" if rng.random() < 0.1 else "train"
        for study in range(1, int(rng.integers(1, 3)) + 1):
            findings = [f for f in DEMO_CHEXPERT_FINDINGS if rng.random() < p]
            views = [("view1_frontal.jpg", "Frontal")]
            views += [("view2_lateral.jpg", "Lateral")] if rng.random() < 0.2 else []
            for name, frontal_lateral in views[:n - count]:
                rel = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study{study}/{name}"
                save_chest(os.path.join(root, rel), rng, findings, image_size, lateral=frontal_lateral == "Lateral")
                ap_pa = ("PA" if rng.random() < 0.3 else "AP") if frontal_lateral == "Frontal" else ""
                sex, age = "Female" if rng.random() < 0.5 else "Male", str(int(rng.integers(20, 90)))
                row = [rel, sex, age, frontal_lateral, ap_pa] + chexpert_report(rng, findings, split == "valid")
                lines[split].append(",".join(row))
                count += 1
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding"] + CHEXPERT_LABELS
    for split, rows in lines.items():
        with open(os.path.join(root, "CheXpert-v1.0-small", f"{split}.csv"), "w") as f:
            f.write(",".join(header) + "\n" + "".join(r + "\n" for r in rows))


def write_mimic_raw(root, n, seed, image_size, p):
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
            findings = [f for f in DEMO_CHEXPERT_FINDINGS if rng.random() < p]
            reports.append([str(subject), str(study)] + chexpert_report(rng, findings))
            views = ["PA" if rng.random() < 0.4 else "AP"] + (["LATERAL"] if rng.random() < 0.2 else [])
            for view in views[:n - len(meta)]:
                dicom = f"{rng.integers(16 ** 8):08x}-{rng.integers(16 ** 8):08x}"
                path = os.path.join(root, "files", f"p{str(subject)[:2]}", f"p{subject}", f"s{study}", dicom + ".jpg")
                save_chest(path, rng, findings, image_size, lateral=view == "LATERAL")
                meta.append([dicom, str(subject), str(study), "CHEST (PA AND LAT)", view] + [str(image_size)] * 2)
                split_rows.append([dicom, str(study), str(subject), split])
    for name, header, rows in (
            ("chexpert", ["subject_id", "study_id", "No Finding"] + CHEXPERT_LABELS, reports),
            ("metadata", ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "Rows", "Columns"], meta),
            ("split", ["dicom_id", "study_id", "subject_id", "split"], split_rows)):
        pd.DataFrame(rows, columns=header).to_csv(os.path.join(root, f"mimic-cxr-2.0.0-{name}.csv.gz"), index=False)


def write_tuberculosis_raw(root, n, seed, image_size):
    """Shenzhen/Montgomery-style target: ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png and
    MontgomerySet/CXR_png/MCUCXR_0001_1.png, balanced. No other findings: with few shots,
    source findings present in both classes would be what the pre-trained features see first
    (measured: few-shot AUC near 0.5)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 2
        prefix, folder = ("CHNCXR", "ChinaSet_AllFiles") if i < n * 2 // 3 else ("MCUCXR", "MontgomerySet")
        save_chest(os.path.join(root, folder, "CXR_png", f"{prefix}_{i + 1:04d}_{label}.png"), rng,
                   ["Tuberculosis"] if label else [], image_size)


def make_demo(raw_root, seed=0, n_chexpert=2000, n_mimic=1350, n_target=600, image_size=64):
    """Synthetic raw data for a no-download run, in the real layouts: raw_root/chexpert (holding
    CheXpert-v1.0-small), raw_root/mimic-cxr-jpg and raw_root/tuberculosis. CheXpert and MIMIC
    share the labeller and the findings, so CheXpert alone and CheXpert + MIMIC are two sources
    of different size with the same 13 labels (the first step of the paper's scale axis).
    Findings are more frequent than in the real sets (p 0.25) so that a few hundred steps of
    pre-training learn them. Frontal training images: CheXpert ~1,500, CheXpert + MIMIC ~2,500."""
    write_chexpert_raw(os.path.join(raw_root, "chexpert"), n_chexpert, seed + 1, image_size, p=0.25)
    write_mimic_raw(os.path.join(raw_root, "mimic-cxr-jpg"), n_mimic, seed + 3, image_size, p=0.25)
    write_tuberculosis_raw(os.path.join(raw_root, "tuberculosis"), n_target, seed + 2, image_size)
    return raw_root


# ----------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = models.ArgumentParser(description="Prepare a dataset: raw download -> images.npy + labels.csv + meta.json.",
                              memory_hint="--size or --workers")
    p.add_argument("--dataset", required=True, choices=list(DATASETS) + ["merge", "demo"], metavar="NAME",
                   help="one of: " + "; ".join(f"{k} ({s.task}, split: {s.paper_split})" for k, s in DATASETS.items())
                   + "; merge (prepared folders -> one, see --inputs); demo (synthetic raw folders written to --out)")
    p.add_argument("--root", help="raw dataset folder (as downloaded)")
    p.add_argument("--out", required=True, help="output folder (prepared dataset, or raw folders for demo)")
    p.add_argument("--size", type=models.SIDE, default=None,
                   help="side of the stored square images (default: 512, the BiT-HyperRule's resize before its 480 "
                        "crop; CIFAR its native 32, resized on the device; ImageNet 256)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="stored channels (default: 1 for X-rays and csv, 3 for natural images and imagefolder)")
    p.add_argument("--views", nargs="+", default=PRETRAIN_VIEWS,
                   help="views kept for the X-ray datasets, harmonised names (CheXpert lateral = L, PadChest "
                        "AP_horizontal = 'AP Supine', MIMIC ViewPosition as is); 'all' keeps every view. Prepare once "
                        "with the paper's five and pick per recipe at training time")
    p.add_argument("--split-by", choices=SPLIT_RULES, default="paper",
                   help="paper: the paper's splits (PadChest random 90/10 over images and Tuberculosis 85/15 per "
                        "folder, seed 42; Flowers-102 swapped; no validation carve-out from a target). patient: "
                        "stricter, for new studies: no patient in two splits, the official Flowers-102 split, and a "
                        "validation split by patient for NIH and PadChest")
    p.add_argument("--valid-fraction", type=models.number("[0, 1)"), default=None,
                   help="fraction of the training patients moved to 'valid' (default: none where the dataset has "
                        "an official validation split or is a target; 0.1 for NIH and PadChest with --split-by "
                        "patient, and for imagefolder/csv)")
    p.add_argument("--test-fraction", type=models.number("[0, 1)"), default=None,
                   help="fraction held out as 'test' where there is no official test split (default: PadChest 0.1, "
                        "Tuberculosis 0.15 per folder, imagefolder/csv 0.15)")
    p.add_argument("--seed", type=models.SEED, default=0,
                   help="seed of the patient-level splits and of the demo data (the paper's random splits: 42)")
    p.add_argument("--uncertain", choices=list(UNCERTAIN), default="ignore",
                   help="CheXpert/MIMIC/csv uncertain (-1) labels: ignore = unknown (masked), or map to 1 / 0")
    p.add_argument("--blank", choices=["ignore", "zeros"], default="ignore",
                   help="CheXpert/MIMIC blank (not mentioned) labels: unknown (masked) or 0")
    p.add_argument("--intensity", choices=["paper", "bits-stored"], default="paper",
                   help="PadChest's 16-bit PNGs, stored full range [0, 2^BitsStored - 1] either way: paper: the model "
                        "reads them as the authors did, value / 65535 (a 12-bit image stays dark; labels.csv column "
                        "scale); bits-stored: [0, 2^BitsStored - 1] -> [0, 1]")
    p.add_argument("--labels-csv", help="csv dataset: CSV with a path column (relative to --root) and label columns")
    p.add_argument("--task", choices=["multiclass", "multilabel"], default=None,
                   help="csv dataset: one class per image, or labels that may co-occur (default: names -> multiclass, "
                        "0/1 columns -> multilabel; required where each row has one 1 in one 0/1 column per class)")
    p.add_argument("--inputs", nargs="+", help="merge: prepared folders to combine")
    p.add_argument("--labels", choices=["intersection", "union"], default="intersection",
                   help="merge: the sorted intersection of the inputs' labels (the paper's rule), or the union "
                        "(unknown where a source lacks a label)")
    p.add_argument("--workers", type=models.number("[1, 1024]", int), default=min(8, os.cpu_count() or 1),
                   help="decoding processes (1 = in this process)")
    p.add_argument("--max-rejects", type=models.number("[0, 1]"), default=0.01,
                   help="fail (exit 2, dataset left incomplete and resumable) above this fraction of rejected images")
    p.add_argument("--strict", action="store_true", help="fail on any rejected image")
    p.add_argument("--dry-run", action="store_true",
                   help="read metadata only: write labels.csv and label_stats.csv (into OUT/.dry-run when OUT holds "
                        "a prepared dataset, which stays untouched), print the counts, convert nothing")
    p.add_argument("--download", action="store_true", help="CIFAR, Flowers-102, Pets: download into --root if absent")
    p.add_argument("--overwrite", action="store_true", help="rebuild an already prepared --out: the new dataset is "
                   "built in OUT/.rebuild and replaces the old one only once it is complete")
    return p


def check_args(args):
    models.check_out(args.out, {"--inputs": args.inputs, "--root": args.root, "--labels-csv": args.labels_csv})
    if args.dataset == "merge":
        if not args.inputs or len(args.inputs) < 2:
            raise UserError("merge needs --inputs with at least two prepared folders")
        models.check_distinct(args.inputs, "--inputs")
    elif args.dataset != "demo":
        if not args.root:
            raise UserError(f"--dataset {args.dataset} needs --root")
        if not os.path.isdir(args.root) and not (args.download and args.dataset in TORCHVISION):
            raise FileNotFoundError(f"--root {args.root} is not a folder")


ALL_REJECTED_STOP = 100  # images: when these first ones read are all rejected, the rest is not read
REBUILD = ".rebuild"  # an --overwrite build, beside the dataset it replaces once complete
DRY_RUN = ".dry-run"  # a dry run's tables beside a prepared dataset, which it leaves alone


def swap_in(build, out):
    """Replace OUT's dataset by the complete one in `build` (its meta.json written): OUT's
    meta.json goes first, so that OUT is not a dataset while its files are replaced, and the
    build's meta.json comes last. Every build writes every file of PREPARED_FILES, and each
    step can be repeated, so a run killed here is finished by the next (see main)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "meta.json"))
    for name in PREPARED_FILES:
        if os.path.exists(os.path.join(build, name)):
            os.replace(os.path.join(build, name), os.path.join(out, name))
    shutil.rmtree(build)


def main(args, stop_after=None):
    check_args(args)
    with models.folder_lock(args.out):
        if args.dataset == "demo":
            make_demo(args.out, seed=args.seed)
            print0(f"demo: raw folders written to {args.out}/chexpert, {args.out}/mimic-cxr-jpg, "
                   f"{args.out}/tuberculosis")
            return None
        if os.path.exists(os.path.join(args.out, REBUILD, "meta.json")):   # a killed run's complete rebuild
            print0(f"finishing the replacement of {args.out} by the complete rebuild in {args.out}/{REBUILD}")
            swap_in(os.path.join(args.out, REBUILD), args.out)
        build = args.out
        if os.path.exists(os.path.join(args.out, "meta.json")):
            if args.dry_run:
                build = os.path.join(args.out, DRY_RUN)
            elif not args.overwrite:
                raise UserError(f"{args.out} already holds a prepared dataset; pass --overwrite to rebuild it")
            else:
                build = os.path.join(args.out, REBUILD)
        table = prepare(args, build, stop_after)
        if build != args.out and os.path.exists(os.path.join(build, "meta.json")):
            swap_in(build, args.out)
        return table


def prepare(args, out, stop_after=None):
    """Build the dataset of args into `out` (--out, or the rebuild or dry-run folder beside it)."""
    if args.dataset == "merge":
        models.save_args(out, args)
        return merge(args.inputs, out, args.labels)
    if args.download and args.dataset in TORCHVISION:
        download(args)
    spec = DATASETS[args.dataset]
    raw = spec.reader(args)
    table, labels, dropped = finish(raw, spec, args)
    models.save_args(out, args)
    channels, size, task = args.channels or spec.channels, args.size or spec.size, raw.task or spec.task
    meta = {"name": args.dataset, "size": size, "channels": channels, "labels": labels, "task": task,
            "pipeline": spec.pipeline, "geometry": "squash" if spec.bit_target else "crop",
            "shot_rule": "loader" if spec.bit_target else "per_class", "split_by": args.split_by,
            **({"intensity": args.intensity} if "scale" in table else {})}
    if args.dry_run:
        write_labels_csv(out, table, labels)
        report(table, labels, out)
        print0(f"dry run: metadata only, no image converted; {out} is not a prepared dataset (no meta.json)")
        return table
    if raw.images is not None:                 # CIFAR: pixels already in memory
        images = raw.images[table.index.to_numpy()]
        if size != images.shape[1]:
            images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
        table = table.reset_index(drop=True)
        report(table, labels, out)
        write_csv(os.path.join(out, "rejects.csv"), pd.DataFrame(columns=["path", "reason"]))
        save_prepared(out, images, table, labels, task, args.dataset,
                      {**meta, "orig_size": list(raw.images.shape[1:3]), "counts": counts(table)})
        return table
    table = table.reset_index(drop=True)
    root = os.path.realpath(raw.base)
    refused = {i: "path outside the dataset root" for i, f in enumerate(table["file"])
               if os.path.commonpath([os.path.realpath(f), root]) != root}
    refused.update({i: "empty path" for i, p in enumerate(table["path"]) if not str(p).strip()})
    state = convert_all(table, out, size, channels, args.workers, refused, stop_after, spec.bit_target)
    if not state.done.all():
        print0(f"stopped: {int(state.done.sum())} of {len(table)} images converted; run again to continue")
        return None
    rejected = write_rejects(state, table, out, args)
    compact(state, ~rejected, out)
    if spec.bit_target:   # width / height of each squashed image, for transfer.py's crops
        table["aspect"] = np.round(state.orig[:, 1] / np.maximum(state.orig[:, 0], 1), 4)
    kept = table[~rejected].reset_index(drop=True)
    write_labels_csv(out, kept, labels)
    report(kept, labels, out)
    write_meta(out, {**meta, "orig_size": [int(v) for v in np.median(state.orig[~rejected], axis=0)],
                     "counts": {**counts(kept), "rejected": int(rejected.sum()), "dropped": dropped}})
    shutil.rmtree(state.dir, ignore_errors=True)
    return kept


def write_rejects(state, table, out, args):
    """rejects.csv, and a one-line error when more images were rejected than --max-rejects
    (--strict: any) allows; returns the rejected rows' mask."""
    rejected = np.zeros(len(table), bool)
    rejected[list(state.rejects)] = True
    rejects = pd.DataFrame({"path": table["path"][rejected],
                            "reason": [state.rejects[i][0] for i in np.flatnonzero(rejected)]})
    write_csv(os.path.join(out, "rejects.csv"), rejects)
    for r in rejects.head(20).itertuples():
        print0(f"reject: {r.path}: {r.reason}")
    print0(f"rejects: {int(rejected.sum())} of {len(table)} images (list in {out}/rejects.csv)")
    limit = 0 if args.strict else args.max_rejects
    if rejected.mean() > limit:
        raise UserError(f"{int(rejected.sum())} of {len(table)} images rejected ({rejected.mean():.2%} > "
                        f"{'--strict' if args.strict else f'--max-rejects {limit:.2%}'}); see {out}/rejects.csv. "
                        "Nothing is lost: fix or allow them and run again")
    return rejected


if __name__ == "__main__":
    models.run_cli(main, get_args_parser())
