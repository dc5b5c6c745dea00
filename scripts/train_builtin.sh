#!/usr/bin/env bash
# Recipe for the built-in Fashion-MNIST model shipped in src/bitdance/builtin/ (tokenizer, generator, guide).
# Uses only our CLI, on a 2-core CPU. Rerun it from the repository root after `make setup data`:
#
#   bash scripts/train_builtin.sh            # about 8.5 hours on a 2-core machine (30 + 58 + 63 + 72 + 80 + 71 + 68 + 35 + 31 min)
#   INSTALL=0 bash scripts/train_builtin.sh  # train only, don't replace the packaged model
#
# Step 1 is the binary run of scripts/bench_tokenizer.py (same flags), so its PSNR/SSIM figures apply.
set -euo pipefail
cd "$(dirname "$0")/.."
BITDANCE=${BITDANCE:-.venv/bin/bitdance}
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/builtin}
# TOKENIZER: an existing tokenizer (a model, run or pipeline folder, or "builtin") skips step 1
if [ -n "${TOKENIZER:-}" ] && [ "$TOKENIZER" != builtin ] && [ ! -e "$TOKENIZER" ]; then
  echo "TOKENIZER=$TOKENIZER does not exist; leave TOKENIZER unset to train one" >&2
  exit 2
fi
PARALLEL=${PARALLEL:-4}

# 1. Binary tokenizer: 32x32 -> 8x8 tokens of 32 bits, 29.5 minutes of training (both cores; run nothing else).
if [ -z "${TOKENIZER:-}" ]; then
  TOKENIZER=$OUT/tokenizer/model
  if [ ! -f "$TOKENIZER/config.json" ]; then  # not trained by an earlier run of this script
    OMP_NUM_THREADS=2 $BITDANCE tokenizer train --data "$DATA" --preset fmnist --quantizer binary \
      --steps 15000 --max-minutes 29.5 --batch-size 32 --lr 2e-3 --warmup 100 --eval-every 2000 --eval-images 1000 \
      --sample-every 1000 --save-every 500 --device cpu --out "$OUT/tokenizer"
  fi
fi

# 2. Generator: the fmnist preset with next-patch diffusion (2x2 patches -> 16 AR steps), diffusion head.
#    The shipped model was trained in six stages of one run: 3,000 steps; the same run extended to 6,000 (it
#    resumes from its checkpoint; without --schedule-start the cosine is re-stretched to the new length, so the lr
#    rises again); then four times 1,500 more steps at batch 64, each with a fresh warmup + cosine
#    (--schedule-start), at lr 3e-4, then 2e-4 three times.
#    Sampling defaults saved with it: guidance 1.5, 6 head steps (docs/results.md section 3).
GEN=$OUT/generator
# The stages share one run folder and `bitdance train` refuses a --steps below its checkpoint's step, so on a
# rerun (or after a crash in a later stage) a stage the checkpoint has passed is skipped. One it has just reached
# still runs if it has not exported the model since: it then trains nothing and exports.
checkpoint_step() {  # 0 without a checkpoint; an unreadable one stops the script here, with Python's reason
  if [ ! -f "$GEN/checkpoint.pt" ]; then echo 0; return; fi
  $PYTHON -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True, mmap=True)['step'])" \
    "$GEN/checkpoint.pt"
}
train_stage() {  # train_stage STEPS FLAGS...: skipped when the checkpoint is past STEPS, or at it and exported since
  local target=$1 at
  shift
  at=$(checkpoint_step)  # not inside an `if`, where set -e would not stop the script on a failure
  if [ "$at" -gt "$target" ] ||
     { [ "$at" -eq "$target" ] && [ "$GEN/model/model_index.json" -nt "$GEN/checkpoint.pt" ]; }; then
    echo "generator: the checkpoint is at step $at, skipping the stage to step $target"
    return
  fi
  $BITDANCE train --tokenizer "$TOKENIZER" --data "$DATA" --preset fmnist --parallel "$PARALLEL" --head diffusion \
    --steps "$target" --ema 0.999 --cfg 1.5 --sample-steps 6 --warmup 100 --device cpu --out "$GEN" "$@"
}
train_stage 3000 --batch-size 32 --lr 1e-3 --save-every 200

# 2b. Guide for autoguidance: the generator as it is after this first stage (3,000 steps), kept before the later
#    stages replace $GEN/model. The built-in model samples with v = v_guide + w (v - v_guide) instead of CFG, a
#    weaker version of itself as the guide (docs/results.md section 3, "Autoguidance"); shipped in int8 (step 4).
GUIDE=$OUT/guide
if [ ! -f "$GUIDE/model_index.json" ]; then
  at=$(checkpoint_step)  # not inside the `if`, where set -e would not stop the script on a failure
  if [ "$at" -ne 3000 ]; then
    echo "$GUIDE is missing and $GEN is past its first stage: rerun from a fresh OUT (or copy a 3,000-step" \
         "export of this run to $GUIDE)" >&2
    exit 2
  fi
  rm -rf "$GUIDE.tmp" && cp -r "$GEN/model" "$GUIDE.tmp" && mv "$GUIDE.tmp" "$GUIDE"
fi

train_stage 6000 --batch-size 32 --lr 1e-3 --save-every 200
train_stage 7500 --schedule-start 6000 --batch-size 64 --lr 3e-4 --save-every 250
for steps in 9000 10500 12000; do
  train_stage "$steps" --schedule-start $((steps - 1500)) --batch-size 64 --lr 2e-4 --save-every 250
done

# 3. Decoder fine-tune with a GAN loss (weight 0.3): the encoder and quantizer are frozen, so the codes, and with
#    them the generator of step 2, stay valid; only the images decoded from the codes get sharper.
OMP_NUM_THREADS=2 $BITDANCE tokenizer train --data "$DATA" --init-from "$TOKENIZER" --decoder-only \
  --steps 3000 --max-minutes 35 --batch-size 64 --lr 2e-4 --warmup 100 --disc-weight 0.3 --eval-images 1000 \
  --sample-every 1000 --save-every 250 --device cpu --out "$OUT/decoder"

# 3b. A second decoder fine-tune, with the official noise-concat decoder (--gan-decoder): step 3's decoder is
#    widened with noise inputs at zero weight (it starts out decoding exactly as before) and trained on with a
#    fresh discriminator. Codes unchanged again. (The shipped one started from the packaged float16 copy of step 3.
#    A control without --gan-decoder scored the same: the second GAN fine-tune is what helps; docs/results.md §5.)
OMP_NUM_THREADS=2 $BITDANCE tokenizer train --data "$DATA" --init-from "$OUT/decoder/model" --decoder-only --gan-decoder \
  --steps 3000 --max-minutes 35 --batch-size 64 --lr 2e-4 --warmup 100 --disc-weight 0.3 --eval-images 1000 \
  --sample-every 1000 --save-every 250 --device cpu --out "$OUT/decoder_noise"

# 4. Install into the package: the generator with the fine-tuned tokenizer and the guide (sampling default:
#    autoguidance at GUIDE_SCALE, constant schedule), safetensors stored in float16, the guide's matrices in int8
#    with per-row scales (24.5 MB instead of 64 MB in fp32; loads back as fp32). (The shipped guide was rounded
#    to int8 from the float16 copy of its export that the package held at commit 449228d.)
GUIDE_SCALE=${GUIDE_SCALE:-4}
#    Saved beside the packaged model and swapped in only once whole: a failed save leaves the old one in place.
if [ "${INSTALL:-1}" = 1 ]; then
  NEW=src/bitdance/.builtin.new OLD=src/bitdance/.builtin.old
  rm -rf "$NEW"  # left by an install that failed
  $PYTHON -c "import sys, torch
from bitdance.models.autoencoder import ImageTokenizer
from bitdance.models.transformer import BitDance
from bitdance.pipeline import BitDancePipeline, resolve_generator_path
pipe = BitDancePipeline.from_pretrained(sys.argv[1])
pipe.tokenizer = ImageTokenizer.from_pretrained(sys.argv[2])
pipe.set_guide(BitDance.from_pretrained(resolve_generator_path(sys.argv[4])), scale=float(sys.argv[5]),
               schedule='constant')
pipe.save_pretrained(sys.argv[3], dtype=torch.float16, guide_dtype=torch.int8)" "$GEN/model" "$OUT/decoder_noise/model" "$NEW" "$GUIDE" \
    "$GUIDE_SCALE"
  rm -rf "$OLD"
  if [ -e src/bitdance/builtin ]; then mv src/bitdance/builtin "$OLD"; fi
  mv "$NEW" src/bitdance/builtin
  rm -rf "$OLD"
  du -sh src/bitdance/builtin
fi
