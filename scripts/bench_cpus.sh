#!/usr/bin/env bash
# BENCHMARKS.md section 11: the N100 class (AVX2 + AVX-VNNI, no AVX-512, no bf16) simulated on an
# AVX-512/AMX VM: torch's kernels capped at AVX2 (ATen, oneDNN, MKL) and inpaintd's bf16 detection
# told there is none. Plain diffusers fp32 beside inpaintd with each weight policy for a prepared
# fp16 folder (`prepare-model --dtype auto`), and the bf16 folder a bf16 workstation would have
# written, each a fresh process, variants interleaved, REPEAT times. STEPS guided steps at 512x512.
# About 25 minutes on 2 cores at STEPS=4, REPEAT=2 (the first repeat also builds the caches).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STEPS=${STEPS:-4}
REPEAT=${REPEAT:-2}
[ -f models/sd15-inpaint-fp16-bf16/inpaintd-manifest.json ] || \
  "$PY" scripts/make_random_model.py --preset sd15-inpaint models/sd15-inpaint-fp16 --prepare bf16
[ -f models/sd15-inpaint-auto/inpaintd-manifest.json ] || \
  .venv/bin/inpaintd prepare-model models/sd15-inpaint-fp16 models/sd15-inpaint-auto --dtype auto
AVX2="env.ONEDNN_MAX_CPU_ISA=AVX2,env.MKL_ENABLE_INSTRUCTIONS=AVX2,env.ATEN_CPU_CAPABILITY=avx2"
NOBF16="$AVX2,env.INPAINTD_CPU_BF16=0"
JOB="job.steps=$STEPS,job.scheduler=dpmpp_2m_karras"
AUTO="model.path=models/sd15-inpaint-auto"
BF16="model.path=models/sd15-inpaint-fp16-bf16"
# The simulation, checked: ATen's capability and the ISA oneDNN dispatches to.
env ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_VERBOSE=1 "$PY" -c '
import torch
print("aten capability:", torch.backends.cpu.get_cpu_capability())
x = torch.randn(1, 64, 32, 32).to(memory_format=torch.channels_last)
with torch.inference_mode():
    torch.nn.Conv2d(64, 64, 3, padding=1)(x)
' 2>&1 | grep -E "aten capability|isa:|brg_conv_fwd|jit" | cut -c1-160 | head -4
"$PY" scripts/bench.py levers --steps "$STEPS" --repeat "$REPEAT" --inputs square --variants \
  "diffusers_fp32:diffusers,$AVX2,job.steps=$STEPS" \
  "upcast_fp16:inpaintd,$AUTO,$NOBF16,$JOB" \
  "fp32_cache:inpaintd,$AUTO,model.weights=cache,$NOBF16,$JOB" \
  "int8_unet:inpaintd,$AUTO,model.unet_int8=on,$NOBF16,$JOB" \
  "bf16_folder_upcast:inpaintd,$BF16,$NOBF16,$JOB" \
  "bf16_folder_files:inpaintd,$BF16,model.weights=files,$NOBF16,$JOB"
# Under the unit's MemoryMax=3584M (the paper's 4 GB box), page cache dropped first: the
# policies that can fit (the upcast fp16 UNet, the int8 UNet) and the fp32 cache that cannot.
if [ "${CAPS:-3.5}" != none ]; then
  "$PY" scripts/bench.py memcap --steps "$STEPS" --skip-uncapped --drop-caches --caps "${CAPS:-3.5}" --variants \
    "upcast_fp16:inpaintd,$AUTO,$NOBF16,$JOB,preload=tcmalloc" \
    "int8_unet:inpaintd,$AUTO,model.unet_int8=on,$NOBF16,$JOB,preload=tcmalloc" \
    "fp32_cache:inpaintd,$AUTO,model.weights=cache,$NOBF16,$JOB,preload=tcmalloc"
fi
# One UNet call (512x512, batch 2 = a guided step), the candidates in one process, calls
# alternating: the host's noise (other work on the 2 cores) falls on all of them alike.
env ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
  "$PY" scripts/profile_step.py --paired "${ROUNDS:-4}" --variants diffusers_fp32 upcast_fp16 fp32_cache int8_fp16
