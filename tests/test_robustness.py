"""Issue 13, attacked: a careless or unlucky user's inputs and faults against every script.

Classes: two runs on one output folder; user data destroyed; silently wrong results; hangs and
exhaustion; tracebacks instead of one line. Each case asserts the exit status (2 for bad user
input or environment), one line naming the problem (no traceback), and that no prepared
folder, results row, model or input file is lost or corrupt.

Runs that race, get killed, may hang or may exhaust memory are separate processes
(`python script.py ...`, with a timeout and, where memory is at stake, an address-space
limit). The other cases call the same command line in-process through models.run_cli (argv
in, exit status and stderr out; an exception escaping run_cli is what a subprocess would show
as a traceback), which keeps some seventy cases within a few minutes on two cores.
Where the fix has design freedom (message wording, lock file name) only the essentials are
asserted: status, one line, a key word.
"""
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fewshot  # noqa: E402
import models  # noqa: E402
import prepare_data as P  # noqa: E402
import pretrain  # noqa: E402
import transfer  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SCRIPTS = {"prepare": P, "pretrain": pretrain, "transfer": transfer, "fewshot": fewshot}
TRANSFER_TINY = ["--model", "R14x1", "--resize", "20", "--crop", "16", "--batch-size", "4",
                 "--steps", "2", "--log-every", "1", "--bootstrap", "20", "--dtype", "fp32"]
PRETRAIN_TINY = ["--model", "R14x1", "--image-size", "16", "--batch-size", "4", "--epochs", "1",
                 "--warmup-steps", "1", "--dtype", "fp32", "--workers", "0", "--save-every", "1",
                 "--log-every", "1", "--allow-any-schedule"]  # a few steps never reach the recipe's decays
MEMORY_LIMIT = 6 << 30  # address space of runs that could blow up (torch alone maps ~3 GiB)


# ----------------------------------------------------------------------------------------
# Running the scripts

class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self):
        return f"exit {self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


def run(script, *argv):
    """The script's command line in-process: Result(exit status, stdout, stderr); an exception
    that escapes run_cli becomes status 'traceback' with the exception in stderr."""
    module = SCRIPTS[script]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            models.run_cli(module.main, module.get_args_parser(), [str(a) for a in argv])
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - what a subprocess would print as a traceback
            rc = "traceback"
            err.write(f"Traceback (in-process): {type(e).__name__}: {e}\n")
    return Result(rc, out.getvalue(), err.getvalue())


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def start(script, *argv, memory_limit=False):
    """The script as a separate process in its own session (so that it and its workers can be
    killed together)."""
    return subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *map(str, argv)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=limit_memory if memory_limit else None)


def finish(proc, timeout):
    """Result of a started process; a process still running after `timeout` s is killed with
    its whole session and reported as status 'hang'."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Result("hang", out, err)


def wait_for_line(proc, pattern, timeout=60):
    """Read proc's stdout until a line matches `pattern`; the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r}; rc {proc.poll()} stdout:\n{''.join(lines)}"
                         f"\nstderr:\n{proc.stderr.read() if proc.poll() is not None else ''}")


@contextlib.contextmanager
def stopped(proc):
    """proc (and its workers) paused with SIGSTOP inside the block: alive, owning whatever it
    owns, doing nothing; resumed after."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def kill_session(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def assert_one_line_error(r, status=2, *words):
    """Exit `status`, exactly one line on stderr, no traceback, and one of `words` in it."""
    lines = r.err.strip().splitlines()
    assert r.rc == status and len(lines) == 1 and "Traceback" not in r.err, r
    if words:
        assert any(w.lower() in lines[0].lower() for w in words), (words, r)


def assert_refused_as_busy(r):
    assert_one_line_error(r, 2, "in use", "locked")


# ----------------------------------------------------------------------------------------
# Fixtures in real formats

def snapshot(folder):
    """{relative path: sha1} of every file under folder (symlinks not followed)."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out[os.path.relpath(path, folder)] = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    return out


def make_prepared(folder, labels=("a", "b"), task="multiclass", n=(12, 4, 6), size=16, seed=0):
    """A tiny prepared dataset with train / valid / test rows; classes differ by brightness."""
    rng = np.random.default_rng(seed)
    total = sum(n)
    y = np.eye(len(labels))[np.arange(total) % len(labels)]
    images = rng.integers(0, 60, (total, size, size, 1)).astype(np.uint8)
    images += (120 * y.argmax(1)).astype(np.uint8)[:, None, None, None]
    table = pd.DataFrame({"path": [f"im{i}.png" for i in range(total)],
                          "patient": [str(i) for i in range(total)], "view": "PA",
                          "split": ["train"] * n[0] + ["valid"] * n[1] + ["test"] * n[2]})
    for j, name in enumerate(labels):
        table[name] = y[:, j]
    P.save_prepared(str(folder), images, table, list(labels), task, name=Path(folder).name,
                    extra_meta={"orig_size": [size, size]})
    return folder


def assert_prepared_consistent(folder, n=None, size=None):
    """meta.json, labels.csv and images.npy agree with each other (and with n and size)."""
    ds = P.PreparedDataset(str(folder))
    images = np.load(Path(folder) / "images.npy")
    assert len(ds.table) == len(images) == (n if n is not None else len(images))
    assert images.shape[1] == images.shape[2] == ds.meta["size"] == (size or ds.meta["size"])
    return ds


def write_png(path, size=24, value=None, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size), np.uint8) if value is None else np.full((size, size), value, np.uint8)
    Image.fromarray(pixels).save(path)


def csv_root(tmp_path, n=8, labels_name="labels.csv", image_size=24):
    """A --dataset csv input: root/img{i}.png and root/LABELS_NAME (path, finding)."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(n):
        write_png(root / f"img{i}.png", image_size, seed=i)
    pd.DataFrame({"path": [f"img{i}.png" for i in range(n)], "finding": [i % 2 for i in range(n)]}).to_csv(
        root / labels_name, index=False)
    return root


def prepare_csv_args(root, out, labels_csv=None, *extra):
    return ["--dataset", "csv", "--root", root, "--labels-csv", labels_csv or root / "labels.csv",
            "--out", out, "--size", "8", "--workers", "1", *extra]


def weights_file(path, seed=0, nan=False):
    torch.manual_seed(seed)
    state = models.create_model("R14x1", 2).state_dict()
    if nan:
        state["root.conv.weight"].fill_(float("nan"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


def chexpert_root(tmp_path, cell):
    """CheXpert-v1.0-small/{train,valid}.csv (real header and coding, no images: --dry-run)
    with `cell` in the Edema column of the first train row."""
    folder = tmp_path / "chexpert" / "CheXpert-v1.0-small"
    folder.mkdir(parents=True)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding"] + P.CHEXPERT_LABELS
    for split, rows in (("train", 6), ("valid", 2)):
        lines = []
        for i in range(rows):
            cells = ["0.0"] * len(P.CHEXPERT_LABELS)
            cells[P.CHEXPERT_LABELS.index("Edema")] = cell if (split, i) == ("train", 0) else str(float(i % 2))
            lines.append(",".join([f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg",
                                   "Male", "50", "Frontal", "PA", ""] + cells))
        (folder / f"{split}.csv").write_text(",".join(header) + "\n" + "\n".join(lines) + "\n")
    return folder.parent


def padchest_root(tmp_path, bits):
    root = tmp_path / "padchest"
    (root / "0").mkdir(parents=True)
    rows = []
    for i, b in enumerate([12, 12, 12, 12, 12, 12, bits]):
        name = f"img{i}.png"
        Image.fromarray(np.full((20, 20), 300 * (i + 1), np.uint16)).save(root / "0" / name)
        rows.append({"ImageID": name, "ImageDir": 0, "PatientID": f"p{i}", "Projection": "PA",
                     "Labels": "['pleural effusion']" if i % 2 else "['normal']", "BitsStored_DICOM": b})
    with gzip.open(root / P.PADCHEST_CSV, "wt") as f:
        pd.DataFrame(rows).to_csv(f)
    return root


def tuberculosis_root(tmp_path, loops):
    root = tmp_path / "tb"
    png = root / "ChinaSet_AllFiles" / "CXR_png"
    png.mkdir(parents=True)
    for i in range(4):
        write_png(png / f"CHNCXR_{i + 1:04d}_{i % 2}.png", 16, seed=i)
    os.symlink("..", png / "up")
    if loops > 1:
        os.symlink(".", png / "here")
    return root


def mimic_root(tmp_path):
    root = tmp_path / "mimic"
    root.mkdir()
    chex = pd.DataFrame({"subject_id": [10000001], "study_id": [50000001], "No Finding": [1.0],
                         **{c: [np.nan] for c in P.CHEXPERT_LABELS}})
    meta = pd.DataFrame({"dicom_id": ["d1"], "subject_id": [10000001], "study_id": [50000001],
                         "ViewPosition": ["PA"]})
    split = pd.DataFrame({"dicom_id": ["d1"], "subject_id": [10000001], "study_id": [50000001],
                          "split": ["train"]})
    for name, t in (("chexpert", chex), ("metadata", meta), ("split", split)):
        t.to_csv(root / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False, compression="gzip")
    return root


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


# ----------------------------------------------------------------------------------------
# Module-wide runs reused by several cases (copied before a case changes them)

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("target") / "toy")


@pytest.fixture(scope="module")
def finished_pretrain(tmp_path_factory):
    """A finished tiny pre-training (checkpoint.pt, model.pt, args.json) and its data."""
    base = tmp_path_factory.mktemp("pretrain")
    data = make_prepared(base / "data", task="multilabel")
    r = run("pretrain", "--data", data, "--out", base / "run", *PRETRAIN_TINY)
    assert r.rc == 0 and (base / "run" / "model.pt").exists(), r
    return data, base / "run"


# ----------------------------------------------------------------------------------------
# 1. Two runs on one output folder: the folder belongs to the first; the second exits 2

@pytest.mark.parametrize("second", ["other-size", "overwrite"])
def test_second_prepare_on_a_busy_out_is_refused(tmp_path, second):
    root = csv_root(tmp_path, n=40)
    out = tmp_path / "out"
    a = start("prepare_data", *prepare_csv_args(root, out))
    try:
        wait_for_line(a, r"^convert: ")
        with stopped(a):
            extra = ["--size", "12"] if second == "other-size" else ["--overwrite"]
            b = run("prepare", *prepare_csv_args(root, out), *extra)
        ra = finish(a, 120)
    finally:
        kill_session(a)
    assert_refused_as_busy(b)
    assert ra.rc == 0, ra
    assert_prepared_consistent(out, n=40, size=8)


@pytest.mark.parametrize("second", ["fresh", "resume"])
def test_second_pretrain_on_a_busy_out_is_refused(tmp_path, target, second):
    out = tmp_path / "run"
    argv = ["--data", target, "--out", out, *PRETRAIN_TINY, "--epochs", "3", "--seed", "0"]
    a = start("pretrain", *argv)
    try:
        wait_for_line(a, r"^step 1/")
        with stopped(a):
            b = run("pretrain", "--data", target, "--out", out, *PRETRAIN_TINY, "--epochs", "3",
                    "--lr", "0.1", "--seed", "5", *(["--resume"] if second == "resume" else []))
        ra = finish(a, 120)
    finally:
        kill_session(a)
    assert_refused_as_busy(b)
    assert ra.rc == 0, ra
    saved = json.loads((out / "args.json").read_text())
    assert saved["seed"] == 0 and saved["lr"] == pretrain.RECIPES["paper"]["lr"]  # the first run's
    assert models.load_checkpoint(out / "model.pt")["args"]["seed"] == 0


def test_concurrent_grids_appending_to_one_results_file_lose_no_row(tmp_path, target):
    """Two linear-probe grids (different --out, one --results) append rows at the same time."""
    results = tmp_path / "results.csv"
    seeds = [list(range(0, 15)), list(range(100, 115))]
    procs = [start("fewshot", "--data", target, "--out", tmp_path / f"grid{g}", "--results", results,
                   "--linear-probe", "--shots", "1", "2", "--seeds", *seeds[g], *TRANSFER_TINY,
                   "--bootstrap", "0", "--probe-iters", "5") for g in range(2)]
    runs = [finish(p, 180) for p in procs]
    assert all(r.rc == 0 for r in runs), runs
    df = pd.read_csv(results, dtype=str, keep_default_na=False)
    assert len(df) == 60 and len(df.drop_duplicates(["shots", "seed"])) == 60, len(df)


def test_out_of_a_killed_prepare_is_taken_over_by_the_rerun(tmp_path):
    root = csv_root(tmp_path, n=40)
    out = tmp_path / "out"
    a = start("prepare_data", *prepare_csv_args(root, out))
    wait_for_line(a, r"^convert: ")
    kill_session(a)  # the owner is gone: its lock (if any) must not block the rerun
    r = run("prepare", *prepare_csv_args(root, out))
    assert r.rc == 0, r
    assert_prepared_consistent(out, n=40, size=8)


# ----------------------------------------------------------------------------------------
# 2. User data destroyed: inputs are never outputs; --overwrite builds beside and swaps

@pytest.mark.parametrize("where", ["equal", "inside"])
def test_out_equal_to_or_inside_root_is_refused(tmp_path, where):
    root = csv_root(tmp_path)
    before = snapshot(root)
    r = run("prepare", *prepare_csv_args(root, root if where == "equal" else root / "prepared"))
    assert_one_line_error(r, 2, "root", "input", "inside")
    assert snapshot(root) == before


@pytest.mark.parametrize("out", ["input", "input+overwrite", "inside-input"])
def test_merge_into_one_of_its_inputs_is_refused(tmp_path, out):
    a = make_prepared(tmp_path / "a", task="multilabel")
    b = make_prepared(tmp_path / "b", task="multilabel", seed=1)
    before = snapshot(a)
    dest = {"input": a, "input+overwrite": a, "inside-input": a / "merged"}[out]
    r = run("prepare", "--dataset", "merge", "--inputs", a, b, "--out", dest,
            *(["--overwrite"] if "overwrite" in out else []))
    assert_one_line_error(r, 2)
    assert snapshot(a) == before


def overwrite_attempt(tmp_path, how):
    """A finished dataset in OUT, then a rebuild with --overwrite that fails `how`."""
    root = csv_root(tmp_path, n=30)
    out = tmp_path / "out"
    assert run("prepare", *prepare_csv_args(root, out)).rc == 0
    kept = {k: v for k, v in snapshot(out).items() if k in ("meta.json", "images.npy", "labels.csv")}
    if how == "bad-labels-csv":
        pd.DataFrame({"file": ["img0.png"], "finding": [1]}).to_csv(tmp_path / "bad.csv", index=False)
        r = run("prepare", *prepare_csv_args(root, out, tmp_path / "bad.csv"), "--overwrite")
        assert r.rc == 2, r
    elif how == "too-many-rejects":
        t = pd.read_csv(root / "labels.csv")
        t.loc[len(t)] = ["gone.png", 1]
        t.to_csv(tmp_path / "more.csv", index=False)
        r = run("prepare", *prepare_csv_args(root, out, tmp_path / "more.csv"), "--overwrite")
        assert r.rc == 2, r
    else:  # killed half-way
        p = start("prepare_data", *prepare_csv_args(root, out), "--size", "12", "--overwrite")
        try:
            wait_for_line(p, r"^convert: ")
        finally:
            kill_session(p)
    return out, kept


@pytest.mark.parametrize("how", ["bad-labels-csv", "too-many-rejects", "killed"])
def test_failed_overwrite_keeps_the_old_dataset(tmp_path, how):
    out, kept = overwrite_attempt(tmp_path, how)
    assert {k: v for k, v in snapshot(out).items() if k in kept} == kept
    assert_prepared_consistent(out, n=30, size=8)


def test_a_kill_in_the_middle_of_the_overwrite_swap_is_finished_by_the_rerun(tmp_path, monkeypatch):
    root = csv_root(tmp_path, n=10)
    out = tmp_path / "out"
    assert run("prepare", *prepare_csv_args(root, out)).rc == 0
    moves, replace = [], os.replace

    def killed_after_two(src, dst):  # the swap's third move of a file into OUT never happens
        if os.path.dirname(dst) == str(out) and os.path.basename(src) in P.PREPARED_FILES:
            if len(moves) == 2:
                raise SystemExit(137)
            moves.append(dst)
        replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_after_two)
        run("prepare", *prepare_csv_args(root, out), "--size", "12", "--overwrite")
    assert len(moves) == 2 and not (out / "meta.json").exists()
    r = run("prepare", *prepare_csv_args(root, out), "--size", "8")  # any run on OUT finishes the swap
    assert_one_line_error(r, 2, "already holds")
    assert "finishing" in r.out and not (out / P.REBUILD).exists(), r
    assert_prepared_consistent(out, n=10, size=12)


def test_second_grid_on_a_busy_out_is_refused(tmp_path, target):
    out = tmp_path / "grid"
    with models.folder_lock(out):  # a grid that is running
        r = run("fewshot", "--data", target, "--out", out, *TRANSFER_TINY, "--shots", "1", "--seeds", "0")
    assert_refused_as_busy(r)
    assert not (out / "results.csv").exists()


def test_dry_run_with_overwrite_touches_nothing(tmp_path):
    root = csv_root(tmp_path)
    out = tmp_path / "out"
    assert run("prepare", *prepare_csv_args(root, out)).rc == 0
    kept = {k: v for k, v in snapshot(out).items() if k in ("meta.json", "images.npy", "labels.csv")}
    r = run("prepare", *prepare_csv_args(root, out), "--dry-run", "--overwrite")
    assert r.rc == 0, r
    assert {k: v for k, v in snapshot(out).items() if k in kept} == kept


@pytest.mark.parametrize("script", ["transfer", "pretrain"])
def test_training_out_equal_to_the_data_folder_is_refused(tmp_path, script):
    data = make_prepared(tmp_path / "data")
    (data / "args.json").write_text('{"made by": "prepare_data.py"}')
    before = snapshot(data)
    tiny = TRANSFER_TINY if script == "transfer" else PRETRAIN_TINY
    r = run(script, "--data", data, "--out", data, *tiny)
    assert_one_line_error(r, 2, "data", "input")
    assert snapshot(data) == before


# ----------------------------------------------------------------------------------------
# 3. Silently wrong results

def result_rows(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False) if os.path.exists(path) else pd.DataFrame()


def metric_rows(path):
    """Rows of a results CSV that carry a finite headline metric."""
    df = result_rows(path)
    if df.empty:
        return df
    values = pd.concat([pd.to_numeric(df[c], errors="coerce") for c in ("accuracy", "auc")], axis=1)
    return df[np.isfinite(values.to_numpy(np.float64)).any(1)]


@pytest.mark.parametrize("how", ["nan-weights", "diverging-lr"])
def test_nonfinite_finetune_is_recorded_as_a_failure_not_a_metric_row(tmp_path, target, how):
    init = weights_file(tmp_path / "w" / "model.pt", nan=how == "nan-weights")
    lr = ["--lr", "1e30"] if how == "diverging-lr" else []
    r = run("transfer", "--data", target, "--init", init, "--out", tmp_path / "t", *TRANSFER_TINY,
            "--steps", "4", *lr)
    assert r.rc != 0 and "Traceback" not in r.err, r
    assert "non-finite" in (r.out + r.err).lower(), r
    assert metric_rows(tmp_path / "t" / "results.csv").empty


def test_fewshot_grid_goes_on_after_a_nonfinite_run(tmp_path, target):
    init = weights_file(tmp_path / "w" / "model.pt", nan=True)
    r = run("fewshot", "--data", target, "--init", init, "--out", tmp_path / "f", "--shots", "1",
            "--seeds", "0", "1", *TRANSFER_TINY)
    text = (r.out + r.err).lower()
    assert "traceback" not in text and "non-finite" in text, r
    assert "seed=0" in r.out and "seed=1" in r.out, r  # the second run was tried
    assert metric_rows(tmp_path / "f" / "results.csv").empty


def test_two_weight_files_in_one_folder_are_two_results(tmp_path, target):
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        r = run("transfer", "--data", target, "--init", weights_file(tmp_path / "runs" / name, seed),
                "--out", tmp_path / "t", *TRANSFER_TINY)
        assert r.rc == 0 and "skip" not in r.out, r
    df = result_rows(tmp_path / "t" / "results.csv")
    assert len(df) == 2 and df["source"].nunique() == 2, df


@pytest.mark.parametrize("name", ["NA", "007"])
def test_result_keys_are_read_back_as_text(tmp_path, target, name):
    argv = ["--data", target, "--out", tmp_path / "t", "--source", name, "--target", name, *TRANSFER_TINY]
    assert run("transfer", *argv).rc == 0
    r = run("transfer", *argv)
    assert r.rc == 0 and "skip" in r.out, r
    df = result_rows(tmp_path / "t" / "results.csv")
    assert len(df) == 1 and df["source"].tolist() == [name] and df["target"].tolist() == [name], df


def assert_rejected_or_named(r, out, path, *words):
    """A bad metadata value: a one-line error naming it (exit 2), or its row left out."""
    if r.rc == 2:
        assert_one_line_error(r, 2, *words)
    else:
        assert r.rc == 0, r
        assert path not in set(pd.read_csv(out / "labels.csv", dtype=str)["path"]), r


@pytest.mark.parametrize("cell", ["2.0", "-2", "yes"])
def test_chexpert_cell_outside_its_coding(tmp_path, cell):
    root = chexpert_root(tmp_path, cell)
    out = tmp_path / "out"
    r = run("prepare", "--dataset", "chexpert", "--root", root, "--out", out, "--dry-run")
    assert_rejected_or_named(r, out, "CheXpert-v1.0-small/train/patient00000/study1/view1_frontal.jpg", "Edema")


@pytest.mark.parametrize("columns", ["one", "two"])
def test_stray_value_in_a_binary_csv_column(tmp_path, columns):
    root = csv_root(tmp_path)
    t = pd.read_csv(root / "labels.csv", dtype=str)
    if columns == "two":
        t["effusion"] = ["1", "0"] * 4
    t.loc[3, "effusion" if columns == "two" else "finding"] = "2"
    t.to_csv(tmp_path / "stray.csv", index=False)
    out = tmp_path / "out"
    r = run("prepare", *prepare_csv_args(root, out, tmp_path / "stray.csv"), "--dry-run")
    assert_rejected_or_named(r, out, "img3.png", "effusion" if columns == "two" else "finding")


@pytest.mark.parametrize("bits", [0, 40])
def test_padchest_bits_stored_out_of_range(tmp_path, bits):
    root = padchest_root(tmp_path, bits)
    out = tmp_path / "out"
    r = run("prepare", "--dataset", "padchest", "--root", root, "--out", out, "--size", "8",
            "--workers", "1", "--max-rejects", "0.5", "--valid-fraction", "0", "--test-fraction", "0")
    assert_rejected_or_named(r, out, "0/img6.png", "BitsStored")
    if r.rc == 0:
        assert "bitsstored" in (out / "rejects.csv").read_text().lower()


def test_symlink_loop_lists_every_image_once(tmp_path):
    out = tmp_path / "out"
    r = run("prepare", "--dataset", "tuberculosis", "--root", tuberculosis_root(tmp_path, 1), "--out", out,
            "--dry-run")
    assert r.rc == 0, r
    assert len(pd.read_csv(out / "labels.csv")) == 4


def test_two_symlink_loops_do_not_hang_a_dry_run(tmp_path):
    out = tmp_path / "out"
    p = start("prepare_data", "--dataset", "tuberculosis", "--root", tuberculosis_root(tmp_path, 2),
              "--out", out, "--dry-run", memory_limit=True)
    r = finish(p, 30)
    assert r.rc == 0, r
    assert len(pd.read_csv(out / "labels.csv")) == 4


@pytest.mark.parametrize("spelling", ["img0.png", "./img0.png"])
def test_a_file_listed_twice_is_listed_once(tmp_path, spelling):
    root = csv_root(tmp_path)
    t = pd.read_csv(root / "labels.csv", dtype=str)
    t.loc[len(t)] = [spelling, "0"]
    t.to_csv(tmp_path / "twice.csv", index=False)
    out = tmp_path / "out"
    r = run("prepare", *prepare_csv_args(root, out, tmp_path / "twice.csv"), "--dry-run")
    if r.rc == 2:
        assert_one_line_error(r, 2, "img0.png")
    else:
        assert r.rc == 0, r
        paths = pd.read_csv(out / "labels.csv", dtype=str)["path"].map(os.path.normpath)
        assert paths.is_unique and len(paths) == 8, paths


@pytest.mark.parametrize("change", ["lr", "model", "labels"])
def test_resume_with_changed_arguments_is_refused(tmp_path, finished_pretrain, change):
    data, done = finished_pretrain
    out = tmp_path / "run"
    shutil.copytree(done, out)
    before = snapshot(out)
    argv = ["--data", data, "--out", out, *PRETRAIN_TINY, "--resume"]
    if change == "lr":
        argv += ["--lr", "0.5"]
    elif change == "model":
        argv += ["--model", "R26x1"]
    else:
        argv[1] = make_prepared(tmp_path / "other", labels=("a", "c"), task="multilabel")
    r = run("pretrain", *argv)
    assert_one_line_error(r, 2, change if change != "labels" else "label", "data")
    assert snapshot(out) == before


@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_a_rejected_file_that_was_fixed_is_read_again(tmp_path, fault):
    root = csv_root(tmp_path)
    if fault == "truncated":
        truncate(root / "img5.png", 0.3)
    else:
        (root / "img5.png").unlink()
    out = tmp_path / "out"
    r = run("prepare", *prepare_csv_args(root, out))
    assert r.rc == 2 and "rejected" in r.err, r
    write_png(root / "img5.png", 24, seed=5)  # the fix the message asks for
    r = run("prepare", *prepare_csv_args(root, out))
    assert r.rc == 0, r
    ds = assert_prepared_consistent(out, n=8)
    assert "img5.png" in set(ds.table["path"])


def test_label_value_outside_0_1_in_a_prepared_folder(tmp_path):
    data = make_prepared(tmp_path / "data")
    t = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    t.loc[2, "a"] = "2"
    t.to_csv(data / "labels.csv", index=False)
    r = run("transfer", "--data", data, "--out", tmp_path / "t", *TRANSFER_TINY)
    assert_one_line_error(r, 2, "labels.csv")


def test_meta_size_that_disagrees_with_images(tmp_path):
    data = make_prepared(tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    meta["size"] = 32
    (data / "meta.json").write_text(json.dumps(meta))
    r = run("transfer", "--data", data, "--out", tmp_path / "t", *TRANSFER_TINY)
    assert_one_line_error(r, 2, "size", "images.npy")


def test_a_split_left_empty_is_an_error(tmp_path):
    root = csv_root(tmp_path, n=3)
    r = run("prepare", *prepare_csv_args(root, tmp_path / "out"), "--dry-run")
    assert_one_line_error(r, 2, "empty", "valid", "test")


# ----------------------------------------------------------------------------------------
# 4. Hangs and exhaustion

def worker_pids(proc):
    """Processes forked by proc that run its own command line (its decoding workers)."""
    own = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == proc.pid and (entry / "cmdline").read_bytes() == own:
                    pids.append(int(entry.name))
    return pids


def test_killed_decoding_worker_ends_the_run_with_one_line(tmp_path):
    """A FIFO in the list keeps one worker blocked in open() until the test kills the workers
    (as the OOM killer would); the run must end, and a rerun must finish the dataset."""
    root = csv_root_with_fifo(tmp_path, "slow.png")
    out = tmp_path / "out"
    argv = prepare_csv_args(root, out)[:-2] + ["--workers", "2", "--max-rejects", "0.5"]
    p = start("prepare_data", *argv)
    try:
        deadline = time.monotonic() + 60
        while len(worker_pids(p)) < 2 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        for pid in worker_pids(p):
            os.kill(pid, signal.SIGKILL)
        r = finish(p, 30)
    finally:
        kill_session(p)
    if r.rc == 0:  # the FIFO was refused without a worker blocking on it
        assert_prepared_consistent(out, n=20)
        return
    assert_one_line_error(r, 2, "worker")
    (root / "slow.png").unlink()
    write_png(root / "slow.png", 24)
    r = run("prepare", *argv)
    assert r.rc == 0, r
    assert_prepared_consistent(out, n=21)


DEFLATED = "1.2.840.10008.1.2.1.99"  # pydicom's DeflatedExplicitVRLittleEndian


def write_dicom_of(path, side, syntax, zeros=False):
    """A side x side 8-bit DICOM of a gradient, or of zeros, in transfer syntax `syntax` (zeros
    deflated: a few hundred kB on disk for hundreds of MB of pixels)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import RLELossless, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = None if zeros else np.add.outer(np.arange(side), np.arange(side)).astype(np.uint8)
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels)
    else:
        ds.PixelData = bytes(side * side) if zeros else pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_deflated_dicom_bomb_is_refused_by_a_pixel_budget(tmp_path):
    root = csv_root(tmp_path, n=6)
    write_dicom_of(root / "bomb.dcm", 16384, DEFLATED, zeros=True)  # 268 Mpx, over Pillow's 2 x 89.5 Mpx
    assert (root / "bomb.dcm").stat().st_size < 2 << 20
    t = pd.read_csv(root / "labels.csv")
    t.loc[len(t)] = ["bomb.dcm", 1]
    t.to_csv(root / "labels.csv", index=False)
    out = tmp_path / "out"
    r = finish(start("prepare_data", *prepare_csv_args(root, out), "--max-rejects", "0.5",
                     memory_limit=True), 120)
    assert r.rc in (0, 2) and "Traceback" not in r.err, r
    words = ("pixel", "budget", "too large")
    if r.rc == 0:
        reasons = pd.read_csv(out / "rejects.csv").set_index("path")["reason"]
        assert "bomb.dcm" in reasons and any(w in reasons["bomb.dcm"].lower() for w in words), reasons
        assert_prepared_consistent(out, n=6)
    else:
        assert_one_line_error(r, 2, *words)


def test_a_kill_during_the_final_steps_leaves_a_finishable_folder(tmp_path, monkeypatch):
    """Killed after the images were compacted, before meta.json: the rerun must finish."""
    root = csv_root(tmp_path)
    out = tmp_path / "out"

    def killed(*a, **k):
        raise SystemExit(137)
    with monkeypatch.context() as m:
        m.setattr(P, "write_meta", killed)
        run("prepare", *prepare_csv_args(root, out))
    r = run("prepare", *prepare_csv_args(root, out))
    assert r.rc == 0, r
    assert_prepared_consistent(out, n=8, size=8)


# ----------------------------------------------------------------------------------------
# 5. Tracebacks instead of one line: bad files and flags are one line, exit 2

def unreadable_label_file(tmp_path, kind):
    """(argv, file name the message must name) for a label file broken as `kind`."""
    if kind.startswith("csv"):
        root = csv_root(tmp_path)
        bad = {"csv-malformed": b"path,finding\nimg0.png,1\nimg1.png,0,7,8\n",
               "csv-non-utf8": b"path,finding\nimg\xff\xfe0.png,1\nimg1.png,0\n",
               "csv-empty": b""}[kind]
        (tmp_path / "bad.csv").write_bytes(bad)
        return prepare_csv_args(root, tmp_path / "out", tmp_path / "bad.csv", "--dry-run"), "bad.csv"
    if kind == "padchest-truncated-gz":
        root = padchest_root(tmp_path, 12)
        truncate(root / P.PADCHEST_CSV)
        return ["--dataset", "padchest", "--root", root, "--out", tmp_path / "out", "--dry-run"], P.PADCHEST_CSV
    if kind == "mimic-truncated-gz":
        root = mimic_root(tmp_path)
        truncate(root / "mimic-cxr-2.0.0-metadata.csv.gz")
        return ["--dataset", "mimic", "--root", root, "--out", tmp_path / "out", "--dry-run"], "metadata"
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv").write_bytes(
        b"Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        b"00000001_000.png,Cardiomegaly\xff,0,1,58,M,PA\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n")
    (root / "test_list.txt").write_text("")
    return ["--dataset", "nih", "--root", root, "--out", tmp_path / "out", "--dry-run"], "Data_Entry"


@pytest.mark.parametrize("kind", ["csv-malformed", "csv-non-utf8", "csv-empty", "padchest-truncated-gz",
                                  "mimic-truncated-gz", "nih-non-utf8"])
def test_unreadable_label_file_is_one_line(tmp_path, kind):
    argv, name = unreadable_label_file(tmp_path, kind)
    assert_one_line_error(run("prepare", *argv), 2, name)


def test_npz_holding_object_arrays_is_one_line(tmp_path, target):
    np.savez(tmp_path / "evil.npz", **{"resnet/root_block/standardized_conv2d/kernel": np.array([{"x": 1}], object)})
    r = run("transfer", "--data", target, "--init", tmp_path / "evil.npz", "--out", tmp_path / "t", *TRANSFER_TINY)
    assert_one_line_error(r, 2, "evil.npz")


@pytest.mark.parametrize("kind", ["truncated", "foreign-dict", "text", "npz"])
def test_unusable_checkpoint_on_resume_is_one_line_and_kept(tmp_path, finished_pretrain, kind):
    data, done = finished_pretrain
    out = tmp_path / "run"
    shutil.copytree(done, out)
    ckpt = out / "checkpoint.pt"
    if kind == "truncated":
        truncate(ckpt)
    elif kind == "foreign-dict":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    elif kind == "text":
        ckpt.write_text("not a checkpoint\n")
    else:
        np.savez(tmp_path / "w.npz", a=np.zeros(3))
        shutil.copy(tmp_path / "w.npz", ckpt)
    before = snapshot(out)
    r = run("pretrain", "--data", data, "--out", out, *PRETRAIN_TINY, "--resume")
    assert_one_line_error(r, 2, "checkpoint.pt")
    assert snapshot(out) == before


@pytest.mark.parametrize("script", ["prepare", "pretrain", "transfer", "fewshot"])
def test_out_that_is_a_file_is_one_line(tmp_path, target, script):
    out = tmp_path / "out"
    out.write_text("my notes\n")
    if script == "prepare":
        argv = prepare_csv_args(csv_root(tmp_path), out, None, "--dry-run")
    else:
        argv = ["--data", target, "--out", out, *(PRETRAIN_TINY if script == "pretrain" else TRANSFER_TINY)]
        argv += ["--shots", "1", "--seeds", "0"] if script == "fewshot" else []
    assert_one_line_error(run(script, *argv), 2, str(out))
    assert out.read_text() == "my notes\n"


@pytest.mark.parametrize("case", ["prepare --workers", "pretrain --workers", "prepare --seed",
                                  "fewshot --seeds"])
def test_negative_count_or_seed_is_one_line(tmp_path, target, case):
    script, flag = case.split()
    if script == "prepare":
        argv = prepare_csv_args(csv_root(tmp_path), tmp_path / "out")
        argv += [flag, "-1"] + (["--dry-run"] if flag == "--seed" else [])
    elif script == "pretrain":
        argv = ["--data", target, "--out", tmp_path / "out", *PRETRAIN_TINY, flag, "-1"]
    else:
        argv = ["--data", target, "--out", tmp_path / "out", *TRANSFER_TINY, "--shots", "1", flag, "-1"]
    assert_one_line_error(run(script, *argv), 2, flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("script", ["transfer", "fewshot"])
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, target, script):
    argv = ["--data", target, "--out", tmp_path / "out", *TRANSFER_TINY, "--device", "cuda"]
    assert_one_line_error(run(script, *argv + (["--shots", "1", "--seeds", "0"] if script == "fewshot" else [])),
                          2, "cuda")


@pytest.mark.parametrize("case", ["transfer truncated-images", "pretrain truncated-images",
                                  "transfer length-mismatch", "pretrain length-mismatch",
                                  "transfer meta-not-json", "merge truncated-images"])
def test_broken_prepared_folder_is_one_line(tmp_path, case):
    script, damage = case.split()
    data = make_prepared(tmp_path / "data", task="multilabel")
    name = {"truncated-images": "images.npy", "length-mismatch": "labels.csv", "meta-not-json": "meta.json"}[damage]
    if damage == "truncated-images":
        truncate(data / "images.npy", 0.6)
    elif damage == "length-mismatch":
        t = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
        t.drop(index=3).to_csv(data / "labels.csv", index=False)
    else:
        (data / "meta.json").write_text('{"name": "data", "size": 16,')
    if script == "merge":
        other = make_prepared(tmp_path / "other", task="multilabel", seed=1)
        argv = ["--dataset", "merge", "--inputs", other, data, "--out", tmp_path / "out"]
        script = "prepare"
    else:
        argv = ["--data", data, "--out", tmp_path / "out", *(TRANSFER_TINY if script == "transfer" else PRETRAIN_TINY)]
    assert_one_line_error(run(script, *argv), 2, name)


@pytest.mark.parametrize("script", ["transfer", "fewshot --summarize"])
def test_unreadable_results_csv_is_one_line_and_kept(tmp_path, target, script):
    results = tmp_path / "t" / "results.csv"
    results.parent.mkdir()
    results.write_bytes(b"method,source\nfinetune,\xff\xfe\n")
    if script == "transfer":
        r = run("transfer", "--data", target, "--out", tmp_path / "t", *TRANSFER_TINY)
    else:
        r = run("fewshot", "--summarize", results)
    assert_one_line_error(r, 2, "results.csv")
    assert results.read_bytes() == b"method,source\nfinetune,\xff\xfe\n"


# -- issue 21: every numeric flag checked (args)

def numeric(action):
    return action.type in (int, float, transfer.parse_shots) or hasattr(action.type, "interval")


def bad_values(action):
    """NaN, infinities, a negative, and the nearest values outside the flag's declared range."""
    values = ["nan", "inf", "-inf", "-1"]
    if action.choices:
        values.append(str(max(action.choices) + 1))
    if hasattr(action.type, "interval"):
        interval, step = action.type.interval, 1 if action.type.__name__ == "int" else 1e-6
        low, high = map(float, interval[1:-1].split(","))
        for value in (low if interval[0] == "(" else low - step, high if interval[-1] == ")" else high + step):
            if math.isfinite(value):
                values.append(str(int(value)) if step == 1 else repr(value))
    return list(dict.fromkeys(values))


# every numeric flag of every script (read from the parsers: a new flag joins the table) x bad values
NUMERIC_CASES = [(script, action.option_strings[0], value) for script, module in SCRIPTS.items()
                 for action in module.get_args_parser()._actions if numeric(action) for value in bad_values(action)]
REQUIRED = {"prepare": ["--dataset", "csv"], "pretrain": ["--data", "d"], "transfer": [], "fewshot": []}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_declares_its_range(script):
    plain = [a.option_strings[0] for a in SCRIPTS[script].get_args_parser()._actions
             if a.type in (int, float) and not a.choices]
    assert not plain, f"give {plain} a range: type=models.number(...)"


@pytest.mark.parametrize("script, flag, value", NUMERIC_CASES)
def test_bad_numeric_value_is_one_line_naming_flag_and_range(tmp_path, capsys, script, flag, value):
    """Parsing alone, so that the table stays fast: the end-to-end runs below show that nothing
    is written when the parser refuses."""
    parser = SCRIPTS[script].get_args_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(REQUIRED[script] + ["--out", str(tmp_path / "out"), f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"argument {flag}:" in err[0], err
    interval = getattr(next(a for a in parser._actions if flag in a.option_strings).type, "interval", "")
    assert interval in err[0]


@pytest.mark.parametrize("script, argv", [
    ("pretrain", ["--lr", "-1"]), ("pretrain", ["--momentum", "1"]), ("transfer", ["--min-epochs", "nan"]),
    ("fewshot", ["--linear-probe", "--probe-c", "nan"]), ("transfer", ["--seed", "9223372036854775808"]),
    ("prepare_data", ["--dataset", "merge", "--inputs", "A", "A", "--max-rejects", "inf"])])
def test_bad_numeric_value_end_to_end(tmp_path, target, script, argv):
    out, flag, argv = tmp_path / "out", argv[-2], [target if a == "A" else a for a in argv]
    if script != "prepare_data":
        argv += ["--data", target, *(PRETRAIN_TINY if script == "pretrain" else TRANSFER_TINY)]
    proc = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *map(str, argv), "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), 2, f"argument {flag}:")
    assert not out.exists()


@pytest.mark.parametrize("script, where", [("pretrain", "train"), ("transfer", "fit_cell"),
                                           ("fewshot", "fit_cell"), ("prepare", "convert_all")])
def test_out_of_memory_is_one_line_naming_the_setting(tmp_path, target, monkeypatch, script, where):
    def fail(*args, **kwargs):
        if script == "prepare":
            raise MemoryError()
        if script == "pretrain":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 8589934592 bytes.")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    monkeypatch.setattr({"prepare": P, "pretrain": pretrain}.get(script, transfer), where, fail)
    if script == "prepare":
        argv = prepare_csv_args(csv_root(tmp_path), tmp_path / "out")
    else:
        tiny = PRETRAIN_TINY if script == "pretrain" else TRANSFER_TINY
        argv = ["--data", target, "--out", tmp_path / "out", *tiny]
    r = run(script, *argv)
    assert_one_line_error(r, 2, "out of memory")
    assert ("--size" if script == "prepare" else "--batch-size") in r.err
    assert not (tmp_path / "out" / "failures.csv").exists()  # not a cell's failure: every cell shares it


@pytest.mark.parametrize("how", ["same path", "two paths"])
@pytest.mark.parametrize("script", ["merge", "pretrain"])
def test_a_source_given_twice_is_refused(tmp_path, target, script, how):
    other = target
    if how == "two paths":
        other = tmp_path / "link"
        os.symlink(target, other)
    out = tmp_path / "out"
    if script == "merge":
        r = run("prepare", "--dataset", "merge", "--inputs", target, other, "--out", out)
    else:
        r = run("pretrain", "--data", target, "--data", other, "--out", out, *PRETRAIN_TINY)
    assert_one_line_error(r, 2, "twice")
    assert str(other) in r.err and not out.exists()


@pytest.mark.parametrize("case", ["--results folder", "--results under-file", "--out under-file"])
@pytest.mark.parametrize("script", ["transfer", "fewshot"])
def test_output_path_of_the_wrong_kind_is_one_line(tmp_path, target, script, case):
    flag, kind = case.split()
    (tmp_path / "notes").write_text("mine\n")
    path = tmp_path if kind == "folder" else tmp_path / "notes" / "x"
    argv = ["--data", target, *TRANSFER_TINY, "--out", tmp_path / "out", flag, path]
    r = run(script, *argv + (["--shots", "1", "--seeds", "0"] if script == "fewshot" else []))
    assert_one_line_error(r, 2, flag)
    assert sorted(os.listdir(tmp_path)) == ["notes"] and (tmp_path / "notes").read_text() == "mine\n"


def test_validation_carve_out_of_a_small_csv_is_skipped_with_one_line(tmp_path):
    root = csv_root(tmp_path, n=5)
    table = pd.read_csv(root / "labels.csv").assign(split=["train"] * 3 + ["test"] * 2)
    table.to_csv(root / "labels.csv", index=False)
    r = run("prepare", *prepare_csv_args(root, tmp_path / "out"))
    assert r.rc == 0 and "no validation split" in r.out, r
    assert set(P.PreparedDataset(str(tmp_path / "out")).table["split"]) == {"train", "test"}
    table.assign(split="train").to_csv(root / "labels.csv", index=False)  # no test rows: --test-fraction is moot
    r = run("prepare", *prepare_csv_args(root, tmp_path / "out2"))
    assert_one_line_error(r, 2, "test split is empty")
    assert "--test-fraction" not in r.err and not (tmp_path / "out2").exists()


# -- issue 19: nothing outside its folder (paths)

def listing(folder, leave=None):
    """{relative path: sha1, or 'dir'} of everything under `folder` except the folder `leave`
    (a run's --out): compared before and after a run, what it changed outside its output."""
    found = {}
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if leave is None or Path(dirpath, d) != Path(leave)]
        for name in dirs + names:
            path = Path(dirpath, name)
            found[str(path.relative_to(folder))] = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return found


NAMES = {"target ../../escape": ["--target", "../../escape"], "target absolute": ["--target", "{tmp}/abs"],
         "target $(touch PWNED)": ["--target", "t$(touch PWNED)"], "target with spaces": ["--target", "my target x"],
         "source ../../escape": ["--source", "../../escape"], "meta.json name ../../escape": [],
         "meta.json name absolute": [], "fewshot target ../../escape": ["--target", "../../escape"]}


@pytest.mark.parametrize("case", NAMES)
def test_names_in_arguments_or_meta_json_write_nothing_outside_out(tmp_path, case):
    data = make_prepared(tmp_path / "in" / "toy")
    if case.startswith("meta.json"):
        meta = json.loads((data / "meta.json").read_text())
        meta["name"] = "../../escape" if case.endswith("escape") else str(tmp_path / "abs")
        (data / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "a" / "b" / "out"
    out.parent.mkdir(parents=True)
    before = listing(tmp_path, out)
    script = "fewshot" if case.startswith("fewshot") else "transfer"
    argv = ["--data", data, "--out", out, *TRANSFER_TINY, *[a.format(tmp=tmp_path) for a in NAMES[case]]]
    r = run(script, *argv, *(["--shots", "1", "--seeds", "0"] if script == "fewshot" else []))
    assert r.rc == 0, r
    assert listing(tmp_path, out) == before
    assert len(list(out.rglob("per_class.csv"))) == 1 and not (ROOT / "PWNED").exists()


@pytest.mark.parametrize("name", ["..", "."])
def test_a_name_that_cannot_name_a_folder_is_one_line(tmp_path, target, name):
    before = listing(tmp_path)
    assert_one_line_error(run("transfer", "--data", target, "--out", tmp_path / "out", *TRANSFER_TINY,
                              "--target", name), 2, "name")
    assert listing(tmp_path) == before


def test_each_pre_training_seed_keeps_its_own_cell_files(tmp_path, target):
    for seed in (1, 2):
        assert run("transfer", "--data", target, "--out", tmp_path / "out", *TRANSFER_TINY, "--source-seed", seed).rc == 0
    saved = [json.loads(p.read_text())["source_seed"] for p in (tmp_path / "out").rglob("shots*/args.json")]
    assert sorted(saved) == [1, 2] and len(list((tmp_path / "out").rglob("per_class.csv"))) == 2


@pytest.mark.parametrize("dry_run", [False, True])
def test_labels_csv_inside_out_is_refused_and_kept(tmp_path, dry_run):
    root = csv_root(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(root / "labels.csv", out / "labels.csv")
    before = listing(tmp_path)
    r = run("prepare", *prepare_csv_args(root, out, out / "labels.csv", *(["--dry-run"] if dry_run else [])))
    assert_one_line_error(r, 2, "--labels-csv")
    assert listing(tmp_path) == before


OVER_INPUTS = ["fewshot --results in --data", "transfer --results = --init", "transfer --data = the target's folder",
               "pretrain --init inside --out", "prepare --root inside --out"]


@pytest.mark.parametrize("case", OVER_INPUTS)
def test_an_output_over_an_input_is_refused_and_the_input_kept(tmp_path, case):
    data, out = make_prepared(tmp_path / "data"), tmp_path / "out"
    weights = weights_file(out / "w.pt" if case.startswith("pretrain") else tmp_path / "w.pt")
    argv = {OVER_INPUTS[0]: ["fewshot", "--data", data, "--results", data / "results.csv", "--shots", "1", "--seeds", "0"],
            OVER_INPUTS[1]: ["transfer", "--data", data, "--init", weights, "--results", weights],
            OVER_INPUTS[2]: ["transfer", "--data", make_prepared(out / "toy")],
            OVER_INPUTS[3]: ["pretrain", "--data", data, "--init", weights],
            OVER_INPUTS[4]: ["prepare", *prepare_csv_args(csv_root(out), out)]}[case]
    before = listing(tmp_path)
    tiny = {"transfer": TRANSFER_TINY, "fewshot": TRANSFER_TINY, "pretrain": PRETRAIN_TINY}.get(argv[0], [])
    r = run(*argv, *([] if argv[0] == "prepare" else ["--out", out]), *tiny)
    assert_one_line_error(r, 2, "input")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("codec", ["png", "jpeg", "dicom", "dicom-rle", "dicom-deflated"])
def test_every_codec_is_held_to_the_pixel_budget_before_decoding(tmp_path, monkeypatch, codec):
    import warnings
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless
    path = tmp_path / f"im.{'dcm' if codec.startswith('dicom') else codec}"
    if codec in ("png", "jpeg"):
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)
    else:
        write_dicom_of(path, 40, {"dicom": ExplicitVRLittleEndian, "dicom-rle": RLELossless,
                                  "dicom-deflated": DeflatedExplicitVRLittleEndian}[codec])
    assert P.load_image(str(path), 8, 1)[0].shape == (8, 8, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: over the budget, under Pillow's 2 x
    with pytest.raises(ValueError, match="budget"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's, at open
        P.load_image(str(path), 8, 1)


def test_a_169_mpx_deflated_dicom_is_rejected_under_a_memory_limit(tmp_path):
    root = csv_root(tmp_path, n=6)
    write_dicom_of(root / "bomb.dcm", 13000, DEFLATED, zeros=True)  # 169 Mpx of zeros: under Pillow's 2 x 89.5 Mpx, 165 kB
    t = pd.read_csv(root / "labels.csv")
    t.loc[len(t)] = ["bomb.dcm", 1]
    t.to_csv(root / "labels.csv", index=False)
    out = tmp_path / "out"
    r = finish(start("prepare_data", *prepare_csv_args(root, out), "--max-rejects", "0.5", memory_limit=True), 120)
    assert r.rc == 0, r
    reasons = pd.read_csv(out / "rejects.csv").set_index("path")["reason"]
    assert "budget" in reasons["bomb.dcm"], reasons
    assert_prepared_consistent(out, n=6)


def test_covidx_class_names_are_matched_whatever_their_case(tmp_path):
    import raw_layouts
    root = Path(raw_layouts.covidx(str(tmp_path / "covidx"), n=16))
    lines = (root / "train.txt").read_text().splitlines()
    spellings = ["NEGATIVE", "Positive", "negative", "positive"]
    lines = [line.rsplit(" ", 2)[0] + f" {spellings[i % 4]} ricord" for i, line in enumerate(lines)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    r = run("prepare", "--dataset", "covidx", "--root", root, "--out", tmp_path / "out", "--dry-run")
    assert r.rc == 0, r
    t = pd.read_csv(tmp_path / "out" / "labels.csv")
    assert list(t.columns[-2:]) == ["negative", "positive"] and t[["negative", "positive"]].sum().tolist() == [8, 8]


@pytest.mark.parametrize("task", [None, "multiclass", "multilabel"])
def test_one_hot_csv_columns_need_task(tmp_path, task):
    root = csv_root(tmp_path)
    t = pd.read_csv(root / "labels.csv")
    t["other"] = 1 - t["finding"]  # one 0/1 column per class, exactly one 1 per row: two classes, or two labels?
    t.to_csv(root / "labels.csv", index=False)
    r = run("prepare", *prepare_csv_args(root, tmp_path / "out", None, *(["--task", task] if task else [])))
    if task is None:
        assert_one_line_error(r, 2, "--task")
        return
    assert r.rc == 0, r
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["task"] == task and meta["labels"] == ["finding", "other"]


@pytest.mark.parametrize("dataset", ["csv", "chexpert"])
def test_an_empty_path_cell_is_a_reject_with_a_reason(tmp_path, dataset):
    import raw_layouts
    if dataset == "csv":
        root = csv_root(tmp_path)
        table, column = root / "labels.csv", "path"
    else:
        root = Path(raw_layouts.chexpert(str(tmp_path / "chexpert"), n=12))
        table, column = root / "CheXpert-v1.0-small" / "train.csv", "Path"
    t = pd.read_csv(table, dtype=str, keep_default_na=False)
    t.loc[3, column] = ""
    t.to_csv(table, index=False)
    argv = ["--dataset", dataset, "--root", root, "--out", tmp_path / "out", "--size", "8", "--workers", "1",
            "--max-rejects", "0.5", *(["--labels-csv", table] if dataset == "csv" else [])]
    r = run("prepare", *argv)
    assert r.rc == 0, r
    assert pd.read_csv(tmp_path / "out" / "rejects.csv", keep_default_na=False)["reason"].tolist() == ["empty path"]


# -- issue 22: threads, the demo's images, accumulation, grids and figures (demo)

@pytest.mark.parametrize("omp, local_world, cores, want", [
    (None, None, 4, 4), (None, "2", 4, 2), (None, "8", 4, 1), ("3", "2", 4, 3)])
def test_threads_fit_the_cores_per_rank_unless_set(monkeypatch, omp, local_world, cores, want):
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local_world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    torch.set_num_threads(3)   # what a user's OMP_NUM_THREADS=3 gave at start-up
    models.fit_threads()
    assert torch.get_num_threads() == want


def test_accumulation_trains_the_model_of_one_batch(prepared, tmp_path):
    """--accum-steps 2 on one process = --accum-steps 1 (to fp32 rounding): each image gets the
    same transform, and the loss is the global batch's mean over its known (unmasked) targets."""
    data = str(prepared("src", n_train=32, n_eval=4, task="multilabel", size=16, eval_split="valid"))
    out = {}
    for accum in (1, 2):
        argv = ["--data", data, "--out", str(tmp_path / f"acc{accum}"), "--epochs", "2", "--rotate", "30",
                "--shift", "0.2", "--accum-steps", str(accum)] + PRETRAIN_TINY + ["--batch-size", "8"]
        assert pretrain.main(pretrain.get_args_parser().parse_args(argv)) in (0, None)
        out[accum] = models.load_checkpoint(tmp_path / f"acc{accum}" / "model.pt")["model"]
    for k in out[1]:
        torch.testing.assert_close(out[1][k], out[2][k], rtol=1e-4, atol=1e-5)


def test_grid_logs_cell_i_of_n_with_time_left_and_full_shots_by_name(prepared, tmp_path, capsys):
    data = prepared("tb", n_train=15)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--shots", "1", "full", "--seeds", "0"] + TRANSFER_TINY
    fewshot.main(fewshot.get_args_parser().parse_args(argv))
    log = capsys.readouterr().out
    assert "cell 1 of 2\n" in log and re.search(r"cell 2 of 2, about \d+ s left", log)
    assert "eval method=finetune source=scratch source_seed= model=R14x1 target=tb shots=full seed=0" in log
    assert "shots=0" not in log


def test_bench_run_all_prints_the_readmes_demo_block(tmp_path):
    """The README's demo table, sizes and claims are bench_run_all.py's output, verdicts included."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_run_all
    summary = [(s, k, size, n, mean) for s, size, n, base in [("scratch", 0, 3, 0.5), ("chexpert", 1501, 9, 0.6),
                                                              ("chexpert_mimic", 2538, 9, 0.7)]
               for k, mean in [("1", base), ("full", base + 0.1)]]
    pd.DataFrame([{"target": "tuberculosis", "source": s, "shots": k, "source_size": size, "n_cells": n,
                   "accuracy_mean": mean, "accuracy_std": 0.01, "headline": "accuracy"}
                  for s, k, size, n, mean in summary]).to_csv(tmp_path / "summary.csv", index=False)
    pd.DataFrame([{"source": a, "baseline": b, "shots": k, "estimate": 0.1, "low": lo, "high": lo + 0.2,
                   "verdict": "better" if lo > 0 else "not resolved"}
                  for a, b in [("chexpert", "scratch"), ("chexpert_mimic", "scratch"), ("chexpert_mimic", "chexpert")]
                  for k, lo in [("1", -0.1), ("full", 0.01)]]).to_csv(tmp_path / "comparisons.csv", index=False)
    block = bench_run_all.readme_block(tmp_path).splitlines()
    assert block[:6] == ["| tuberculosis accuracy | images | 1-shot | full |", "|---|---|---|---|",
                         "| scratch |  | 0.500 ± 0.010 | 0.600 ± 0.010 |",
                         "| chexpert | 1,501 | 0.600 ± 0.010 | 0.700 ± 0.010 |",
                         "| chexpert_mimic | 2,538 | 0.700 ± 0.010 | 0.800 ± 0.010 |",
                         "| chexpert_mimic - chexpert | | +0.100 [-0.100, +0.100] | +0.100 [+0.010, +0.210] |"]
    assert "scratch 3, chexpert 9," in " ".join(block)
    assert block[-1] == "- chexpert_mimic - chexpert: better at k = full; not resolved at k = 1."


def test_demo_images_are_drawn_with_numpy_alone(monkeypatch):
    """The demo's images, hence its source sizes and table, do not depend on the Pillow or torch
    version: the texture's upsampling is Pillow's BILINEAR in numpy, and drawing calls neither.
    The digest pins the images: a change to them is a change to the README's demo block."""
    a = np.random.default_rng(0).normal(0, 1, (16, 16))
    pillow = np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((64, 64), Image.BILINEAR))
    assert np.abs(P.upsample(a, 64) - pillow).max() < 1e-6
    monkeypatch.setattr(P, "Image", None)
    monkeypatch.setattr(P, "torch", None)
    img = P.synthetic_chest(np.random.default_rng(1), ["Pneumonia", "Effusion"], 64)
    assert hashlib.sha256(img.tobytes()).hexdigest()[:16] == "bf9b00e211b30c42"


# -- issue 21: prompt stops (stops)

def big_eval_target(folder):
    """A target whose evaluation takes a minute or more (8000 test images at 64 px), so that a
    stop that waits for the evaluation to end is caught by the 30 s allowance."""
    return make_prepared(folder, n=(12, 4, 8000))


PROMPT_TINY = [*TRANSFER_TINY, "--resize", "64", "--crop", "64", "--shots", "1", "--seeds", "0"]


@pytest.mark.parametrize("phase", ["evaluation", "feature extraction"])
def test_sigterm_stops_fewshot_promptly_in_every_phase(tmp_path, phase):
    data, out = big_eval_target(tmp_path / "data"), tmp_path / "out"
    results = out / "results.csv"
    transfer.append_row(str(results), {"method": "finetune", "source": "earlier", "source_seed": "", "model": "R14x1",
                                       "target": "data", "shots": 1, "seed": 7, "accuracy": 0.5},
                        transfer.RESULT_COLUMNS)
    before = results.read_bytes()
    p = start("fewshot", "--data", data, "--out", out, *PROMPT_TINY,
              *(["--linear-probe"] if phase == "feature extraction" else []))
    try:
        if phase == "evaluation":
            wait_for_line(p, r"^step 2/2 ")  # the last fine-tuning step: prediction follows
        else:  # args.json is written right before the grid, whose first act is extracting features
            deadline = time.monotonic() + 60
            while not (out / "args.json").exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        r = finish(p, 30)
    finally:
        kill_session(p)
    assert r.rc == 143 and r.out.strip().splitlines()[-1].startswith("stopped by SIGTERM: none of 1 cells"), r
    assert "Traceback" not in r.err and results.read_bytes() == before  # the finished row alone, no partial one


def csv_root_with_fifo(tmp_path, name):
    """A csv dataset of 20 images and a FIFO `name` listed last: opening it blocks (a worker
    stays busy converting) until someone writes to it."""
    root = csv_root(tmp_path, n=20)
    os.mkfifo(root / name)
    t = pd.read_csv(root / "labels.csv")
    t.loc[len(t)] = [name, 1]
    t.to_csv(root / "labels.csv", index=False)
    return root


def test_sigkill_of_prepare_leaves_no_worker_behind(tmp_path):
    """A FIFO in the list keeps a worker blocked in open(): converting, for as long as it takes."""
    root = csv_root_with_fifo(tmp_path, "slow.png")
    p = start("prepare_data", *prepare_csv_args(root, tmp_path / "out")[:-2], "--workers", "2")
    try:
        deadline = time.monotonic() + 60
        while len(worker_pids(p)) < 2 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = worker_pids(p)
        assert len(workers) == 2, finish(p, 1)
        os.kill(p.pid, signal.SIGKILL)  # the parent alone, as the OOM killer would
        p.wait()
        time.sleep(2)

        def alive(pid):  # a zombie is dead (its new parent may not reap it)
            with contextlib.suppress(OSError):
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            return False
        assert not [pid for pid in workers if alive(pid)]
    finally:
        kill_session(p)
        for pid in workers if "workers" in locals() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigint_while_converting_is_one_line_and_the_rerun_resumes(tmp_path):
    """A FIFO last in the list keeps the conversion blocked in open() until the signal."""
    root = csv_root_with_fifo(tmp_path, "zz.png")
    out = tmp_path / "out"
    p = start("prepare_data", *prepare_csv_args(root, out))
    try:
        wait_for_line(p, r"^convert: ")
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        r = finish(p, 30)
    finally:
        kill_session(p)
    lines = (r.out + r.err).strip().splitlines()
    assert r.rc == 130 and "stopped by SIGINT" in lines[-1] and "Traceback" not in r.err, r
    (root / "zz.png").unlink()
    write_png(root / "zz.png", 24)
    r = run("prepare", *prepare_csv_args(root, out))
    assert r.rc == 0 and "resume: " in r.out, r
    assert_prepared_consistent(out, n=21)


def test_prepare_whose_first_images_are_all_rejected_stops_early(tmp_path):
    root = csv_root(tmp_path, n=P.ALL_REJECTED_STOP + 20)
    for f in root.glob("*.png"):
        f.write_bytes(b"not an image")
    out = tmp_path / "out"
    r = run("prepare", *prepare_csv_args(root, out))
    assert_one_line_error(r, 2, f"the first {P.ALL_REJECTED_STOP} images read were all rejected")
    assert not np.load(out / ".work" / "state.npz")["done"].any()  # the rest unread; the rejects read again


def test_sigterm_during_pretrain_validation_stops_promptly(tmp_path):
    data = make_prepared(tmp_path / "data", task="multilabel", n=(16, 8000, 6))  # a validation of a minute or more
    p = start("pretrain", "--data", data, "--out", tmp_path / "run", *PRETRAIN_TINY, "--image-size", "64")
    try:
        wait_for_line(p, r"^step 4/4 ")  # the last step: the validation follows
        p.send_signal(signal.SIGTERM)
        r = finish(p, 30)
    finally:
        kill_session(p)
    assert r.rc == 143 and "during validation" in r.out.strip().splitlines()[-1], r
    assert models.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3  # a resume validates step 4
