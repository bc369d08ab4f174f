#!/usr/bin/env python3
"""Build a random-weight LoRA with the key layout and rank of the published SD-1.5 LCM-LoRA.

    scripts/make_random_lora.py MODEL OUT.safetensors [--rank 64] [--layout kohya|peft]

MODEL is a diffusers folder (e.g. models/sd15-inpaint-fp16 from make_random_model.py). The layers
are those diffusers' LCM-LoRA distillation script adapts (LCM_LORA_UNET_TARGETS) at
rank 64 with kohya names (``lora_unet_...lora_down/lora_up/.alpha``), fp16, like
latent-consistency/lcm-lora-sdv1-5 (67.5 M parameters by its model card; this script prints its
own count to compare). For benchmarks only: random weights say nothing about quality. Never commit
the output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from inpaintd.testing.lora import LCM_LORA_RANK, build_random_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, default=LCM_LORA_RANK)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--layout", choices=("kohya", "peft"), default="kohya")
    args = parser.parse_args(argv)
    start = time.monotonic()
    out = build_random_lora(args.model, args.out, rank=args.rank, alpha=args.alpha, layout=args.layout)
    from inpaintd.weights.safetensors import read_header

    header = read_header(out)
    params = sum(
        int(__import__("math").prod(info["shape"])) for key, info in header.items() if not key.endswith(".alpha")
    )
    layers = sum(1 for key in header if key.endswith((".lora_down.weight", ".lora_A.weight")))
    print(f"built {out}: {layers} layers, {params / 1e6:.1f} M parameters, rank {args.rank} "
          f"({time.monotonic() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
