#!/usr/bin/env bash
# Every GPU check of the project in one short run (about 5 minutes on one H100/H200):
#   bash bench/gpu_check.sh 2>&1 | tee gpu.log
# 1. models.py against timm: R50x1, 224 px, batch 64, bf16 (images/s, % of peak bf16 FLOP/s)
# 2. pre-training throughput with the real loader against the model-only step
# 3. smoke runs on the GPU: pretrain.py under torchrun with bf16 + channels_last + compile,
#    then transfer.py and fewshot.py --linear-probe from its checkpoint.
set -euo pipefail
T=${TMPDIR:-/tmp}/gpu_check; rm -rf "$T"; mkdir -p "$T"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

python3 bench/bench_models.py --device cuda --size 224 --batch 64 --dtype bf16 --repeats 10 --warmup 3
python3 bench/bench_pretrain.py --device cuda --model R50x1 --image-size 224 --batch-size 128 \
    --dtype bf16 --channels-last --steps 20 --workers 8

python3 - "$T" <<'PY'
import sys
sys.path[:0] = [".", "tests"]  # the scripts; the tests' prepared-folder writer
from prepared import write_prepared
write_prepared(f"{sys.argv[1]}/source", 384, 128, ["A", "B", "C"], "multilabel", 80, eval_split="valid")
write_prepared(f"{sys.argv[1]}/target", 192, 64, ["no", "yes"], "multiclass", 80)
PY
python3 -m torch.distributed.run --standalone --nproc_per_node=1 pretrain.py --data "$T/source" --out "$T/pre" --model R50x1 \
    --image-size 64 --batch-size 64 --epochs 3 --warmup-steps 2 --lr 0.01 --dtype bf16 --channels-last \
    --compile --workers 4 --log-every 2
python3 transfer.py --data "$T/target" --init "$T/pre/model.pt" --model R50x1 --out "$T/tr" \
    --steps 20 --batch-size 32 --resize 72 --crop 64 --dtype bf16 --log-every 5
python3 fewshot.py --data "$T/target" --init "$T/pre/model.pt" --model R50x1 --out "$T/fs" \
    --linear-probe --shots 1 5 --seeds 0 1 --resize 72 --crop 64
echo "gpu_check: all steps finished"
