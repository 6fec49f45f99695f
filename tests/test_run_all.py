"""run_all.sh: usage text, one-line errors, the printed plan (demo settings honoured; the
paper's scale axis on a DATA folder of every raw layout), failing jobs that do not stop the
script, and a tiny run of every target through prepare, transfer and summary."""
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import prepare_data as P
import raw_layouts

ROOT = Path(__file__).resolve().parents[1]
SCALE_AXIS = ["chexpert", "chexpert_mimic", "chexpert_mimic_nih", "chexpert_mimic_nih_padchest",
              "mimic", "nih", "padchest"]
TARGETS = ["covidx", "tuberculosis", "padchest", "cifar10", "cifar100", "flowers102", "pets"]


def run_all(*args, env=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OUT", "MODELS", "SOURCES", "TARGETS", "SHOTS", "SEEDS", "PRETRAIN_SEEDS", "STAGES", "NPROC")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def plan_lines(stdout, stage):
    """The job lines of one stage of the printed plan: (status, name)."""
    lines, inside = [], False
    for line in stdout.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            inside = line.strip().startswith(stage + ":")
        elif inside and line.startswith("    "):
            status, name = line.split(None, 1)
            lines.append((status, name))
    return lines


def test_usage_text():
    for flag in ("-h", "--help"):
        r = run_all(flag)
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout.startswith("usage: bash run_all.sh")
        for word in ("prepare", "pretrain", "transfer", "summary", "--plan", "Examples:", "OUT", "MODELS",
                     "SOURCES", "TARGETS", "SHOTS", "SEEDS", "PRETRAIN_SEEDS", "STAGES", "NPROC", "PREPARE_ARGS",
                     "PRETRAIN_ARGS", "TRANSFER_ARGS"):
            assert word in r.stdout, word


@pytest.mark.parametrize("args,env,message", [
    (["/no/such/folder"], {}, "DATA folder '/no/such/folder' not found"),
    (["--bogus"], {}, "unknown option --bogus"),
    ([], {"TARGETS": "tuberculosis mnist"}, "unknown target 'mnist'"),
    ([], {"STAGES": "prepare train"}, "unknown stage 'train'"),
    ([], {"PRETRAIN_SEEDS": "0 one"}, "PRETRAIN_SEEDS: 'one' is not a seed"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, message):
    r = run_all(*args, env={"OUT": str(tmp_path / "out"), **env})
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("run_all.sh: error: ") and message in r.stderr
    assert not (tmp_path / "out").exists()   # nothing ran


def test_demo_plan_honours_settings(tmp_path):
    r = run_all("--plan", env={"OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    # each source pre-trained with three seeds, each transferred with three fine-tuning seeds
    assert [n for s, n in plan_lines(r.stdout, "pretrain")] == [f"R14x0.5 {s} seed {seed}" for s in
                                                                ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)]
    transfers = [n for s, n in plan_lines(r.stdout, "transfer")]
    assert [n.split(" (")[0] for n in transfers] == ["tuberculosis R14x0.5 scratch"] + [
        f"tuberculosis R14x0.5 {s} seed {seed}" for s in ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)]
    assert "transfer cells (fine-tuning runs): 84" in r.stdout   # (1 + 2 sources x 3) x 4 shots x 3 seeds
    assert not os.listdir(tmp_path)                              # --plan runs nothing

    r = run_all("--plan", env={"OUT": str(tmp_path), "MODELS": "R26x1", "SHOTS": "5 full", "SEEDS": "7",
                               "SOURCES": "chexpert", "STAGES": "pretrain transfer", "PRETRAIN_SEEDS": "5"})
    assert r.returncode == 0, r.stderr
    assert [n for s, n in plan_lines(r.stdout, "pretrain")] == ["R26x1 chexpert seed 5"]
    assert "summary: 1 run (stage not in STAGES: nothing runs)" in r.stdout
    assert [n for s, n in plan_lines(r.stdout, "transfer")] == [
        f"tuberculosis R26x1 {s} (2 cells: shots 5 full x seeds 7)" for s in ("scratch", "chexpert seed 5")]
    # without the pretrain stage, only what is pre-trained already is transferred
    r = run_all("--plan", env={"OUT": str(tmp_path), "STAGES": "transfer"})
    assert [n.split(" (")[0] for s, n in plan_lines(r.stdout, "transfer")] == ["tuberculosis R14x0.5 scratch"]


def test_plan_of_every_raw_layout_shows_the_scale_axis(tmp_path):
    data = tmp_path / "data"
    raw_layouts.write_all(data)
    (data / "weights").mkdir(exist_ok=True)
    (data / "weights" / "BiT-M-R50x1.npz").write_bytes(b"")
    r = run_all("--plan", str(data), env={"OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stderr
    prepared = dict((n, s) for s, n in plan_lines(r.stdout, "prepare"))
    for name in SCALE_AXIS + TARGETS + ["imagenet1k"]:
        assert prepared.get(name) == "run", (name, r.stdout)
    pretrain = dict((n, s) for s, n in plan_lines(r.stdout, "pretrain"))
    for model in ("R50x1", "R152x4"):
        for source in SCALE_AXIS + ["imagenet1k"]:
            assert pretrain.get(f"{model} {source} seed 42") == "run", (model, source, r.stdout)  # the paper's seed
    transfer = [n for s, n in plan_lines(r.stdout, "transfer") if s == "run"]
    # the paper's shots per target, and Google's BiT-M for the model it is there for
    assert "covidx R50x1 bit-m (30 cells: shots 1 5 10 100 500 full x seeds 0 1 2 3 4)" in transfer
    assert "flowers102 R152x4 chexpert_mimic_nih_padchest seed 42 (20 cells: shots 1 5 10 full x seeds 0 1 2 3 4)" in transfer
    assert "padchest R50x1 scratch (25 cells: shots 1 5 10 100 full x seeds 0 1 2 3 4)" in transfer
    assert not any("R152x4 bit-m" in n for n in transfer)
    # 7 targets x 2 models x (scratch + 7 sources + imagenet1k) + bit-m for R50x1, less PadChest from
    # the two sources that validated on its test split: skipped, and the plan says why
    assert len(transfer) == 7 * 2 * 9 + 7 - 2 * 2
    skipped = [n for s, n in plan_lines(r.stdout, "transfer") if s == "skip"]
    for model in ("R50x1", "R152x4"):
        for source in ("padchest", "chexpert_mimic_nih_padchest"):
            assert f"padchest {model} {source} seed 42 (25 cells: shots 1 5 10 100 full x seeds 0 1 2 3 4): {source} " \
                   "validated on padchest's test split, its best.pt chosen on the target's test rows (not in the " \
                   "paper)" in skipped
    assert len(skipped) == 4
    assert f"transfer cells (fine-tuning runs): {sum(int(n.split('(')[1].split()[0]) for n in transfer)}" in r.stdout


def test_failing_jobs_are_listed_and_the_rest_runs(tmp_path):
    data = tmp_path / "data"
    for name in ("covidx", "tuberculosis"):   # downloads without a single image: prepare fails
        (data / name).mkdir(parents=True)
    r = run_all(str(data), env={"OUT": str(tmp_path / "out"), "STAGES": "prepare"}, timeout=120)
    assert r.returncode == 1
    tail = r.stderr[r.stderr.index("run_all.sh: 2 job(s) failed:"):]
    assert "prepare covidx" in tail and "prepare tuberculosis" in tail   # the second ran after the first failed


def test_every_target_end_to_end(tmp_path):
    """The real-data branch over tiny layouts of every target, from scratch, through prepare,
    transfer and the summary."""
    data = tmp_path / "data"
    raw_layouts.write_all(data)
    shutil.rmtree(data / "flowers102")
    raw_layouts.flowers102(data / "flowers102", test_per_class=10)  # the paper trains on the official test set
    out = tmp_path / "out"
    r = run_all(str(data), env={
        "OUT": str(out), "MODELS": "R14x1", "SHOTS": "1 100 full", "SEEDS": "0",  # 100: more than a class has
        "STAGES": "prepare transfer summary",
        "TARGETS": " ".join(TARGETS), "PREPARE_ARGS": "--size 24 --workers 1",
        "TRANSFER_ARGS": "--steps 2 --batch-size 4 --resize 24 --crop 16 --bootstrap 10 --log-every 1"},
        timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = pd.read_csv(out / "results.csv")
    assert set(results["source"]) == {"scratch"}
    assert len(results) == len(TARGETS) * 3  # k = 100 ran on what the short classes have
    assert len(set(results["target"])) == len(TARGETS)
    assert (out / "summary.md").exists()


def test_demo_sources_share_their_labels(tmp_path):
    """The demo's raw folders parse with the real readers, and its two sources (CheXpert alone,
    CheXpert + MIMIC) have the same 13 labels, so the demo compares sizes, not label sets."""
    P.make_demo(tmp_path / "raw", n_chexpert=30, n_mimic=40, n_target=10, image_size=32)
    prepared = {}
    for name, raw in (("chexpert", "chexpert"), ("mimic", "mimic-cxr-jpg"), ("tuberculosis", "tuberculosis")):
        out = tmp_path / name
        P.main(P.get_args_parser().parse_args(["--dataset", name, "--root", str(tmp_path / "raw" / raw),
                                               "--out", str(out), "--size", "16", "--workers", "1"]))
        prepared[name] = P.read_meta(out)
    P.main(P.get_args_parser().parse_args(["--dataset", "merge", "--inputs", str(tmp_path / "chexpert"),
                                           str(tmp_path / "mimic"), "--out", str(tmp_path / "chexpert_mimic")]))
    merged = P.read_meta(tmp_path / "chexpert_mimic")
    assert len(prepared["chexpert"]["labels"]) == 13
    assert sorted(prepared["chexpert"]["labels"]) == sorted(prepared["mimic"]["labels"]) == sorted(merged["labels"])
    assert prepared["tuberculosis"]["labels"] == ["normal", "tuberculosis"]
    counts = pd.read_csv(tmp_path / "chexpert_mimic" / "labels.csv")["split"].value_counts()
    assert counts["train"] > 0 and counts["valid"] > 0


def test_demo_runs_each_job_once_with_its_whole_command(tmp_path):
    """The demo's jobs with a stand-in `python` that records its arguments (and fails
    pretrain.py): every job runs once with the recipe's flags in one command, a failed job does
    not stop the rest, and the script ends with status 1 listing it."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                    'case "$1" in pretrain.py) exit 1 ;; esac\nexit 0\n')
    (bin_dir / "python").chmod(0o755)
    out = tmp_path / "out"
    r = run_all(env={"OUT": str(out), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    lines = calls.read_text().splitlines()
    jobs = [line for line in lines if line.split(" ")[0].endswith(".py")]   # n_train's `python -c` aside
    assert [j.split()[0] for j in jobs] == ["prepare_data.py"] * 5 + ["pretrain.py"] * 6 + ["fewshot.py"] * 8
    for j in jobs:
        if j.startswith("pretrain.py"):
            assert "--recipe paper" in j and "--epochs 8" in j and "--lr 0.8" in j and "--shift 0.1" in j
            seed = j.split("--seed ")[1].split()[0]
            assert f"/seed{seed} " in j   # one folder per pre-training seed
        if j.startswith("fewshot.py --data"):
            assert "--recipe paper" in j and "--steps 40 --min-epochs 10" in j and "--seeds 0 1 2 " in j
            assert ("--source-seed" in j) == ("best.pt" in j)   # scratch has no pre-training seed
        if j.startswith("prepare_data.py --dataset tuberculosis"):
            assert "--size 34 --test-fraction 0.75" in j
    best = [j.split("--init ")[1].split()[0] for j in jobs if "best.pt" in j]  # the lowest-validation-loss weights
    assert [b.split("/pretrain/")[1] for b in best] == [f"R14x0.5/{s}/seed{seed}/best.pt" for s in
                                                        ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)]
    assert r.returncode == 1
    assert r.stderr.strip().endswith("run_all.sh: 6 job(s) failed:\n" + "\n".join(
        f"  pretrain R14x0.5 {s} seed {seed}" for s in ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)))
