"""Turn raw dataset downloads into prepared datasets that training reads without decoding.

A prepared dataset is a folder:
    images.npy   uint8 array (N, S, S, C), C = 1 (X-rays) or 3 (natural images), memory-mapped
    labels.csv   row i describes images[i]: path, patient, view, split, then one column per
                 label holding 1, 0 or empty (unknown; masked in the loss)
    meta.json    {"name", "size", "channels", "labels", "task": "multilabel" | "multiclass", ...}
"""
import json
import os

import numpy as np
import pandas as pd
import torch

META_COLUMNS = ["path", "patient", "view", "split"]


# ----------------------------------------------------------------------------------------
# The prepared format: writer and reader

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
    table[META_COLUMNS + list(labels)].to_csv(os.path.join(out, "labels.csv"), index=False)
    meta = {"name": name, "size": int(images.shape[1]), "channels": int(images.shape[3]),
            "labels": list(labels), "task": task, **(extra_meta or {})}
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no meta.json); "
                                "run prepare_data.py first")
    with open(path) as f:
        return json.load(f)


class PreparedDataset(torch.utils.data.Dataset):
    """Rows of one split (or all rows) of a prepared folder. Indexing returns
    (uint8 tensor (S, S, C), float32 targets (L,) with NaN = unknown); `__getitems__`
    reads a whole batch with one fancy index into the memory map."""

    def __init__(self, folder, split=None):
        meta = read_meta(folder)
        self.folder, self.meta = folder, meta
        self.labels = meta["labels"]
        self.multilabel = meta["task"] == "multilabel"
        self.table = pd.read_csv(os.path.join(folder, "labels.csv"), dtype={"path": str, "patient": str,
                                                                          "view": str, "split": str},
                                 keep_default_na=False, na_values={l: [""] for l in self.labels})
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        rows = np.arange(len(self.table)) if split is None else np.flatnonzero(self.table["split"] == split)
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


def collate_batch(batch):
    """collate_fn for DataLoaders over PreparedDataset: `__getitems__` already made the batch."""
    return batch
