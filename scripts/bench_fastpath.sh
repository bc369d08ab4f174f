#!/usr/bin/env bash
# Issue 14's benchmarks (BENCHMARKS.md sections 1b and 9), about 60 minutes on 2 cores, as root.
# Builds what it needs if missing (random weights, git-ignored under models/): the SD-1.5-inpainting
# model, a LoRA with the published LCM-LoRA's layout and rank, a TAESD-shaped draft decoder, and
# the fused model `prepare-model --lora ... --preset lcm --draft-decoder ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# tomesd (ToMe, measured in the table, not a dependency of inpaintd) is pure Python from PyPI.
"$PY" -c 'import tomesd' 2>/dev/null || "$PY" -m pip install -q tomesd
if [ ! -f models/sd15-inpaint-fp16-bf16/inpaintd-manifest.json ]; then
  "$PY" scripts/make_random_model.py --preset sd15-inpaint models/sd15-inpaint-fp16 --prepare bf16
fi
[ -f models/lcm-lora-random.safetensors ] || "$PY" scripts/make_random_lora.py models/sd15-inpaint-fp16 models/lcm-lora-random.safetensors
[ -f models/taesd-random/config.json ] || "$PY" -c 'from inpaintd.testing.vae import build_random_tiny_vae; build_random_tiny_vae("models/taesd-random")'
if [ ! -f models/sd15-inpaint-lcm-bf16/inpaintd-manifest.json ]; then
  /usr/bin/time -f "prepare-model with the LoRA: %e s, peak RSS %M KiB" "$PY" -m inpaintd prepare-model \
    models/sd15-inpaint-fp16 models/sd15-inpaint-lcm-bf16 --dtype bf16 \
    --lora models/lcm-lora-random.safetensors --preset lcm --draft-decoder models/taesd-random
fi
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; "$PY" scripts/bench.py "$@"; }
FUSED="$PWD/models/sd15-inpaint-lcm-bf16"  # absolute: coldstart runs from a temp folder
# 1. the table: baselines, 20-step options, ToMe, the fused model (cold process, no warm-up).
step fastpath --inputs square,photo1
# 2. the fused model as the daemon runs it: warmed before READY=1.
step levers --warm --steps 20 --inputs square,photo1 --variants \
  "lcm_4_g1.0_warm:inpaintd,model.path=$FUSED" \
  "lcm_4_g1.0_draft_warm:inpaintd,model.path=$FUSED,job.decoder=draft" \
  "inpaintd_20_warm:inpaintd" "diffusers_bf16:diffusers,model.dtype=bf16"
# 3. the fused model's int8 UNet (this also builds its int8 cache, as the service's first start
#    under a small memory limit does), then the fused model under hard caps, and its cold start.
step levers --variants "lcm_4_int8:inpaintd,model.path=$FUSED,model.unet_int8=on"
step memcap --caps 1.5,1.0 --drop-caches --variants "lcm_4:inpaintd,model.path=$FUSED"
step coldstart --prepared-model "$FUSED" --repeat 2
# 4. section 1 again with the bf16 baseline row.
step compare --steps 5 --variants diffusers:diffusers diffusers_bf16:diffusers,model.dtype=bf16 \
  diffusers_crop:diffusers_crop inpaintd:inpaintd
# 5. one UNet call, inpaintd's against diffusers-bf16's, and where the time goes (scripts/profile_step.py).
"$PY" scripts/profile_step.py --variants diffusers_bf16 inpaintd inpaintd_nchw_weights inpaintd_frozen
"$PY" scripts/profile_step.py --paired 24 --variants diffusers_bf16 diffusers_fp32 inpaintd inpaintd_nchw_weights
# 6. section 6b: the levers with both diffusers baselines.
step levers --steps 4 --variants diffusers_fp32:diffusers diffusers_bf16:diffusers,model.dtype=bf16 \
  bf16:engine fp32:engine,model.dtype=fp32 threads1:engine,model.threads=1 \
  no_channels_last:engine,model.channels_last=false nchw_weights:engine,model.channels_last_weights=off \
  slicing_on:engine,model.attention_slicing=on vae_tiled:engine,model.vae_tiling=on \
  keep_text_encoder:engine,model.release_text_encoder=false int8:engine,model.unet_int8=on \
  tcmalloc:engine,preload=tcmalloc
