#!/usr/bin/env bash
# Recipe for the built-in Fashion-MNIST model shipped in src/bitdance/builtin/ (tokenizer + generator).
# Uses only our CLI, on a 2-core CPU. Rerun it from the repository root after `make setup data`:
#
#   bash scripts/train_builtin.sh            # about 90 minutes on an idle 2-core machine (30 + 60)
#   INSTALL=0 bash scripts/train_builtin.sh  # train only, don't replace the packaged model
#
# Step 1 is the binary run of scripts/bench_tokenizer.py (same flags), so its PSNR/SSIM figures apply.
set -euo pipefail
cd "$(dirname "$0")/.."
BITDANCE=${BITDANCE:-.venv/bin/bitdance}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/builtin}
TOKENIZER=${TOKENIZER:-$OUT/tokenizer/model}   # point at an existing tokenizer to skip step 1
GEN_STEPS=${GEN_STEPS:-3000}
PARALLEL=${PARALLEL:-4}

# 1. Binary tokenizer: 32x32 -> 8x8 tokens of 32 bits, 29.5 minutes of training (both cores; run nothing else).
if [ ! -f "$TOKENIZER/config.json" ]; then
  OMP_NUM_THREADS=2 $BITDANCE tokenizer train --data "$DATA" --preset fmnist --quantizer binary \
    --steps 15000 --max-minutes 29.5 --batch-size 32 --lr 2e-3 --warmup 100 --eval-every 2000 --eval-images 1000 \
    --sample-every 1000 --save-every 500 --device cpu --out "$OUT/tokenizer"
fi

# 2. Generator: the fmnist preset with next-patch diffusion (2x2 patches -> 16 AR steps), diffusion head.
$BITDANCE train --tokenizer "$TOKENIZER" --data "$DATA" --preset fmnist --parallel "$PARALLEL" --head diffusion \
  --steps "$GEN_STEPS" --batch-size 32 --lr 1e-3 --warmup 100 --ema 0.999 --cfg 3.0 --save-every 200 --device cpu \
  --out "$OUT/generator"

# 3. Install into the package: safetensors stored in float16 (16 MB instead of 33 MB; loads back as fp32).
if [ "${INSTALL:-1}" = 1 ]; then
  rm -rf src/bitdance/builtin
  .venv/bin/python -c "import sys, torch; from bitdance.pipeline import BitDancePipeline as P; \
P.from_pretrained(sys.argv[1]).save_pretrained('src/bitdance/builtin', dtype=torch.float16)" "$OUT/generator/model"
  du -sh src/bitdance/builtin
fi
