#!/usr/bin/env bash
# On a machine WITH internet: download a real SD-1.5 inpainting model (fp16 safetensors only,
# no pickles) and convert it with `inpaintd prepare-model`. Copy DEST to the device afterwards
# and set model.path in /etc/inpaintd/config.yaml. Cannot run on the offline build machines.
#   scripts/fetch-real-model.sh [REPO_ID] [DEST] [DTYPE]
set -euo pipefail
REPO_ID=${1:-stable-diffusion-v1-5/stable-diffusion-inpainting}
DEST=${2:-models/sd15-inpainting}
DTYPE=${3:-auto}
INPAINTD=${INPAINTD:-inpaintd}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip install -q "huggingface_hub>=0.23"
python3 -m huggingface_hub.commands.huggingface_cli download "$REPO_ID" \
  --include "*.json" "*.txt" "*fp16.safetensors" --local-dir "$work/src" \
  || huggingface-cli download "$REPO_ID" --include "*.json" "*.txt" "*fp16.safetensors" --local-dir "$work/src"
"$INPAINTD" prepare-model "$work/src" "$DEST" --dtype "$DTYPE"
"$INPAINTD" check "$DEST"
echo "ready: set model.path: $(realpath "$DEST") in your config"
