#!/usr/bin/env bash
# BENCHMARKS.md section 11: the N100 class (AVX2 + AVX-VNNI, no AVX-512, no bf16) simulated on an
# AVX-512/AMX VM: torch's kernels capped at AVX2 (ATen, oneDNN, MKL) and inpaintd's bf16 detection
# told there is none. Plain diffusers fp32 beside inpaintd with each weight policy for a prepared
# fp16 folder (`prepare-model --dtype auto`), and the bf16 folder a bf16 workstation would have
# written, each a fresh process, variants interleaved, REPEAT times.
#
#   scripts/bench_cpus.sh [SECTION ...]      # default: levers memcap paired
# Sections:
#   levers  STEPS guided steps (DPM++ 2M Karras) on INPUTS, every policy in POLICIES, REPEAT times
#   memcap  the same job under each cap in CAPS (GiB, cgroup v1), page cache dropped first
#   paired  one UNet call per policy, alternating in one process, ROUNDS rounds
#   lcm     the LCM-fused model (4 steps, guidance 1: batch 1), diffusers fp32 beside upcast and
#           int8, on INPUTS; and under each cap in CAPS
# Environment: STEPS (4), REPEAT (2), INPUTS (square; photo1 = the 4000x3000 photo), CAPS (3.5),
# ROUNDS (4), POLICIES (all: diffusers_fp32 upcast_fp16 fp32_cache int8_unet bf16_folder_upcast
# bf16_folder_files).
# About 25 minutes on 2 cores for the default sections at STEPS=4, REPEAT=2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STEPS=${STEPS:-4}
REPEAT=${REPEAT:-2}
INPUTS=${INPUTS:-square}
CAPS=${CAPS:-3.5}
SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(levers memcap paired)
[ -f models/sd15-inpaint-fp16-bf16/inpaintd-manifest.json ] || \
  "$PY" scripts/make_random_model.py --preset sd15-inpaint models/sd15-inpaint-fp16 --prepare bf16
[ -f models/sd15-inpaint-auto/inpaintd-manifest.json ] || \
  .venv/bin/inpaintd prepare-model models/sd15-inpaint-fp16 models/sd15-inpaint-auto --dtype auto
AVX2="env.ONEDNN_MAX_CPU_ISA=AVX2,env.MKL_ENABLE_INSTRUCTIONS=AVX2,env.ATEN_CPU_CAPABILITY=avx2"
NOBF16="$AVX2,env.INPAINTD_CPU_BF16=0"
JOB="job.steps=$STEPS,job.scheduler=dpmpp_2m_karras"
AUTO="model.path=models/sd15-inpaint-auto"
BF16="model.path=models/sd15-inpaint-fp16-bf16"
declare -A POLICY=(
  [diffusers_fp32]="diffusers,$AVX2,job.steps=$STEPS"
  [upcast_fp16]="inpaintd,$AUTO,$NOBF16,$JOB"
  [fp32_cache]="inpaintd,$AUTO,model.weights=cache,$NOBF16,$JOB"
  [int8_unet]="inpaintd,$AUTO,model.unet_int8=on,$NOBF16,$JOB"
  [bf16_folder_upcast]="inpaintd,$BF16,$NOBF16,$JOB"
  [bf16_folder_files]="inpaintd,$BF16,model.weights=files,$NOBF16,$JOB"
)
POLICIES=${POLICIES:-"diffusers_fp32 upcast_fp16 fp32_cache int8_unet bf16_folder_upcast bf16_folder_files"}
variants() { for p in $POLICIES; do echo "$p:${POLICY[$p]}"; done; }

# The simulation, checked: ATen's capability and the ISA oneDNN dispatches to.
env ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_VERBOSE=1 "$PY" -c '
import torch
print("aten capability:", torch.backends.cpu.get_cpu_capability())
x = torch.randn(1, 64, 32, 32).to(memory_format=torch.channels_last)
with torch.inference_mode():
    torch.nn.Conv2d(64, 64, 3, padding=1)(x)
' 2>&1 | grep -E "aten capability|isa:|brg_conv_fwd|jit" | cut -c1-160 | head -4

for section in "${SECTIONS[@]}"; do
  echo "== $(date -u +%H:%M:%S) section $section (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  case $section in
  levers)
    mapfile -t V < <(variants)
    "$PY" scripts/bench.py levers --steps "$STEPS" --repeat "$REPEAT" --inputs "$INPUTS" --variants "${V[@]}" ;;
  memcap)
    # Under the unit's MemoryMax (3.5 GiB: the paper's 4 GB box) and the other caps, tcmalloc
    # preloaded as the service does: the policies that can fit and the fp32 cache that cannot.
    for input in ${INPUTS//,/ }; do
      "$PY" scripts/bench.py memcap --steps "$STEPS" --input "$input" --skip-uncapped --drop-caches --caps "$CAPS" --variants \
        "upcast_fp16:inpaintd,$AUTO,$NOBF16,$JOB,preload=tcmalloc" \
        "int8_unet:inpaintd,$AUTO,model.unet_int8=on,$NOBF16,$JOB,preload=tcmalloc" \
        "fp32_cache:inpaintd,$AUTO,model.weights=cache,$NOBF16,$JOB,preload=tcmalloc"
    done ;;
  paired)
    # One UNet call (512x512, batch 2 = a guided step), the candidates in one process, calls
    # alternating: the host's noise (other work on the 2 cores) falls on all of them alike.
    env ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
      "$PY" scripts/profile_step.py --paired "${ROUNDS:-4}" --variants diffusers_fp32 upcast_fp16 fp32_cache int8_fp16 ;;
  lcm)
    # The few-step fast path as a user without bf16 builds it: the LCM-LoRA fused into the fp16
    # folder (`prepare-model --dtype auto --lora ... --preset lcm`), 4 steps at guidance 1.
    [ -f models/lcm-lora-random.safetensors ] || \
      "$PY" scripts/make_random_lora.py models/sd15-inpaint-fp16 models/lcm-lora-random.safetensors
    [ -f models/sd15-inpaint-lcm-fp16/inpaintd-manifest.json ] || .venv/bin/inpaintd prepare-model \
      models/sd15-inpaint-fp16 models/sd15-inpaint-lcm-fp16 --dtype auto --lora models/lcm-lora-random.safetensors --preset lcm
    LCM="model.path=models/sd15-inpaint-lcm-fp16"
    LJOB="job.steps=4,job.guidance=1.0,job.scheduler=lcm"
    # diffusers loads the fused folder (a diffusers folder) in fp32, as such a user would.
    "$PY" scripts/bench.py levers --steps 4 --repeat "$REPEAT" --inputs "$INPUTS" \
      --fp16-model models/sd15-inpaint-lcm-fp16 --variants \
      "lcm_diffusers_fp32:diffusers,$AVX2,$LJOB" \
      "lcm_upcast_fp16:inpaintd,$LCM,$NOBF16,$LJOB" \
      "lcm_int8_unet:inpaintd,$LCM,model.unet_int8=on,$NOBF16,$LJOB"
    if [ "$CAPS" != none ]; then
      "$PY" scripts/bench.py memcap --steps 4 --skip-uncapped --drop-caches --caps "$CAPS" --variants \
        "lcm_upcast_fp16:inpaintd,$LCM,$NOBF16,$LJOB,preload=tcmalloc" \
        "lcm_int8_unet:inpaintd,$LCM,model.unet_int8=on,$NOBF16,$LJOB,preload=tcmalloc"
    fi ;;
  *) echo "bench_cpus.sh: unknown section $section" >&2; exit 2 ;;
  esac
done
