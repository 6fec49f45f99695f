#!/usr/bin/env bash
# The whole study as a recipe: prepare data -> pre-train -> few-shot transfer -> table and plots.
# `bash run_all.sh -h` prints the usage: stages, settings, examples.
set -uo pipefail   # no `set -e`: a failing job is logged and the rest of the study runs
set -f             # settings are lists of words, split on whitespace and never globbed
PROG=run_all.sh

usage() {
    cat <<'EOF'
usage: bash run_all.sh [--plan] [DATA]

The study of Cherti & Jitsev (arXiv 2106.00116) as one recipe, in four stages:
  prepare   raw downloads -> prepared folders (prepare_data.py); the merged sources of the
            paper's scale axis: chexpert_mimic, chexpert_mimic_nih, chexpert_mimic_nih_padchest
  pretrain  every source x model with pretrain.py --recipe paper (ImageNet-1k with the paper's
            imagenet1k recipe when DATA/imagenet exists)
  transfer  fewshot.py --recipe paper: every target x model x source (scratch, the pre-trained
            sources' best.pt, released ImageNet weights in DATA/weights) over shots x seeds;
            not PadChest from padchest or chexpert_mimic_nih_padchest (validated on its test split)
  summary   fewshot.py --summarize: summary.csv / summary.md / fewshot.png, the paper's numbers beside

  (no DATA)  the demo: the same recipe scaled down (R14x0.5, 32 px, a few epochs and steps) on
             synthetic chest X-rays written in the real CheXpert / MIMIC-CXR-JPG / tuberculosis
             layouts; a CPU finishes it in minutes. Output: runs/demo.
  DATA       the paper's study on the raw downloads under DATA (absent datasets are skipped):
             chexpert/ mimic-cxr-jpg/ nih/ padchest/ covidx/ tuberculosis/ cifar10/ cifar100/
             flowers102/ pets/ imagenet/ (ILSVRC2012 train/ val/, optional)
             weights/ (optional): BiT-S-<model>.npz, BiT-M-<model>.npz (Google's, sources bit-s,
             bit-m), imagenet1k_bit50x1/model.pth.tar, imagenet21k_bit152x4/model.pth.tar, ...
             (the paper's released weights, sources imagenet1k and imagenet21k)
  --plan     print the plan (every job, run / done / skipped, with counts and a rough estimate
             of GPU-hours and disk per stage) and stop

Before it starts, the script checks every setting (one line and status 2 for a bad one) and
prints the plan. Finished work is skipped when it runs again (prepared folders, pre-trained
models, transfer cells already in results.csv). A failing job is logged and the rest runs (not
the transfers from a pre-training that failed); the script then ends with status 1 and the list
of what failed. One Ctrl-C (or SIGTERM) stops the study: the running job saves what it finished
and nothing else starts; run the same command again to continue.

Settings (environment variables; demo values in brackets):
  OUT            output folder (runs/study in this folder) [runs/demo]; a relative DATA or OUT
                 is taken from the folder you run the script in
  MODELS         models ("R50x1 R152x4") [R14x0.5]
  SOURCES        pre-training sources ("chexpert chexpert_mimic chexpert_mimic_nih
                 chexpert_mimic_nih_padchest mimic nih padchest") [chexpert chexpert_mimic]
  TARGETS        targets ("covidx tuberculosis padchest cifar10 cifar100 flowers102 pets") [tuberculosis]
  SHOTS          shots for every target (default: the paper's per target: CIFAR and COVIDx
                 1 5 10 100 500 full, PadChest and Tuberculosis 1 5 10 100 full, Pets and
                 Flowers 1 5 10 full) [1 5 10 full]
  SEEDS          fine-tuning seeds ("0 1 2 3 4") [0 1 2]
  PRETRAIN_SEEDS pre-training seeds: each source is pre-trained once per seed (pretrain/<model>/
                 <source>/seed<S>/) and transferred from each, so that the summary counts
                 pre-training luck ("42", the paper's one run) [0 1 2]
  STAGES         stages to run ("prepare pretrain transfer summary")
  NPROC          GPUs per node for pretrain.py / fewshot.py under torchrun (1: plain python)
  PREPARE_ARGS   extra flags for prepare_data.py (e.g. "--workers 32"); these three are split
                 on whitespace, never evaluated (no quoting: a value cannot hold a space)
  PRETRAIN_ARGS  extra flags for pretrain.py, after the recipe's (e.g. "--dtype bf16 --compile")
  TRANSFER_ARGS  extra flags for fewshot.py, after the recipe's

Examples:
  bash run_all.sh                                    # the demo
  SEEDS="0 1 2 3 4" PRETRAIN_SEEDS=0 bash run_all.sh  # the demo with one pre-training, five seeds
  bash run_all.sh --plan /data                       # what the study on /data would run
  NPROC=8 bash run_all.sh /data                      # the whole study on one 8-GPU node
  STAGES="prepare" bash run_all.sh /data             # only some stages
  MODELS=R50x1 TARGETS="covidx tuberculosis" SEEDS="0 1 2" bash run_all.sh /data
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }

PLAN_ONLY=0
DATA=
for arg in "$@"; do
    case $arg in
        -h|--help) usage; exit 0 ;;
        --plan) PLAN_ONLY=1 ;;
        -*) die "unknown option $arg (bash run_all.sh -h for the usage)" ;;
        *) [ -z "$DATA" ] || die "one DATA folder only (got '$DATA' and '$arg')"
           DATA=$arg ;;
    esac
done
# Paths are data: every job gets them as one argument each, never re-read by the shell. A newline
# would break the plan's lines and the logs: refused.
[[ $DATA${OUT:-} != *$'\n'* ]] || die "DATA or OUT holds a newline: rename the folder"
[ -z "$DATA" ] || [ -d "$DATA" ] || die "DATA folder '$DATA' not found (bash run_all.sh -h for the usage)"
# a relative DATA or OUT is the caller's; the jobs run in the script's folder
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ -z "$DATA" ] || DATA=$(abs "$DATA")
[ -z "${OUT:-}" ] || OUT=$(abs "$OUT")
cd "$(dirname "$0")" || die "cannot enter the script's folder"

# ------------------------------------------------------------------------------ settings --
if [ -z "$DATA" ]; then
    # The demo: the paper's recipe with its sizes scaled down (README, "The demo"). Sources of
    # different size with the same 13 labels: CheXpert alone and CheXpert + MIMIC.
    OUT=${OUT:-runs/demo}
    DATA=$OUT/raw
    MODELS=${MODELS:-R14x0.5}
    SOURCES=${SOURCES:-"chexpert chexpert_mimic"}
    TARGETS=${TARGETS:-tuberculosis}
    # three pre-trainings per source x three fine-tuning seeds: one pre-training per source could
    # not tell a gap between the sources from that run's luck (README, "The demo")
    SEEDS=${SEEDS:-"0 1 2"}
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-"0 1 2"}
    SHOTS=${SHOTS:-"1 5 10 full"}
    SOURCE_PX=40 TARGET_PX=34   # stored sizes (paper: 256 for the 224-px sources, 512 for the targets)
    # pre-training: R50x1 -> R14x0.5, 224 px -> 32, batch 1024 -> 32, 90 epochs -> 8 (warm-up
    # 15 -> 1, decays 30 60 80 -> 6 7: the paper's shape, 9 epochs with decays 3 6 8, left too
    # little time at the peak: transfer accuracy fell 0.05-0.1); for a few hundred steps instead
    # of ~100k: lr 0.01 per 256 -> 0.8 and augmentation rotate 45 / shift .25 -> 10 / .1
    # (measured: under the paper's values a 6-epoch run stays near chance, validation AUC 0.50)
    RECIPE_PRETRAIN=(--image-size 32 --batch-size 32 --epochs 8 --warmup-epochs 1 --decay-epochs 6 7
                     --lr 0.8 --rotate 10 --shift 0.1 --log-every 50)
    # fine-tuning: HyperRule's 500 steps -> 40, and at least 10 passes over the subset (the
    # paper's 500 x 128 images are 90 passes over the full set; 40 steps would be 4), batch 128
    # -> 16, 512/480 px -> 34/32, lr 0.001 -> 0.01 (measured: with 30 steps, or at lr 0.003 or
    # 0.005, 10-shot was no better than 5-shot for the larger source; with 5 passes its full-shot
    # was no better than its 10-shot)
    RECIPE_TRANSFER=(--steps 40 --min-epochs 10 --batch-size 16 --resize 34 --crop 32 --lr 0.01 --log-every 100)
    DEMO=1
else
    OUT=${OUT:-runs/study}
    MODELS=${MODELS:-"R50x1 R152x4"}
    SOURCES=${SOURCES:-"chexpert chexpert_mimic chexpert_mimic_nih chexpert_mimic_nih_padchest mimic nih padchest"}
    TARGETS=${TARGETS:-"covidx tuberculosis padchest cifar10 cifar100 flowers102 pets"}
    SEEDS=${SEEDS:-"0 1 2 3 4"}
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-42}
    SHOTS=${SHOTS:-}
    SOURCE_PX=256 TARGET_PX=512   # sources: the paper's 224-px crops; targets: HyperRule 512/480
    RECIPE_PRETRAIN=() RECIPE_TRANSFER=()
    DEMO=0
fi
STAGES=${STAGES:-"prepare pretrain transfer summary"}
NPROC=${NPROC:-1}
PREPARE=(${PREPARE_ARGS:-}) PRETRAIN=(${PRETRAIN_ARGS:-}) TRANSFER=(${TRANSFER_ARGS:-})  # split, not evaluated
P=$OUT/prepared

# Every setting is checked before anything runs: one line naming it, status 2.
check() {  # check SETTING REGEX WHAT [MAX]: every word of $SETTING matches REGEX (and is <= MAX), none twice
    local w seen=" "
    for w in ${!1}; do
        [[ $w =~ ^($2)$ ]] && { [ -z "${4:-}" ] || (( 10#$w <= $4 )); } || die "$1: '$w' is not $3"
        [[ $seen != *" $w "* ]] || die "$1: '$w' is given twice"
        seen+="$w "
    done
}
one_of() { local s="$*"; s=${s//./\\.}; echo "${s// /|}"; }   # a regex matching one of the words
ALL_SOURCES="chexpert chexpert_mimic chexpert_mimic_nih chexpert_mimic_nih_padchest mimic nih padchest"
ALL_TARGETS="covidx tuberculosis padchest cifar10 cifar100 flowers102 pets"
ALL_STAGES="prepare pretrain transfer summary"
MODEL_NAMES=$(sed -n 's/^MODEL_NAMES = \[\(.*\)\]$/\1/p' models.py | tr -d '",')  # models.py's list (importing it takes seconds)
for s in MODELS SEEDS PRETRAIN_SEEDS STAGES; do [ -n "${!s// /}" ] || die "$s is empty (bash run_all.sh -h for the usage)"; done
check MODELS "$(one_of $MODEL_NAMES)" "a model (one of: $MODEL_NAMES)"
check SOURCES "$(one_of $ALL_SOURCES)" "a source (one of: $ALL_SOURCES)"
check TARGETS "$(one_of $ALL_TARGETS)" "a target (one of: $ALL_TARGETS)"
check STAGES "$(one_of $ALL_STAGES)" "a stage (one of: $ALL_STAGES)"
check SHOTS "[1-9][0-9]{0,8}|full" "a number of shots (a whole number >= 1, or full)"
check SEEDS "[0-9]{1,10}" "a seed (a whole number from 0 to 4294967295)" 4294967295
check PRETRAIN_SEEDS "[0-9]{1,10}" "a seed (a whole number from 0 to 4294967295)" 4294967295
[[ $NPROC =~ ^[1-9][0-9]{0,2}$ ]] || die "NPROC: '$NPROC' is not a number of GPUs per node (1 to 999)"
[ ! -e "$OUT" ] || [ -d "$OUT" ] || die "OUT '$OUT' is a file, not a folder"
if [ "$NPROC" = 1 ]; then LAUNCH=(python); else LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC"); fi

# ---------------------------------------------------------------------- the paper's rules --
raw_folder() {  # prepared name -> folder under DATA
    case $1 in mimic) echo mimic-cxr-jpg ;; imagenet1k) echo imagenet ;; *) echo "$1" ;; esac
}
made_of() {  # the prepared datasets a source is: the paper's merged ones, each one more dataset than the last
    case $1 in
        chexpert_mimic) echo "chexpert mimic" ;;
        chexpert_mimic_nih) echo "chexpert mimic nih" ;;
        chexpert_mimic_nih_padchest) echo "chexpert mimic nih padchest" ;;
        *) echo "$1" ;;
    esac
}
views() {  # VIEWS: the views a source is pre-trained on (recipes.md): PadChest's configs use five
    case $1 in *padchest) VIEWS=(PA AP "AP Supine" L COSTAL) ;; *) VIEWS=(PA AP) ;; esac
}
shots_for() {  # shots per target as the paper ran them; SHOTS overrides all
    if [ -n "$SHOTS" ]; then echo "$SHOTS"; return; fi
    case $1 in
        cifar10|cifar100|covidx) echo "1 5 10 100 500 full" ;;
        padchest|tuberculosis) echo "1 5 10 100 full" ;;
        *) echo "1 5 10 full" ;;
    esac
}
imagenet_recipe() {  # the paper's own ImageNet-1k runs: R50x1 plain SGD, R152x4 SGD_AGC
    case $1 in R152x4) echo imagenet1k-r152x4 ;; *) echo imagenet1k-r50x1 ;; esac
}
source_size() {  # pre-training images of a source in its views, for the scale plot
    case $1 in
        scratch) echo 0 ;;
        imagenet1k|bit-s) echo 1281167 ;;
        imagenet21k|bit-m) echo 14197122 ;;
        *) views "$1"; python -c "import sys, pandas as pd
t = pd.read_csv(sys.argv[1] + '/labels.csv', usecols=['split', 'view'], keep_default_na=False)
print(((t['split'] == 'train') & t['view'].isin(sys.argv[2:])).sum())" "$P/$1" "${VIEWS[@]}" ;;
    esac
}
# transfer SOURCE FLAG...: fewshot.py with the source's size, counted once it is prepared. Only
# ever run as a job (forked): exec makes fewshot.py the job's process.
transfer() {
    exec "${LAUNCH[@]}" fewshot.py --source "$1" --source-size "$(source_size "$1")" "${@:2}"
}

# ----------------------------------------------------------------- a rough cost estimate --
# For the plan of a study, the order of magnitude only. A GPU is taken to sustain 10 TFLOP/s in
# training (3 x the forward FLOPs): NVIDIA publishes ~2,700 img/s for ResNet-50 on an A100 in
# mixed precision (31 TFLOP/s so counted); BiT's GroupNorm and standardised weights are slower.
# Forward GFLOPs of a 224-px image: 0.23 a bottleneck block (He et al. 2016, Table 1: 3.8, 7.6,
# 11.3 for the 16, 33, 50 blocks of ResNet-50, 101, 152) x width^2, so R50x1 trains ~900 img/s
# and R152x4 ~18. Disk: images.npy holds size^2 x channels bytes an image; a pre-training keeps
# about 4 fp32 copies of its weights (checkpoint.pt with the momentum, best.pt, model.pt).
GPU_TFLOPS=10
declare -A GPU_HOURS DISK_GB
add_cost() {  # add_cost STAGE MODEL IMAGES PX COPIES BYTES: IMAGES trained on at PX px, COPIES of the weights and BYTES written
    local blocks=0 mparams=0
    case ${2%x*} in R14) blocks=4 mparams=6.5 ;; R26) blocks=8 mparams=13 ;; R50) blocks=16 mparams=23.5 ;;
                    R101) blocks=33 mparams=42.5 ;; R152) blocks=50 mparams=58 ;; esac
    read -r GPU_HOURS[$1] DISK_GB[$1] < <(awk -v h="${GPU_HOURS[$1]:-0}" -v g="${DISK_GB[$1]:-0}" -v b=$blocks \
        -v m=$mparams -v w="${2#*x}" -v n="$3" -v px="$4" -v c="$5" -v bytes="$6" -v tf=$GPU_TFLOPS 'BEGIN {
        print h + 3 * 0.23e9 * b * w * w * (px / 224) ^ 2 * n / (tf * 1e12 * 3600), g + (c * 4e6 * m * w * w + bytes) / 1e9 }')
}
downloaded() {  # images and channels of a download (the datasets' published counts)
    case $1 in chexpert) echo 224316 1 ;; mimic) echo 377110 1 ;; nih) echo 112120 1 ;; padchest) echo 160868 1 ;;
               imagenet1k) echo 1331167 3 ;; covidx) echo 30386 1 ;; tuberculosis) echo 800 1 ;;
               cifar10|cifar100) echo 60000 3 ;; flowers102) echo 8189 3 ;; pets) echo 7349 3 ;; esac
}
declare -A SOURCE_IMAGES   # pre-training images of the paper's sources (reference/source_sizes.csv)
while IFS=, read -r name images _; do SOURCE_IMAGES[$name]=$images; done < reference/source_sizes.csv

# ------------------------------------------------------------------------------ the plan --
# Every job: stage, name, status (run / done / skip: why), the command as its words (kept in
# one flat array, never re-read by the shell) and the job it needs (a pre-training for a
# transfer). The plan is printed first; the jobs then run in order.
J_STAGE=() J_NAME=() J_STATUS=() J_AT=() J_LEN=() J_NEEDS=() ARGV=()
add() {  # add STAGE NAME STATUS [COMMAND...]
    J_STAGE+=("$1") J_NAME+=("$2") J_STATUS+=("$3") J_AT+=(${#ARGV[@]}) J_LEN+=($(($# - 3))) J_NEEDS+=("${NEEDS:-}")
    ARGV+=("${@:4}")
}
has() { [[ " $STAGES " == *" $1 "* ]]; }
declare -A WILL_EXIST   # prepared folders present or planned
NEEDED=" $TARGETS "     # the prepared datasets the chosen sources and targets are made of
for s in $SOURCES; do NEEDED+="$(made_of "$s") "; done
[ $DEMO = 0 ] && [ -d "$DATA/imagenet" ] && NEEDED+="imagenet1k "

add_prepare() {  # add_prepare NAME DATASET PX [FLAG...]: DATA/<raw> -> P/NAME, when needed
    local name=$1 dataset=$2 px=$3 raw n c; raw=$DATA/$(raw_folder "$name"); shift 3
    [[ $NEEDED == *" $name "* ]] || return 0
    if [ -f "$P/$name/meta.json" ]; then add prepare "$name" done; WILL_EXIST[$name]=1
    elif [ $DEMO = 0 ] && [ ! -d "$raw" ]; then add prepare "$name" "skip: no $raw"
    else add prepare "$name" run python prepare_data.py --dataset "$dataset" --root "$raw" --out "$P/$name" \
             ${px:+--size "$px"} "$@" "${PREPARE[@]}"
         WILL_EXIST[$name]=1
         read -r n c <<< "$(downloaded "$name")"; add_cost prepare "" 0 0 0 $(( n * ${px:-32} ** 2 * c )); fi
}

if [ $DEMO = 1 ]; then
    if [ -d "$DATA/tuberculosis" ]; then add prepare "demo raw data" done
    else add prepare "demo raw data" run python prepare_data.py --dataset demo --out "$DATA"; fi
    add_prepare chexpert chexpert $SOURCE_PX
    add_prepare mimic mimic $SOURCE_PX
    # the target: 600 images, 3/4 held out (paper 15 %) for a steadier test score
    add_prepare tuberculosis tuberculosis $TARGET_PX --test-fraction 0.75
else
    for name in chexpert mimic nih padchest; do add_prepare $name $name $SOURCE_PX; done
    add_prepare imagenet1k imagenet $SOURCE_PX
    for name in covidx tuberculosis flowers102 pets; do add_prepare $name $name $TARGET_PX; done
    for name in cifar10 cifar100; do add_prepare $name $name ""; done   # stored at their 32 px
fi
for s in chexpert_mimic chexpert_mimic_nih chexpert_mimic_nih_padchest; do
    [[ " $SOURCES " == *" $s "* ]] || continue
    inputs=() missing="" bytes=0
    for i in $(made_of $s); do
        inputs+=("$P/$i"); [ -n "${WILL_EXIST[$i]:-}" ] || missing+=" $i"
        read -r n c <<< "$(downloaded "$i")"; bytes=$(( bytes + n * SOURCE_PX ** 2 ))
    done
    if [ -f "$P/$s/meta.json" ]; then add prepare $s done; WILL_EXIST[$s]=1
    elif [ -n "$missing" ]; then add prepare $s "skip: needs$missing"
    else add prepare $s run python prepare_data.py --dataset merge --inputs "${inputs[@]}" --out "$P/$s"
         WILL_EXIST[$s]=1; add_cost prepare "" 0 0 0 $bytes; fi
done

# pre-training: each source x model x pre-training seed from scratch with the paper's recipe;
# ImageNet-1k too when its folders are there. The weights transferred from, in the scale axis'
# order: model, source, pre-training seed, file, and the job that trains them ("": none now).
I_MODEL=() I_SOURCE=() I_SEED=() I_INIT=() I_JOB=()
init_from() { I_MODEL+=("$1") I_SOURCE+=("$2") I_SEED+=("$3") I_INIT+=("$4") I_JOB+=("${5:-}"); }
pretrain_sources=$SOURCES
[ -n "${WILL_EXIST[imagenet1k]:-}" ] && pretrain_sources+=" imagenet1k"
for model in $MODELS; do
    init_from "$model" scratch "" scratch
    for s in $pretrain_sources; do
        if [ $s = imagenet1k ]; then recipe=(--recipe "$(imagenet_recipe $model)")
        else views $s; recipe=(--recipe paper --views "${VIEWS[@]}"); fi
        for seed in $PRETRAIN_SEEDS; do
            out=$OUT/pretrain/$model/$s/seed$seed name="$model $s seed $seed" job=""
            if [ -f "$out/model.pt" ]; then add pretrain "$name" done
            elif [ -z "${WILL_EXIST[$s]:-}" ]; then add pretrain "$name" "skip: no prepared $s"; continue
            else add pretrain "$name" run "${LAUNCH[@]}" pretrain.py --data "$P/$s" --model "$model" --out "$out" \
                     --resume --seed "$seed" "${recipe[@]}" "${RECIPE_PRETRAIN[@]}" "${PRETRAIN[@]}"
                 add_cost pretrain "$model" $(( ${SOURCE_IMAGES[$s]} * 90 )) 224 4 0   # the paper's 90 epochs
                 has pretrain || continue; job=$(( ${#J_STAGE[@]} - 1 )); fi
            init_from "$model" "$s" "$seed" "$out/best.pt" $job   # the paper transferred its save_best checkpoint
        done
    done
    # released weights (DATA/weights): the paper's ImageNet checkpoints, Google's BiT-S / BiT-M
    w=$DATA/weights bits=${model#R}
    [ -z "${WILL_EXIST[imagenet1k]:-}" ] && [ -f "$w/imagenet1k_bit$bits/model.pth.tar" ] && \
        init_from "$model" imagenet1k "" "$w/imagenet1k_bit$bits/model.pth.tar"
    [ -f "$w/imagenet21k_bit$bits/model.pth.tar" ] && init_from "$model" imagenet21k "" "$w/imagenet21k_bit$bits/model.pth.tar"
    [ -f "$w/BiT-S-$model.npz" ] && init_from "$model" bit-s "" "$w/BiT-S-$model.npz"
    [ -f "$w/BiT-M-$model.npz" ] && init_from "$model" bit-m "" "$w/BiT-M-$model.npz"
done

# transfer: every target x model x source over its shots x seeds. A cell in results.csv is done
# unless its weights are trained in this run (fewshot.py then replaces its row).
declare -A DONE_CELLS   # "target model source source_seed shots seed"
[ -f "$OUT/results.csv" ] && while read -r key; do DONE_CELLS[$key]=1; done < <(python -c "import csv, sys
for r in csv.DictReader(open(sys.argv[1])): print(r['target'], r['model'], r['source'], r['source_seed'] or '-', r['shots'], r['seed'])
" "$OUT/results.csv")
CELLS_RUN=0 CELLS_DONE=0
for target in $TARGETS; do
    shots=$(shots_for $target)
    n=$(( $(wc -w <<< "$shots") * $(wc -w <<< "$SEEDS") ))
    # the paper oversampled rare classes in full-shot COVIDx and Flowers (fewshot.py: full only)
    extra=(); [[ $target == covidx || $target == flowers102 ]] && extra=(--oversample)
    # for the estimate: HyperRule's 500 steps of 128 images, 10,000 for the full sets of 20k-500k images; 480 px, CIFAR 128
    crop=480 full_steps=500; [[ $target == cifar* ]] && crop=128
    [[ " cifar10 cifar100 covidx padchest " == *" $target "* ]] && full_steps=10000
    if [ -z "${WILL_EXIST[$target]:-}" ]; then add transfer "$target (every model and source)" "skip: no prepared $target"; continue; fi
    for model in $MODELS; do
        for j in "${!I_MODEL[@]}"; do
            [ "${I_MODEL[$j]}" = "$model" ] || continue
            source=${I_SOURCE[$j]} seed=${I_SEED[$j]} done_n=0 steps=0
            name="$target $model $source${seed:+ seed $seed} ($n cells: shots $shots x seeds $SEEDS)"
            # padchest validates on its held-out 10 % (merge renames it valid), which is the
            # PadChest target's test split: its best.pt was chosen on those rows. The paper
            # reports no such cell.
            if [[ $target == padchest && $source == *padchest ]]; then
                add transfer "$name" "skip: $source validated on padchest's test split, its best.pt chosen on the target's test rows (not in the paper)"; continue; fi
            for k in $shots; do
                for s in $SEEDS; do
                    if [ -z "${I_JOB[$j]}" ] && [ -n "${DONE_CELLS["$target $model $source ${seed:--} ${k/full/0} $s"]:-}" ]; then
                        done_n=$((done_n + 1))
                    else steps=$(( steps + (${k/full/0} ? 500 : full_steps) )); fi
                done
            done
            add_cost transfer "$model" $(( steps * 128 )) $crop 0 0
            CELLS_RUN=$((CELLS_RUN + n - done_n)) CELLS_DONE=$((CELLS_DONE + done_n))
            if [ $done_n = $n ]; then add transfer "$name" done; continue; fi
            [ $done_n = 0 ] || name=${name/" cells: "/" cells, $done_n done: "}
            NEEDS=${I_JOB[$j]}
            add transfer "$name" run transfer "$source" --data "$P/$target" --init "${I_INIT[$j]}" ${seed:+--source-seed "$seed"} \
                --model "$model" --shots $shots --seeds $SEEDS --out "$OUT" --recipe paper "${extra[@]}" \
                "${RECIPE_TRANSFER[@]}" "${TRANSFER[@]}"
            NEEDS=
        done
    done
done
summary_flags=(); [ $DEMO = 0 ] && summary_flags=(--paper-curves)
add summary "tables and plots" run python fewshot.py --summarize "$OUT" "${summary_flags[@]}"

echo "plan ($([ $DEMO = 1 ] && echo "demo, " )data $DATA, output $OUT; stages: $STAGES):"
for stage in $ALL_STAGES; do
    counts=$(for i in "${!J_STAGE[@]}"; do [ "${J_STAGE[$i]}" = $stage ] && echo "${J_STATUS[$i]%%:*}"; done | sort | uniq -c |
             awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2}')
    if ! has $stage; then note=" (stage not in STAGES: nothing runs)"
    elif [ $DEMO = 0 ] && [ -n "${DISK_GB[$stage]:-}" ]; then
        note=$(printf ' (estimate: %.1f GPU-hours, %.1f GB)' "${GPU_HOURS[$stage]}" "${DISK_GB[$stage]}")
    else note=""; fi
    echo "  $stage: $counts$note"
    for i in "${!J_STAGE[@]}"; do
        [ "${J_STAGE[$i]}" = $stage ] && printf '    %-6s %s\n' "${J_STATUS[$i]%%:*}" "${J_NAME[$i]}${J_STATUS[$i]#${J_STATUS[$i]%%:*}}"
    done
done
echo "  transfer cells (fine-tuning runs): $CELLS_RUN to run, $CELLS_DONE done"
[ $DEMO = 0 ] && echo "  (estimates are rough: a GPU at $GPU_TFLOPS TFLOP/s, the paper's image counts; run_all.sh, 'a rough cost estimate')"
[ $PLAN_ONLY = 1 ] && exit 0

# ------------------------------------------------------------------------------- the run --
# One Ctrl-C (SIGINT) or SIGTERM stops the study. Each job runs in its own process group
# (set -m): the signal reaches it once, from stop(), however it was sent (to the terminal's
# group or to this script alone). The job saves what it finished and exits 128 + the signal;
# nothing starts after it. A job ending so (status > 128) is never finished work: it stops the
# study too, so that nothing is transferred from weights whose training was cut short.
STOPPED="" JOB=""
stop() { STOPPED=$1; [ -z "$JOB" ] || kill -s "$1" -- "-$JOB" 2>/dev/null; }
stopped() {  # stopped HOW STATUS: one line on how to continue, and exit
    echo "$PROG: stopped by $1; finished work is kept: run the same command again to continue" >&2; exit "$2"
}
trap 'stop INT' INT
trap 'stop TERM' TERM
TODO=() FAILED=() stage=""
for i in "${!J_STAGE[@]}"; do has "${J_STAGE[$i]}" && [ "${J_STATUS[$i]}" = run ] && TODO+=("$i"); done
for t in "${!TODO[@]}"; do
    i=${TODO[$t]}; job="${J_STAGE[$i]} ${J_NAME[$i]}"
    [ -z "$STOPPED" ] || break
    [ "${J_STAGE[$i]}" = "$stage" ] || { stage=${J_STAGE[$i]}; echo "=== stage $stage"; }
    echo "== job $((t + 1)) of ${#TODO[@]}: $job"
    needs=${J_NEEDS[$i]}
    if [ -n "$needs" ] && [[ " ${FAILED[*]:-} " == *" $needs "* ]]; then   # never transfer from a failed pre-training
        echo "$PROG: SKIPPED $job: its pre-training failed" >&2; FAILED+=("$i"); continue; fi
    set -m; "${ARGV[@]:${J_AT[$i]}:${J_LEN[$i]}}" & JOB=$!; set +m
    [ -z "$STOPPED" ] || kill -s "$STOPPED" -- "-$JOB" 2>/dev/null   # a signal before JOB was set
    wait $JOB; status=$?
    while [ -n "$STOPPED" ] && kill -0 $JOB 2>/dev/null; do wait $JOB; status=$?; done   # a trap ended the wait
    JOB=""
    [ -z "$STOPPED" ] || stopped "SIG$STOPPED during $job" $((128 + $(kill -l "$STOPPED")))
    [ $status -le 128 ] || stopped "a signal to the job (status $status) during $job" $status
    [ $status = 0 ] || { echo "$PROG: FAILED $job (status $status); going on" >&2; FAILED+=("$i"); }
done
[ -z "$STOPPED" ] || stopped "SIG$STOPPED" $((128 + $(kill -l "$STOPPED")))
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "$PROG: ${#FAILED[@]} job(s) failed:" >&2
    for i in "${FAILED[@]}"; do echo "  ${J_STAGE[$i]} ${J_NAME[$i]}" >&2; done
    exit 1
fi
