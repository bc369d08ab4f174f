#!/usr/bin/env bash
# BENCHMARKS.md section 10: sections 2-5 (caps, cold start, long run, where the memory goes) and
# the per-step comparison again, each with plain diffusers in fp32 and in bf16 beside inpaintd,
# on one machine in one run. About 40 minutes on 2 cores, as root (cgroup v1, drop_caches).
# Needs the random-weight models of bench_fastpath.sh (built there if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -f models/sd15-inpaint-fp16-bf16/inpaintd-manifest.json ] || \
  "$PY" scripts/make_random_model.py --preset sd15-inpaint models/sd15-inpaint-fp16 --prepare bf16
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; "$PY" scripts/bench.py "$@"; }
BASE=(diffusers_fp32:diffusers diffusers_bf16:diffusers,model.dtype=bf16)
# 1. one UNet call: the three in one process, calls alternating (host noise falls on all alike).
"$PY" scripts/profile_step.py --paired 24 --variants diffusers_bf16 diffusers_fp32 inpaintd inpaintd_nchw_weights
# 2. the job's s/step, warmed as the daemon runs it, each a fresh process, twice.
step levers --warm --steps 20 --repeat 2 --variants "${BASE[@]}" inpaintd:inpaintd \
  inpaintd_nchw_weights:inpaintd,model.channels_last_weights=off
# 3. section 2 again: the cap ladder, page cache dropped before each row; inpaintd as the
#    service runs it (tcmalloc preloaded), diffusers as a user runs it.
step memcap --steps 10 --drop-caches --caps 4,2,1.5,1.25,1.0 \
  --variants "${BASE[@]}" inpaintd:inpaintd,preload=tcmalloc
# 4. section 3 again: process start to READY=1 (inpaintd) / to loaded and one 256x256 step (diffusers).
step coldstart --drop-caches --repeat 2 --preload tcmalloc --diffusers fp32,bf16
# 5. section 4 again: 200 jobs of the tiny model in one process, RSS along the way.
step longrun --jobs 200
step longrun --jobs 200 --preload tcmalloc
step longrun --jobs 200 --diffusers fp32
step longrun --jobs 200 --diffusers bf16
