"""Tiny prepared folders (prepare_data.py's output format) for the tests and the benchmarks: the
one writer, so that a change of the format is made in one place. The tests reach it through
the `prepared` fixture of conftest.py, the benchmarks by importing write_prepared."""
from pathlib import Path

import numpy as np
import pandas as pd

from prepare_data import save_prepared


def write_prepared(folder, n_train=12, n_eval=9, labels=("a", "b", "c"), task="multiclass", size=16,
                   seed=0, eval_split="test", views=("PA",)):
    """Write n_train + n_eval grayscale size x size images and their labels to `folder`; return
    it as a Path. A model can tell the labels apart: each image is dark noise with a bright left
    part whose width grows with the index of its first positive label.
    Multi-class: the labels take turns, so every class has the same count (+-1).
    Multi-label: random positives with 10% unknown cells, but the first 2 x len(labels) train
    rows and the first len(labels) eval rows have exactly one positive each, so every label has
    positives in both splits.
    Views: the rows take `views` in turn; the split is `eval_split` after the train rows
    (e.g. "valid", "test", or "train" for a folder without an evaluation split)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    n, c = n_train + n_eval, len(labels)
    if task == "multiclass":
        y = np.eye(c)[np.arange(n) % c]
    else:
        y = (rng.random((n, c)) < 0.5).astype(float)
        y[rng.random(y.shape) < 0.1] = np.nan
        one_each = min(2 * c, n_train)
        y[:one_each] = np.eye(c)[np.arange(one_each) % c]
        one_each = min(c, n_eval)
        y[n_train:n_train + one_each] = np.eye(c)[:one_each]
    images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    for i in range(n):
        images[i, :, : size * (1 + int(np.nan_to_num(y[i]).argmax())) // (c + 1)] += 150
    table = pd.DataFrame({"path": [f"im{i}.png" for i in range(n)], "patient": [str(i) for i in range(n)],
                          "view": [views[i % len(views)] for i in range(n)],
                          "split": ["train"] * n_train + [eval_split] * n_eval})
    for j, name in enumerate(labels):
        table[name] = y[:, j]
    save_prepared(str(folder), images, table, list(labels), task, name=folder.name,
                  extra_meta={"orig_size": [size, size]})
    return folder
