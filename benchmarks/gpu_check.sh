#!/usr/bin/env bash
# GPU smoke check (under 5 minutes on one GPU): trains the tokenizer and each generator for a few dozen steps on
# CUDA with AMP, samples each paradigm on CUDA, runs a 1-process torchrun DDP job; one PASS/FAIL line per check.
#   benchmarks/gpu_check.sh [WORKDIR]      (needs a CUDA build of torch in .venv and a visible GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEV=${DEV:-cuda}   # DEV=cpu: a dry run of the same commands on the CPU
W=${1:-$(mktemp -d)}
T="$PY -m tessera.cli"
fail=0
check() {  # check NAME COMMAND...
  local name=$1; shift
  if "$@" >"$W/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (log: $W/$name.log)"; fail=1; fi
}
[ "$DEV" = cpu ] || check cuda "$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
# data: 64 synthetic captioned images, prepared at 64 px
"$PY" - "$W/src" <<'PYEOF'
import sys, pathlib, numpy as np
from PIL import Image
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(64):
    a = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).resize((96, 96), Image.BICUBIC).save(out / f"{i:03d}.png")
    (out / f"{i:03d}.txt").write_text(f"a synthetic picture number {i % 8}")
PYEOF
check prepare $T data prepare "$W/src" --out "$W/data" --size 64 --min-size 64 --val-fraction 0.25 --workers 2
V="--set model.resolution=64 --set train.val_every=0 --set task.crop=64 --set task.val_images=2"
S="--device $DEV --dtype bfloat16 --set train.batch_size=8 --set train.log_every=10"
check train_tokenizer $T train tokenizer --data "$W/data" --out "$W/vq" --max-steps 30 $S $V \
  --set 'task.loss.perceptual_backbone="none"'
check export_tokenizer $T export "$W/vq" -o "$W/vq-model"
for task in ar masked; do
  check "train_$task" $T train $task --data "$W/data" --out "$W/$task" --preset ${task}-xs --tokenizer "$W/vq-model" \
    --text-encoder minilm --max-steps 30 $S --set train.val_every=0
  check "export_$task" $T export "$W/$task" -o "$W/$task-model"
  check "sample_$task" $T sample $task "a synthetic picture" --model "$W/$task-model" --tokenizer "$W/vq-model" \
    --device $DEV --dtype bfloat16 -n 2 -o "$W/$task.png"
done
check train_diffusion $T train diffusion --data "$W/data" --out "$W/unet" --preset unet-xs --tokenizer "$W/vq-model" \
  --max-steps 30 $S --set train.val_every=0
check export_diffusion $T export "$W/unet" -o "$W/unet-model"
check sample_diffusion $T sample diffusion "a synthetic picture" --model "$W/unet-model" --steps 10 \
  --device $DEV --dtype bfloat16 -n 2 -o "$W/unet.png"
check generate_bundled $T generate "snowman emoji" --paradigm masked --steps 8 --size 512 --device $DEV -o "$W/gen.png"
check torchrun_ddp "$(dirname "$PY")/torchrun" --nproc_per_node=1 -m tessera.cli train ar --data "$W/data" \
  --out "$W/ar-ddp" --preset ar-xs --tokenizer "$W/vq-model" --max-steps 20 $S --set train.val_every=0
exit $fail
