#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, in the order it was run (about 80 minutes on 2 cores).
# Run as root on a quiet machine: memcap needs the cgroup-v1 memory controller and
# --drop-caches writes /proc/sys/vm/drop_caches. Raw JSON lands in bench-out/ (git-ignored);
# `scripts/bench.py report bench-out/*.json` prints the tables again.
# The model has random weights (exact SD-1.5-inpainting shapes): time and memory only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -f models/sd15-inpaint-fp16-bf16/inpaintd-manifest.json ]; then
  "$PY" scripts/make_random_model.py --preset sd15-inpaint models/sd15-inpaint-fp16 --prepare bf16
fi
if ! [ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2 libtcmalloc-minimal4 >/dev/null || true
fi
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; "$PY" scripts/bench.py "$@"; }

# 1. plain diffusers vs diffusers' crop vs inpaintd, three inputs.
step compare --steps 5
# 2. the two levers the memory caps depend on (this also builds the int8 UNet cache).
step levers --steps 4 --variants 'bf16:engine' 'int8:engine,model.unet_int8=on'
# 3. inpaintd under hard cgroup caps, 20 steps at 512x512.
step memcap --steps 20 --drop-caches
# 4. `inpaintd run` start to READY=1, cold and warm page cache.
step coldstart --drop-caches --repeat 2
# 5. RSS over 200 jobs (tiny model).
step longrun --jobs 200
# 6. the remaining levers, one change each against bf16:engine.
step levers --steps 4 --variants 'bf16:engine' \
  'fp32:engine,model.dtype=fp32' \
  'threads1:engine,model.threads=1' \
  'no_channels_last:engine,model.channels_last=false' \
  'slicing_on:engine,model.attention_slicing=on' \
  'sdpa_math:engine,patch.sdpa=math' \
  'vae_tiled:engine,model.vae_tiling=on' \
  'no_malloc_trim:engine,model.malloc_trim=false' \
  'keep_text_encoder:engine,model.release_text_encoder=false' \
  'jemalloc:engine,preload=jemalloc' \
  'tcmalloc:engine,preload=tcmalloc' \
  'omp_passive:engine,env.OMP_WAIT_POLICY=PASSIVE'
step levers --steps 4 --scheduler euler_a --variants 'euler_a:engine'
# 7. the close calls again, 3 repeats each.
step levers --steps 8 --repeat 3 --variants 'bf16:engine' 'slicing_on:engine,model.attention_slicing=on' \
  'tcmalloc:engine,preload=tcmalloc'
# 8. what the service runs since tcmalloc won: its allocator under the caps, side by side, long run.
step memcap --steps 20 --caps 1.5,1.25 --drop-caches --variants 'tcmalloc:inpaintd,preload=tcmalloc'
step compare --steps 5 --variants 'inpaintd_tcmalloc:inpaintd,preload=tcmalloc'
step longrun --jobs 200 --preload tcmalloc
# 9. why the int8 UNet: bf16 weights under the same caps (may thrash for a long time at 1.25 GiB).
timeout 1200 "$PY" scripts/bench.py memcap --steps 20 --caps 2,1.5,1.25 --drop-caches \
  --variants 'bf16_only:inpaintd,model.unet_int8=off' || true
# 10. torch.compile: the first process compiles, the second finds it in cache_dir/torchinductor.
rm -rf bench-out/cache/torchinductor
step levers --steps 4 --repeat 2 --variants 'compile:engine,model.compile=inductor'
