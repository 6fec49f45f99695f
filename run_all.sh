#!/usr/bin/env bash
# The whole study as a recipe: prepare data -> pre-train -> few-shot transfer -> table and plots.
#
#   bash run_all.sh              # the study in miniature on built-in demo data (CPU, minutes)
#   bash run_all.sh DATA_ROOT    # the paper's study on real downloads under DATA_ROOT
#
# DATA_ROOT holds the raw downloads, each in its own folder (absent ones are skipped):
#   chexpert/ (CheXpert-v1.0 or -small inside)  mimic-cxr-jpg/  nih/  padchest/
#   covidx/  tuberculosis/  cifar10/  cifar100/  flowers102/  pets/
# and optionally weights/ with Google's official BiT checkpoints (BiT-S-R50x1.npz, BiT-M-R50x1.npz, ...).
# Settings (environment variables): OUT (runs/study), MODELS ("R50x1 R101x1 R152x2"),
# TARGETS (all present), SHOTS ("1 5 10 100 full"), SEEDS ("0 1 2 3 4"), NPROC (GPUs per node, 1),
# STAGES ("prepare pretrain transfer summary"): run only some stages; PRETRAIN_ARGS and
# TRANSFER_ARGS: extra flags for pretrain.py and fewshot.py (e.g. "--compile" and "--dtype bf16").
# Finished work is skipped when the script is run again: prepared folders, pre-trained models
# and transfer runs.
set -euo pipefail
cd "$(dirname "$0")"

n_train() {  # number of training images of a prepared dataset (for the scale plot)
    python -c "import pandas as pd, sys; print((pd.read_csv(sys.argv[1] + '/labels.csv', usecols=['split'])['split'] == 'train').sum())" "$1"
}

prepare() {  # prepare NAME RAW OUT [options]: skipped when OUT is already complete
    local name=$1 raw=$2 out=$3; shift 3
    if [ -f "$out/meta.json" ]; then echo "prepared: $out"; return; fi
    python prepare_data.py --dataset "$name" --root "$raw" --out "$out" "$@"
}

if [ $# -eq 0 ]; then
    # ---------------------------------------------------------------- demo ---------------
    # Synthetic chest X-rays written in the real on-disk layouts (NIH ChestX-ray14, CheXpert,
    # Shenzhen/Montgomery tuberculosis) and read back through the real parsers. Two sources of
    # different size (CheXpert-style alone, NIH + CheXpert merged: the paper's recipe of
    # combining sources), one medical target, a small BiT model, small images.
    OUT=${OUT:-runs/demo}
    RAW=$OUT/raw; P=$OUT/prepared
    MODEL=R14x1 SIZE=48
    [ -d "$RAW/nih" ] || python prepare_data.py --dataset demo --out "$RAW"
    prepare nih "$RAW/nih" "$P/nih" --size $SIZE
    prepare chexpert "$RAW/chexpert" "$P/chexpert" --size $SIZE
    prepare tuberculosis "$RAW/tuberculosis" "$P/tuberculosis" --size $SIZE
    [ -f "$P/nih+chexpert/meta.json" ] || \
        python prepare_data.py --dataset merge --inputs "$P/nih" "$P/chexpert" --out "$P/nih+chexpert"

    for source in chexpert nih+chexpert; do
        [ -f "$OUT/pretrain/$source/model.pt" ] && { echo "pre-trained: $source"; continue; }
        python pretrain.py --data "$P/$source" --out "$OUT/pretrain/$source" --model $MODEL \
            --image-size $SIZE --batch-size 32 --epochs 6 --lr 0.1 --warmup-steps 20 \
            --decay-epochs 4 5 --rotate 10 --dtype fp32 --workers 0 --log-every 20 --resume
    done

    # BiT-HyperRule would take 500 steps at 480 px; 40 steps at 48 px on a CPU, with the lr raised
    # from the paper's 0.001 to 0.01 to make up for the short schedule.
    for source in scratch chexpert nih+chexpert; do
        if [ $source = scratch ]; then init=scratch; size=0
        else init=$OUT/pretrain/$source/model.pt; size=$(n_train "$P/$source"); fi
        python fewshot.py --data "$P/tuberculosis" --init "$init" --source $source --source-size "$size" \
            --model $MODEL --shots 1 5 10 full --seeds 0 1 2 --out "$OUT" \
            --steps 40 --batch-size 16 --lr 0.01 --resize 56 --crop $SIZE --log-every 1000
    done
    python fewshot.py --summarize "$OUT"
    exit 0
fi

# -------------------------------------------------------------------- real data ------------
DATA=$1
OUT=${OUT:-runs/study}
P=$OUT/prepared
MODELS=${MODELS:-"R50x1 R101x1 R152x2"}
SHOTS=${SHOTS:-"1 5 10 100 full"}
SEEDS=${SEEDS:-"0 1 2 3 4"}
NPROC=${NPROC:-1}
STAGES=${STAGES:-"prepare pretrain transfer summary"}
PRETRAIN_ARGS=${PRETRAIN_ARGS:-}
TRANSFER_ARGS=${TRANSFER_ARGS:-}
has() { [[ " $STAGES " == *" $1 "* ]]; }
present() { [ -d "$DATA/$1" ] || { echo "skipping $1: $DATA/$1 not found"; return 1; }; }

if has prepare; then
    # Pre-training sources at 256 px (random 224 crops), targets at 512 px (HyperRule 512/480).
    present chexpert && prepare chexpert "$DATA/chexpert" "$P/chexpert" --size 256
    present mimic-cxr-jpg && prepare mimic "$DATA/mimic-cxr-jpg" "$P/mimic" --size 256
    present nih && prepare nih "$DATA/nih" "$P/nih" --size 256
    present padchest && prepare padchest "$DATA/padchest" "$P/padchest" --size 256
    sources=(); for s in chexpert mimic nih padchest; do [ -f "$P/$s/meta.json" ] && sources+=("$P/$s"); done
    if [ ${#sources[@]} -gt 1 ] && [ ! -f "$P/all/meta.json" ]; then
        # the paper's combined source: the sorted intersection of labels (7 for all four)
        python prepare_data.py --dataset merge --inputs "${sources[@]}" --out "$P/all"
    fi
    present covidx && prepare covidx "$DATA/covidx" "$P/covidx" --size 512
    present tuberculosis && prepare tuberculosis "$DATA/tuberculosis" "$P/tuberculosis" --size 512
    [ -f "$P/padchest/meta.json" ] && [ ! -f "$P/padchest-target/meta.json" ] && \
        prepare padchest "$DATA/padchest" "$P/padchest-target" --size 512
    for t in cifar10 cifar100; do present $t && prepare $t "$DATA/$t" "$P/$t"; done
    for t in flowers102 pets; do present $t && prepare $t "$DATA/$t" "$P/$t" --size 512; done
fi

if has pretrain; then
    # Each medical source alone and combined, from scratch; the combined one also continued
    # from BiT-M (ImageNet-21k) weights when they are in DATA/weights.
    for model in $MODELS; do
        for source in chexpert mimic nih padchest all; do
            [ -f "$P/$source/meta.json" ] || continue
            runs=("$source:")
            [ $source = all ] && [ -f "$DATA/weights/BiT-M-$model.npz" ] && \
                runs+=("all-from-bit-m:$DATA/weights/BiT-M-$model.npz")
            for run in "${runs[@]}"; do
                name=${run%%:*}; init=${run#*:}
                [ -f "$OUT/pretrain/$model/$name/model.pt" ] && continue
                torchrun --standalone --nproc_per_node=$NPROC pretrain.py --data "$P/$source" \
                    --model $model --out "$OUT/pretrain/$model/$name" --resume ${init:+--init "$init"} \
                    $PRETRAIN_ARGS
            done
        done
    done
fi

if has transfer; then
    for model in $MODELS; do
        # source:size:weights; sizes are the pre-training images (ImageNet-1k, ImageNet-21k, ours)
        inits=("scratch:0:scratch")
        [ -f "$DATA/weights/BiT-S-$model.npz" ] && inits+=("BiT-S:1281167:$DATA/weights/BiT-S-$model.npz")
        [ -f "$DATA/weights/BiT-M-$model.npz" ] && inits+=("BiT-M:14197122:$DATA/weights/BiT-M-$model.npz")
        for d in "$OUT/pretrain/$model"/*/; do
            name=$(basename "$d"); data=${name%-from-bit-m}
            [ -f "$d/model.pt" ] && inits+=("$name:$(n_train "$P/$data"):$d/model.pt")
        done
        for target in ${TARGETS:-covidx tuberculosis padchest-target cifar10 cifar100 flowers102 pets}; do
            [ -f "$P/$target/meta.json" ] || continue
            extra=(); [[ $target == covidx || $target == flowers102 ]] && extra=(--oversample)
            for entry in "${inits[@]}"; do
                IFS=: read -r source size init <<< "$entry"
                python fewshot.py --data "$P/$target" --init "$init" --source "$source" \
                    --source-size "$size" --model $model \
                    --shots $SHOTS --seeds $SEEDS --out "$OUT" "${extra[@]}" $TRANSFER_ARGS
            done
        done
    done
fi

if has summary; then python fewshot.py --summarize "$OUT"; fi
