#!/usr/bin/env bash
# Build the captioned demo dataset the bundled generators train on (DESIGN.md "Real data available here"):
#   Tux Paint stamps (GPL-2.0+; captions from the .txt beside each), MATE backgrounds (GPL-2.0+),
#   Google Noto emoji from the npm package emoji-datasource-google (images Apache-2.0, names MIT).
# Usage: scripts/build_demo_data.sh [OUT=data/demo128]   (needs npm for the emoji; set-up installs the rest)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-data/demo128}
SRC=data/src
mkdir -p "$SRC"
if [ ! -f "$SRC/emoji/emoji.json" ]; then
  (cd "$SRC" && npm pack --silent emoji-datasource-google@16.0.0 >/dev/null \
    && mkdir -p emoji && tar xzf emoji-datasource-google-16.0.0.tgz -C emoji --strip-components=1)
fi
.venv/bin/python scripts/emoji_metadata.py "$SRC/emoji"
.venv/bin/tessera data prepare /usr/share/tuxpaint/stamps /usr/share/backgrounds/mate "$SRC/emoji/img/google/64" \
  --out "$OUT" --size 128 --val-fraction 0.1
