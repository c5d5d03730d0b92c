#!/usr/bin/env bash
# The exact commands that rebuild Tessera's bundled default models from scratch (CPU, 2 cores).
# Each training command resumes from its run folder when re-run (--resume), so it can be stopped and
# continued across sessions. Usage: scripts/train_defaults.sh [tokenizer|tokenizer-photo|ar|masked|masked-bundled|diffusion|distill|dit|sr|sr-distill|prune|clip|safety|all]
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/tessera
WHAT=${1:-all}
resume() { [ -f "$1/state.pt" ] && echo --resume || true; }
PHOTOS="/usr/share/backgrounds /usr/share/wallpapers"  # never plasma-workspace-wallpapers: the external eval set

if [ "$WHAT" = tokenizer ] || [ "$WHAT" = all ]; then
  # photos and drawings only (the tokenizer's held-out numbers are on data/photos128 val)
  [ -f data/photos128/report.json ] || $T data prepare /usr/share/tuxpaint/stamps /usr/share/backgrounds/mate \
    --out data/photos128 --val-fraction 0.1
  $T train tokenizer --data data/photos128 --out runs/vq-f8 --set train.val_every=500 $(resume runs/vq-f8)
  $T export runs/vq-f8 -o src/tessera/weights/vq-f8 --dtype float16
  $T eval reconstruction --data data/photos128 --split val
fi

if [ "$WHAT" = tokenizer-photo ] || [ "$WHAT" = all ]; then
  # issue 23: vq-f8 fine-tuned on native-resolution photo crops (16 per photo, each downscaled by at most 8x)
  # mixed with the Tux Paint stamps; the default of reconstruct / tokenize (the generators keep vq-f8)
  [ -f data/photomix128/report.json ] || $T data prepare $PHOTOS /usr/share/tuxpaint/stamps --out data/photomix128 \
    --size 128 --crops-per-image 16 --max-downscale 8 --val-fraction 0.2
  OMP_NUM_THREADS=1 $T train tokenizer --data data/photomix128 --out runs/vq-f8-photo --preset vq-f8 --set train.init=vq-f8 \
    --set train.lr=1e-4 --set train.warmup_steps=100 --set train.max_steps=${VQP_STEPS:-4000} --set train.val_every=250 \
    --set task.loss.disc_start=1000 $(resume runs/vq-f8-photo)
  $T export runs/vq-f8-photo -o src/tessera/weights/vq-f8-photo --dtype float16
fi

if [ "$WHAT" = ar ] || [ "$WHAT" = all ]; then
  # captioned demo data: Tux Paint stamps + MATE backgrounds + Noto emoji (scripts/build_demo_data.sh)
  [ -f data/demo128/report.json ] || scripts/build_demo_data.sh data/demo128
  $T train ar --data data/demo128 --out runs/ar-xs --preset ar-xs --tokenizer vq-f8 \
    --set train.max_steps=${AR_STEPS:-1500} --set train.lr=6e-4 --set train.warmup_steps=200 --set train.val_every=250 $(resume runs/ar-xs)
  $T export runs/ar-xs -o src/tessera/weights/ar-xs --dtype float16
  $T eval caption-margin --data data/demo128 --model ar-xs
fi

if [ "$WHAT" = masked ] || [ "$WHAT" = all ]; then
  # the same data, width / depth / heads and budget as ar-xs, for the side-by-side comparison
  $T train masked --data data/demo128 --out runs/masked-xs --preset masked-xs --tokenizer vq-f8 \
    --set train.max_steps=${MASKED_STEPS:-1500} --set train.lr=6e-4 --set train.warmup_steps=200 --set train.val_every=250 $(resume runs/masked-xs)
  $T export runs/masked-xs -o models/masked-xs --dtype float16   # not bundled: the 60 MB budget
  $T eval caption-margin --data data/demo128 --model models/masked-xs
fi

if [ "$WHAT" = masked-bundled ] || [ "$WHAT" = all ]; then
  # the bundled masked default: 4 blocks instead of 6, so that every bundled model fits in 60 MB
  $T train masked --data data/demo128 --out runs/masked-xxs --preset masked-xxs --tokenizer vq-f8 \
    --set train.max_steps=${MASKED_STEPS:-1500} --set train.lr=6e-4 --set train.warmup_steps=200 --set train.val_every=250 $(resume runs/masked-xxs)
  $T export runs/masked-xxs -o src/tessera/weights/masked-xxs --dtype float16
  $T eval caption-margin --data data/demo128 --model masked-xxs
fi

if [ "$WHAT" = diffusion ] || [ "$WHAT" = all ]; then
  # latent diffusion in vq-f8's 16x16x8 pre-quantization space
  $T train diffusion --arch unet --data data/demo128 --out runs/unet-xs --preset unet-xs --tokenizer vq-f8 \
    --set train.max_steps=${UNET_STEPS:-5000} --set train.batch_size=64 --set train.lr=3e-4 --set train.warmup_steps=200 \
    --set train.val_every=1000 $(resume runs/unet-xs)
  $T export runs/unet-xs -o src/tessera/weights/unet-xs --dtype float16
  $T eval caption-margin --data data/demo128 --model unet-xs
fi

if [ "$WHAT" = distill ] || [ "$WHAT" = all ]; then
  # issue 24: unet-xs distilled into 4 guided DPM-Solver++ steps (trajectory objective: the student's 4-step run
  # fits the teacher's 20 guided DDIM steps from the same noise; resumes from models/unet-xs-4step.run)
  OMP_NUM_THREADS=2 $T optimize unet-xs --distill-steps 4 --data data/demo128 -o models/unet-xs-4step \
    --max-steps ${DISTILL_STEPS:-1200} --set train.batch_size=8 --set task.student_cfg=5 --set task.teacher_steps=20 \
    --set task.objective=trajectory --set task.student_method=dpmpp_2m --set train.lr=2e-5 --set train.val_every=200
  $T export models/unet-xs-4step.run -o src/tessera/weights/unet-xs-4step --dtype float16
fi

if [ "$WHAT" = dit ] || [ "$WHAT" = all ]; then
  # the DiT at unet-xs's parameter count (4.1 M vs 3.9 M), data and budget: the paradigm comparison
  $T train diffusion --arch dit --data data/demo128 --out runs/dit-xs --preset dit-xs --tokenizer vq-f8 \
    --set train.max_steps=${DIT_STEPS:-5000} --set train.batch_size=64 --set train.lr=3e-4 --set train.warmup_steps=200 \
    --set train.val_every=1000 $(resume runs/dit-xs)
  $T export runs/dit-xs -o models/dit-xs --dtype float16   # not bundled (yet): the 60 MB budget
  $T eval caption-margin --data data/demo128 --model models/dit-xs
fi

if [ "$WHAT" = sr ] || [ "$WHAT" = all ]; then
  # issue 23: photo crops at native resolution (or after a downscale of at most 24x, drawn per crop; never an
  # upscale), 32 per photo, split by source photo; the Debian photo packages of scripts/setup.sh
  [ -f data/photo256b/report.json ] || $T data prepare $PHOTOS --out data/photo256b --size 256 \
    --crops-per-image 32 --max-downscale 24 --val-fraction 0.2
  # the starting points: issue 6's sr-compact models (stamps + MATE photos resized to 256; x4 with vq-f8's round trip)
  [ -f data/photos256/report.json ] || $T data prepare /usr/share/tuxpaint/stamps /usr/share/backgrounds/mate \
    --out data/photos256 --size 256 --min-size 256 --val-fraction 0.1
  $T train sr --data data/photos256 --out runs/sr-x4 --preset sr-compact-x4 --tokenizer vq-f8 \
    --set train.max_steps=6000 $(resume runs/sr-x4)
  $T export runs/sr-x4 -o models/sr-compact-x4
  $T train sr --data data/photos256 --out runs/sr-x2 --preset sr-compact-x2 --tokenizer "" \
    --set train.max_steps=4000 $(resume runs/sr-x2)
  $T export runs/sr-x2 -o models/sr-compact-x2
  # fidelity x4: sr-compact-x4 fine-tuned on photos (bicubic only), grown to 64 x 16 (Net2Net: the same
  # function), fine-tuned again
  [ -f data/photo256/report.json ] || $T data prepare $PHOTOS --out data/photo256 --size 256 \
    --crops-per-image 32 --max-downscale 8 --val-fraction 0.2
  [ -f runs/sr-fid-x4-small/state.pt ] || $T train sr --data data/photo256 --out runs/sr-fid-x4-small \
    --preset sr-compact-x4 --tokenizer "" --set train.init=models/sr-compact-x4 --set train.lr=2e-4 \
    --set train.warmup_steps=100 --set train.max_steps=3500
  $T export runs/sr-fid-x4-small -o models/sr-fid-x4-small
  [ -d models/sr-fid-x4-grown ] || .venv/bin/python -c "from tessera.checkpoint import load_model, export_model; \
from tessera.superres.srvgg import grown; export_model(grown(load_model('models/sr-fid-x4-small'), 64, 16), 'models/sr-fid-x4-grown')"
  OMP_NUM_THREADS=1 $T train sr --data data/photo256b --out runs/sr-fid-x4 --preset sr-fidelity-x4 --tokenizer "" \
    --set train.init=models/sr-fid-x4-grown --set train.lr=2e-4 --set train.warmup_steps=100 \
    --set train.max_steps=${SR4_STEPS:-6000} --set train.val_every=1000 $(resume runs/sr-fid-x4)
  $T export runs/sr-fid-x4 -o src/tessera/weights/sr-fidelity-x4 --dtype float16
  # fidelity x2: sr-compact-x2 fine-tuned on photos (bicubic only)
  OMP_NUM_THREADS=1 $T train sr --data data/photo256b --out runs/sr-fid-x2 --preset sr-fidelity-x2 --tokenizer "" \
    --set train.init=models/sr-compact-x2 --set train.lr=2e-4 --set train.warmup_steps=100 \
    --set train.max_steps=${SR2_STEPS:-4000} --set train.val_every=1000 $(resume runs/sr-fid-x2)
  $T export runs/sr-fid-x2 -o src/tessera/weights/sr-fidelity-x2 --dtype float16
  # perceptual x4 / x2: half of the pairs Real-ESRGAN's degradation, half vq-f8's round trip; L1 + 0.01
  # perceptual + 0.002 GAN from step 100; from the fidelity weights
  for S in 4 2; do
    INIT=src/tessera/weights/sr-fidelity-x$S; STEPS=$([ $S = 4 ] && echo 700 || echo 500)
    OMP_NUM_THREADS=1 $T train sr --data data/photo256b --out runs/sr-per-x$S --preset sr-perceptual-x$S --tokenizer vq-f8 \
      --set task.tokenizer_fraction=0.5 --set train.init=$INIT --set task.degradation=realesrgan \
      --set task.perceptual_weight=0.01 --set task.gan_weight=0.002 --set task.gan_start=100 --set train.lr=1e-4 \
      --set train.warmup_steps=50 --set train.max_steps=$STEPS --set train.val_every=350 $(resume runs/sr-per-x$S)
    $T export runs/sr-per-x$S -o src/tessera/weights/sr-perceptual-x$S --dtype float16
  done
  $T eval sr --data data/photo256b --model fidelity --model perceptual --model x4plus
fi
if [ "$WHAT" = sr-distill ] || [ "$WHAT" = all ]; then
  # issue 24: a compact student of Real-ESRGAN x4plus (its outputs on the bicubic LR of data/photo256b's train
  # crops are the targets, cached in data/photo256b/sr_teacher), from the fidelity x4 weights
  [ -f data/photo256b/report.json ] || $T data prepare $PHOTOS --out data/photo256b --size 256 \
    --crops-per-image 32 --max-downscale 24 --val-fraction 0.2
  OMP_NUM_THREADS=1 $T train sr --data data/photo256b --out runs/sr-x4plus-student --preset sr-fidelity-x4 \
    --tokenizer "" --set task.teacher=x4plus --set train.init=sr-fidelity-x4 --set train.lr=2e-4 \
    --set train.warmup_steps=50 --set train.max_steps=${SRD_STEPS:-1500} --set train.val_every=500 \
    $(resume runs/sr-x4plus-student)
  $T export runs/sr-x4plus-student -o models/sr-x4plus-student --dtype float16
fi
if [ "$WHAT" = prune ]; then
  # issue 24: masked-xxs with 25 / 50 / 75% of its MLP channels removed, each fine-tuned PRUNE_STEPS on demo128
  for F in 25 50 75; do
    OMP_NUM_THREADS=1 $T optimize masked-xxs --prune 0.$F --data data/demo128 -o models/masked-xxs-p$F \
      --max-steps ${PRUNE_STEPS:-150} --set train.lr=1e-4 --set train.ema_decay=0.995 --set train.val_every=0 \
      --set train.ckpt_every=50
  done
  # the control: the unpruned model through the same recovery recipe (same spec but train.init / mlp_ratio)
  $T train masked --data data/demo128 --out runs/masked-xxs-ctrl --preset masked-xxs --tokenizer vq-f8 \
    --max-steps ${PRUNE_STEPS:-150} --set 'train.init="masked-xxs"' --set train.lr=1e-4 --set train.ema_decay=0.995 \
    --set train.warmup_steps=50 --set train.val_every=0 --set train.ckpt_every=50
  $T export runs/masked-xxs-ctrl -o models/masked-xxs-ctrl --dtype float16
fi

if [ "$WHAT" = clip ] || [ "$WHAT" = all ]; then
  # the offline image-text model for CLIPScore and caption filtering (4 min on 2 cores)
  [ -f data/demo128/report.json ] || scripts/build_demo_data.sh data/demo128
  $T train contrastive --data data/demo128 --out runs/clip-xs --max-steps ${CLIP_STEPS:-1500} $(resume runs/clip-xs)
  $T export runs/clip-xs -o src/tessera/weights/clip-xs --dtype float16
fi

if [ "$WHAT" = safety ] || [ "$WHAT" = all ]; then
  # the prompt-policy classifier on the bundled labelled prompt set (seconds)
  $T train safety -o src/tessera/weights/prompt-safety
  $T eval safety
fi
