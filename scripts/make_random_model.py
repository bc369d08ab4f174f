#!/usr/bin/env python3
"""Build a random-weight Stable Diffusion inpainting model folder (no download).

    scripts/make_random_model.py --preset tiny OUT
    scripts/make_random_model.py --preset sd15-inpaint OUT    # exact SD-1.5-inpainting shapes, fp16

Add --prepare DTYPE to also write a prepared copy (bf16|fp32, with manifest) to OUT-DTYPE.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from inpaintd.testing.models import PRESETS, build_random_model
from inpaintd.demo.model import SEED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--prepare", choices=("bf16", "fp32"), help="also write a prepared copy to OUT-DTYPE")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        out = build_random_model(args.preset, args.out, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc} (use --overwrite)", file=sys.stderr)
        return 1
    print(f"built {args.preset} random model in {out} ({time.monotonic() - start:.1f}s)")
    if args.prepare:
        from inpaintd.modelprep.prepare import PrepareOptions, prepare_model

        dst = out.with_name(f"{out.name}-{args.prepare}")
        manifest = prepare_model(out, dst, PrepareOptions(dtype=args.prepare, overwrite=args.overwrite))
        print(f"prepared {dst} (id {manifest['id']}, {args.prepare})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
