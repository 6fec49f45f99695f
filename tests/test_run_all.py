"""run_all.sh: usage text, every setting checked in one line, the printed plan (demo settings
honoured; the paper's scale axis on a DATA folder of every raw layout; done cells; estimates),
names passed as data, one Ctrl-C stopping the study, failing jobs that do not stop the script,
and a tiny run of every target through prepare, transfer and summary."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

import prepare_data as P
import raw_layouts

ROOT = Path(__file__).resolve().parents[1]
SCALE_AXIS = ["chexpert", "chexpert_mimic", "chexpert_mimic_nih", "chexpert_mimic_nih_padchest",
              "mimic", "nih", "padchest"]
TARGETS = ["covidx", "tuberculosis", "padchest", "cifar10", "cifar100", "flowers102", "pets"]


SETTINGS = ("OUT", "MODELS", "SOURCES", "TARGETS", "SHOTS", "SEEDS", "PRETRAIN_SEEDS", "STAGES", "NPROC",
            "PREPARE_ARGS", "PRETRAIN_ARGS", "TRANSFER_ARGS")


def run_all(*args, env=None, timeout=60, cwd=None):
    """run_all.sh's CompletedProcess; on a timeout its whole process group is killed first."""
    full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env.update(env or {})
    proc = subprocess.Popen(["bash", str(ROOT / "run_all.sh"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stand_in_python(tmp_path, script):
    """A `python` first on PATH that records its arguments in tmp_path/calls.txt, then runs the
    shell `script` (on "$1", the script name): the jobs' commands without running them."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{script}\nexit 0\n')
    (bin_dir / "python").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


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


SEED_RANGE = "a seed (a whole number from 0 to 4294967295)"


# Every argument and setting with a bad value (issue 21's sweep): one line, status 2, nothing run.
@pytest.mark.parametrize("args,env,message", [
    (["/no/such/folder"], {}, "DATA folder '/no/such/folder' not found"),
    (["--bogus"], {}, "unknown option --bogus"),
    (["a\nb"], {}, "DATA or OUT holds a newline"),
    ([], {"OUT": "TMP/out\nx"}, "DATA or OUT holds a newline"),
    ([], {"OUT": "/dev/null"}, "OUT '/dev/null' is a file"),
    ([], {"MODELS": "R50"}, "MODELS: 'R50' is not a model (one of: R14x0.5 R14x1 R26x1 R50x1"),
    ([], {"MODELS": "R50x1 R50x1"}, "MODELS: 'R50x1' is given twice"),
    ([], {"MODELS": " "}, "MODELS is empty"),
    ([], {"SOURCES": "*"}, "SOURCES: '*' is not a source"),
    ([], {"SOURCES": "chexpert imagenet1k"}, "SOURCES: 'imagenet1k' is not a source"),
    ([], {"TARGETS": "tuberculosis mnist"}, "TARGETS: 'mnist' is not a target"),
    ([], {"STAGES": "prepare train"}, "STAGES: 'train' is not a stage"),
    ([], {"STAGES": " "}, "STAGES is empty"),
    ([], {"SHOTS": "0"}, "SHOTS: '0' is not a number of shots"),
    ([], {"SHOTS": "1 -5"}, "SHOTS: '-5' is not a number of shots"),
    ([], {"SHOTS": "5 5"}, "SHOTS: '5' is given twice"),
    ([], {"SHOTS": "Full"}, "SHOTS: 'Full' is not a number of shots"),
    ([], {"SEEDS": "0 a"}, f"SEEDS: 'a' is not {SEED_RANGE}"),
    ([], {"SEEDS": "-1"}, f"SEEDS: '-1' is not {SEED_RANGE}"),
    ([], {"SEEDS": "4294967296"}, f"SEEDS: '4294967296' is not {SEED_RANGE}"),
    ([], {"SEEDS": "1 1"}, "SEEDS: '1' is given twice"),
    ([], {"SEEDS": " "}, "SEEDS is empty"),
    ([], {"PRETRAIN_SEEDS": "0 one"}, f"PRETRAIN_SEEDS: 'one' is not {SEED_RANGE}"),
    ([], {"PRETRAIN_SEEDS": "1.5"}, f"PRETRAIN_SEEDS: '1.5' is not {SEED_RANGE}"),
    ([], {"PRETRAIN_SEEDS": " "}, "PRETRAIN_SEEDS is empty"),
    ([], {"NPROC": "0"}, "NPROC: '0' is not a number of GPUs per node"),
    ([], {"NPROC": "two"}, "NPROC: 'two' is not a number of GPUs per node"),
    ([], {"NPROC": "2 2"}, "NPROC: '2 2' is not a number of GPUs per node"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, message):
    env = {"OUT": str(tmp_path / "out"), **{k: v.replace("TMP", str(tmp_path)) for k, v in env.items()}}
    r = run_all(*args, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("run_all.sh: error: ") and message in r.stderr
    assert os.listdir(tmp_path) == []   # nothing ran


def test_every_model_of_models_py_is_accepted(tmp_path):
    import models
    r = run_all("--plan", env={"OUT": str(tmp_path), "MODELS": " ".join(models.MODEL_NAMES), "SOURCES": "chexpert"})
    assert r.returncode == 0, r.stderr
    assert [n for s, n in plan_lines(r.stdout, "pretrain")] == [f"{m} chexpert seed {seed}" for m in models.MODEL_NAMES
                                                                for seed in (0, 1, 2)]


def test_demo_plan_honours_settings(tmp_path):
    r = run_all("--plan", env={"OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    # each source pre-trained with three seeds, each transferred with three fine-tuning seeds
    assert [n for s, n in plan_lines(r.stdout, "pretrain")] == [f"R14x0.5 {s} seed {seed}" for s in
                                                                ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)]
    transfers = [n for s, n in plan_lines(r.stdout, "transfer")]
    assert [n.split(" (")[0] for n in transfers] == ["tuberculosis R14x0.5 scratch"] + [
        f"tuberculosis R14x0.5 {s} seed {seed}" for s in ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)]
    assert "transfer cells (fine-tuning runs): 84 to run, 0 done" in r.stdout   # (1 + 2 sources x 3) x 4 shots x 3 seeds
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
    assert f"transfer cells (fine-tuning runs): {sum(int(n.split('(')[1].split()[0]) for n in transfer)} to run, 0 done" \
        in r.stdout


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
    not stop the rest, no transfer runs from a failed pre-training, and the script ends with
    status 1 listing them."""
    env, calls = stand_in_python(tmp_path, 'case "$1" in pretrain.py) exit 1 ;; esac')
    out = tmp_path / "out"
    r = run_all(env={"OUT": str(out), **env})
    lines = calls.read_text().splitlines()
    jobs = [line for line in lines if line.split(" ")[0].endswith(".py")]   # the plan's `python -c` aside
    assert [j.split()[0] for j in jobs] == ["prepare_data.py"] * 5 + ["pretrain.py"] * 6 + ["fewshot.py"] * 2
    for j in jobs:
        if j.startswith("pretrain.py"):
            assert "--recipe paper" in j and "--epochs 8" in j and "--lr 0.8" in j and "--shift 0.1" in j
            seed = j.split("--seed ")[1].split()[0]
            assert f"/seed{seed} " in j   # one folder per pre-training seed
        if j.startswith("prepare_data.py --dataset tuberculosis"):
            assert "--size 34 --test-fraction 0.75" in j
    scratch, summary = jobs[-2:]
    assert scratch.startswith("fewshot.py --source scratch --source-size 0 --data") and "--init scratch" in scratch
    assert "--recipe paper" in scratch and "--steps 40 --min-epochs 10" in scratch and "--seeds 0 1 2 " in scratch
    assert summary == f"fewshot.py --summarize {out}"
    assert "== job 11 of 19: pretrain R14x0.5 chexpert_mimic seed 2" in r.stdout   # the counter counts every job
    assert r.stdout.count("=== stage ") == 4
    assert r.returncode == 1
    pretrains = [f"R14x0.5 {s} seed {seed}" for s in ("chexpert", "chexpert_mimic") for seed in (0, 1, 2)]
    for p in pretrains:
        assert f"run_all.sh: SKIPPED transfer tuberculosis {p} (12 cells" in r.stderr
    assert r.stderr.strip().endswith("run_all.sh: 12 job(s) failed:\n" + "\n".join(
        [f"  pretrain {p}" for p in pretrains] +
        [f"  transfer tuberculosis {p} (12 cells: shots 1 5 10 full x seeds 0 1 2)" for p in pretrains]))


@pytest.mark.parametrize("status", [130, 143, 137])
def test_a_job_ended_by_a_signal_stops_the_study(tmp_path, status):
    """pretrain.py stopped by Ctrl-C saves and exits 128 + the signal: that is not finished work,
    so nothing after it runs (no transfer from its best.pt) and one line says how to continue."""
    env, calls = stand_in_python(tmp_path, f'case "$1" in pretrain.py) exit {status} ;; esac')
    r = run_all(env={"OUT": str(tmp_path / "out"), **env})
    jobs = [line.split()[0] for line in calls.read_text().splitlines() if line.split(" ")[0].endswith(".py")]
    assert jobs == ["prepare_data.py"] * 5 + ["pretrain.py"]
    assert r.returncode == status
    assert r.stderr.strip().splitlines()[-1] == (
        f"run_all.sh: stopped by a signal to the job (status {status}) during pretrain R14x0.5 chexpert seed 0; "
        "finished work is kept: run the same command again to continue")


def test_sigterm_to_the_script_alone_reaches_the_running_job(tmp_path):
    """`kill PID` of run_all.sh (not its group): the running job gets the signal at once, rather
    than the study waiting for it to end, and nothing starts after it."""
    env, calls = stand_in_python(tmp_path, 'case "$1" in pretrain.py) exec sleep 60 ;; esac')
    env = {**{k: v for k, v in os.environ.items() if k not in SETTINGS}, **env, "OUT": str(tmp_path / "out")}
    proc = subprocess.Popen(["bash", str(ROOT / "run_all.sh")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True, text=True)
    try:
        deadline = time.time() + 30
        while "pretrain.py" not in (calls.read_text() if calls.exists() else ""):   # the job has started
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1] == ("run_all.sh: stopped by SIGTERM during pretrain R14x0.5 chexpert seed "
                                               "0; finished work is kept: run the same command again to continue")
    assert "fewshot.py" not in calls.read_text()


def demo_prepared(out, n_train=12):
    """Tiny prepared folders where the demo expects them, so that it starts at pre-training."""
    from prepared import write_prepared
    (out / "raw" / "tuberculosis").mkdir(parents=True)
    write_prepared(out / "prepared" / "chexpert", n_train=n_train, eval_split="valid", views=("PA", "AP"))
    write_prepared(out / "prepared" / "tuberculosis", labels=("normal", "tuberculosis"))


def test_ctrl_c_stops_the_whole_study(tmp_path):
    """SIGINT to run_all.sh's process group (Ctrl-C) during pre-training: every process ends
    within seconds, nothing starts after (no second pre-training, no transfer from the interrupted
    weights), status 130 and one line saying how to continue."""
    out = tmp_path / "out"
    demo_prepared(out, n_train=64)
    log = open(tmp_path / "log.txt", "w+")
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update({"OUT": str(out), "SOURCES": "chexpert", "PRETRAIN_SEEDS": "0 1", "STAGES": "pretrain transfer summary",
                "PRETRAIN_ARGS": "--image-size 16 --batch-size 8 --epochs 1000 --workers 0 --log-every 1 "
                                 "--eval-every 1000000"})  # the signal lands in training
    proc = subprocess.Popen(["bash", str(ROOT / "run_all.sh")], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, text=True)
    try:
        deadline = time.time() + 120
        while "step 2/" not in (tmp_path / "log.txt").read_text():   # pre-training is under way
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        status = proc.wait(timeout=60)
        stopped_in = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "log.txt").read_text()
    assert status == 130, text
    assert stopped_in < 30, text
    assert text.strip().splitlines()[-1] == (
        "run_all.sh: stopped by SIGINT during pretrain R14x0.5 chexpert seed 0; finished work is kept: "
        "run the same command again to continue")
    assert "job 2 of" not in text and "fewshot" not in text
    seed0 = out / "pretrain" / "R14x0.5" / "chexpert" / "seed0"
    assert (seed0 / "checkpoint.pt").exists() and not (seed0 / "model.pt").exists()   # saved, not finished
    assert not (out / "pretrain" / "R14x0.5" / "chexpert" / "seed1").exists()
    assert not (out / "results.csv").exists()
    with pytest.raises(ProcessLookupError):   # no process of the study is left
        os.killpg(proc.pid, 0)
    # the plan of the same command: the interrupted pre-training runs again, then its transfers
    r = run_all("--plan", env={k: env[k] for k in ("OUT", "SOURCES", "PRETRAIN_SEEDS", "STAGES")})
    assert ("run", "R14x0.5 chexpert seed 0") in plan_lines(r.stdout, "pretrain")


def test_names_are_data_and_relative_paths_the_callers(tmp_path):
    """A DATA folder whose name holds $(...), quotes, * and spaces, and an OUT with a space, both
    relative to the caller's folder (not the script's): prepared where the caller meant, and no
    command from a name runs."""
    name = "d$(touch PWNED) 'q' \"*\" x"
    raw_layouts.tuberculosis(tmp_path / name / "tuberculosis", n=12, size=16)
    try:
        r = run_all(name, env={"OUT": "p25 out", "STAGES": "prepare", "TARGETS": "tuberculosis", "SOURCES": "chexpert",
                               "PREPARE_ARGS": "--size 16 --workers 1"}, cwd=tmp_path, timeout=120)
        assert not (tmp_path / "PWNED").exists() and not (ROOT / "PWNED").exists()
    finally:
        (ROOT / "PWNED").unlink(missing_ok=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"data {tmp_path / name}, output {tmp_path / 'p25 out'}" in r.stdout
    assert [n for s, n in plan_lines(r.stdout, "prepare") if s == "run"] == ["tuberculosis"]  # chexpert: no raw folder
    assert (tmp_path / "p25 out" / "prepared" / "tuberculosis" / "meta.json").exists()
    assert sorted(os.listdir(tmp_path)) == sorted([name, "p25 out"])


def test_plan_prepares_only_what_the_chosen_sources_and_targets_need(tmp_path):
    data = tmp_path / "data"
    raw_layouts.write_all(data)
    for sources, targets, expected in (("nih", "covidx", ["nih", "imagenet1k", "covidx"]),
                                       ("chexpert_mimic", "padchest", ["chexpert", "mimic", "padchest", "imagenet1k",
                                                                       "chexpert_mimic"])):
        r = run_all("--plan", str(data), env={"OUT": str(tmp_path / "out"), "STAGES": "prepare",
                                               "SOURCES": sources, "TARGETS": targets})
        assert r.returncode == 0, r.stderr
        assert [n for s, n in plan_lines(r.stdout, "prepare")] == expected


def test_plan_counts_done_cells_unless_their_weights_are_trained_now(tmp_path):
    out = tmp_path / "out"
    demo_prepared(out)
    (out / "pretrain" / "R14x0.5" / "chexpert" / "seed0").mkdir(parents=True)
    (out / "pretrain" / "R14x0.5" / "chexpert" / "seed0" / "model.pt").write_bytes(b"")   # pre-trained: seed 0
    rows = [("scratch", "", 1), ("scratch", "", 0), ("chexpert", "0", 1), ("chexpert", "1", 1), ("chexpert", "1", 0)]
    pd.DataFrame([{"method": "finetune", "source": s, "source_seed": ss, "model": "R14x0.5", "target": "tuberculosis",
                   "shots": k, "seed": 0} for s, ss, k in rows]).to_csv(out / "results.csv", index=False)
    r = run_all("--plan", env={"OUT": str(out), "SOURCES": "chexpert", "PRETRAIN_SEEDS": "0 1", "SHOTS": "1 full",
                               "SEEDS": "0"})
    assert r.returncode == 0, r.stderr
    assert plan_lines(r.stdout, "transfer") == [
        ("done", "tuberculosis R14x0.5 scratch (2 cells: shots 1 full x seeds 0)"),
        ("run", "tuberculosis R14x0.5 chexpert seed 0 (2 cells, 1 done: shots 1 full x seeds 0)"),
        ("run", "tuberculosis R14x0.5 chexpert seed 1 (2 cells: shots 1 full x seeds 0)")]   # seed 1 trains now
    assert "transfer cells (fine-tuning runs): 3 to run, 3 done" in r.stdout


def test_plan_estimates_gpu_hours_and_disk_per_stage(tmp_path):
    """The documented per-image cost: R50x1 trains ~900 images/s on a GPU, so 90 epochs of
    CheXpert's 191,010 images are ~5.3 GPU-hours; its weights 4 x 23.5 M x 4 bytes; CheXpert's
    224,316 images stored at 256 px, 14.7 GB, and Tuberculosis' 800 at 512 px, 0.2 GB; a 1-shot
    cell 500 steps of 128 images at 480 px."""
    data = tmp_path / "data"
    raw_layouts.write_all(data)
    shutil.rmtree(data / "imagenet")
    env = {"OUT": str(tmp_path / "out"), "MODELS": "R50x1", "SOURCES": "chexpert", "TARGETS": "tuberculosis",
           "SHOTS": "1", "SEEDS": "0"}
    r = run_all("--plan", str(data), env=env)
    assert "  prepare: 2 run (estimate: 0.0 GPU-hours, 14.9 GB)" in r.stdout
    assert "  pretrain: 1 run (estimate: 5.3 GPU-hours, 0.4 GB)" in r.stdout
    assert "  transfer: 2 run (estimate: 0.2 GPU-hours, 0.0 GB)" in r.stdout
    r4 = run_all("--plan", str(data), env={**env, "MODELS": "R152x4"})   # 50 / 16 blocks x 4^2 the FLOPs
    assert "  pretrain: 1 run (estimate: 263.6 GPU-hours, 14.8 GB)" in r4.stdout
    assert "estimates are rough" in r.stdout
