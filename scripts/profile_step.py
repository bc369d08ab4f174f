#!/usr/bin/env python3
"""One denoising step, inpaintd's UNet against plain diffusers' in bf16, each in a fresh process.

    scripts/profile_step.py [--variants diffusers_bf16 inpaintd ...] [--calls 4] [--batch 2]
    scripts/profile_step.py --paired 12 [--variants ...]   # all in one process, calls alternating

Times the UNet call itself (512x512: 64x64 latents, 9 channels, batch 2 = one guided step)
after two warm-up calls, and lists the operators that take the time (torch.profiler, self CPU
time, one call). Variants:

- ``diffusers_bf16`` (``diffusers_fp32``): the UNet as `StableDiffusionInpaintPipeline.from_pretrained(fp16 folder,
  torch_dtype=torch.bfloat16)` loads it (weights converted into anonymous bf16 copies).
- ``inpaintd``: the UNet as `Engine.load` maps it from the prepared bf16 folder, with its
  defaults: channels-last activations (an input hook) and conv weights mapped channels-last
  from the layout cache (layout.py; built on the first run).
- ``inpaintd_nchw_weights``: the same with ``channels_last_weights: off`` (conv weights mapped
  in the files' NCHW order).
- ``inpaintd_frozen``: `torch.compile` with inductor's ``freezing`` (weights become constants,
  oneDNN prepacks them); the compile time is reported apart.

Random weights (models/ from make_random_model.py): time only. Results print as markdown and
land in bench-out/profile_step-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))
MODELS = Path(os.environ.get("BENCH_MODELS", ROOT / "models"))
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench-out"))
VARIANTS = ("diffusers_bf16", "diffusers_fp32", "inpaintd", "inpaintd_nchw_weights", "inpaintd_frozen",
            "upcast_fp16", "fp32_cache", "int8_fp16")
# Issue 21's candidates for a CPU without bf16, on the `prepare-model --dtype auto` (fp16) folder
# with bf16 ignored: weights.upcast per layer, converted once to fp32 into the layout cache, int8 UNet.
NO_BF16 = {"upcast_fp16": {}, "fp32_cache": {"weights": "cache"}, "int8_fp16": {"unet_int8": "on"}}


def load_unet(variant: str):  # type: ignore[no-untyped-def]
    import torch

    if variant in ("diffusers_bf16", "diffusers_fp32"):
        from diffusers import StableDiffusionInpaintPipeline

        dtype = torch.bfloat16 if variant == "diffusers_bf16" else torch.float32
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            str(MODELS / "sd15-inpaint-fp16"), torch_dtype=dtype, safety_checker=None)
        return pipe.unet
    from inpaintd.core.config import ModelConfig
    from inpaintd.engine.engine import Engine

    if variant in NO_BF16:
        return Engine.load(ModelConfig(path=MODELS / "sd15-inpaint-auto", cache_dir=OUT / "cache", cpu_bf16="ignore",
                                       **NO_BF16[variant]))._eager_unet
    weights = "off" if variant == "inpaintd_nchw_weights" else "auto"
    engine = Engine.load(ModelConfig(path=MODELS / "sd15-inpaint-fp16-bf16", cache_dir=OUT / "cache",
                                     channels_last_weights=weights))
    unet = engine._eager_unet
    if variant == "inpaintd_frozen":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        unet = torch.compile(unet, backend="inductor")
    return unet


def child(variant: str, calls: int, batch: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    started = time.monotonic()
    unet = load_unet(variant)
    loaded = time.monotonic() - started
    dtype = next(unet.parameters()).dtype
    sample = torch.randn(batch, 9, 64, 64, dtype=dtype)
    text = torch.randn(batch, 77, 768, dtype=dtype)
    t = torch.tensor(500)
    times = []
    with torch.inference_mode():
        first = time.monotonic()
        unet(sample, t, encoder_hidden_states=text, return_dict=False)
        first = time.monotonic() - first
        unet(sample, t, encoder_hidden_states=text, return_dict=False)
        for _ in range(calls):
            start = time.monotonic()
            unet(sample, t, encoder_hidden_states=text, return_dict=False)
            times.append(time.monotonic() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            unet(sample, t, encoder_hidden_states=text, return_dict=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1), "calls": e.count,
            "share": round(e.self_cpu_time_total / total, 3)} for e in events[:10]]
    return {"variant": variant, "load_s": round(loaded, 2), "first_call_s": round(first, 2),
            "call_s": round(statistics.median(times), 3), "call_s_all": [round(x, 3) for x in times],
            "threads": torch.get_num_threads(), "top_ops": top}


def paired(variants: list[str], rounds: int, batch: int) -> dict:
    """Every variant's UNet in this one process, called in turn for `rounds` rounds (the order
    rotating each round): host noise then falls on all of them alike, and each round gives
    one ratio per variant against diffusers_bf16's call of the same round."""
    import torch

    torch.manual_seed(0)
    unets = {variant: load_unet(variant) for variant in variants}
    sample = torch.randn(batch, 9, 64, 64)
    text = torch.randn(batch, 77, 768)
    inputs = {v: (sample.to(next(u.parameters()).dtype), text.to(next(u.parameters()).dtype)) for v, u in unets.items()}
    t = torch.tensor(500)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    with torch.inference_mode():
        for variant, unet in unets.items():  # two warm-up calls each
            x, emb = inputs[variant]
            unet(x, t, encoder_hidden_states=emb, return_dict=False)
            unet(x, t, encoder_hidden_states=emb, return_dict=False)
        for round_ in range(rounds):
            order = variants[round_ % len(variants):] + variants[:round_ % len(variants)]
            for variant in order:
                x, emb = inputs[variant]
                start = time.monotonic()
                unets[variant](x, t, encoder_hidden_states=emb, return_dict=False)
                times[variant].append(time.monotonic() - start)
    against = "diffusers_bf16" if "diffusers_bf16" in times else variants[0]
    base = times[against]
    results = []
    for variant in variants:
        row = {"variant": variant, "call_s": round(statistics.median(times[variant]), 3),
               "call_s_all": [round(x, 3) for x in times[variant]], "threads": torch.get_num_threads()}
        if base:
            ratios = [a / b for a, b in zip(times[variant], base)]
            row["ratio_median"] = round(statistics.median(ratios), 3)
            row["ratio_all"] = [round(r, 3) for r in ratios]
        results.append(row)
    return {"mode": "paired", "rounds": rounds, "ratio_against": against, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--child")
    parser.add_argument("--paired", type=int, metavar="ROUNDS",
                        help="all variants in one process, calls alternating for ROUNDS rounds")
    args = parser.parse_args(argv)
    if args.paired:
        report = paired(args.variants, args.paired, args.batch)
        OUT.mkdir(exist_ok=True)
        path = OUT / f"profile_step-paired-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"command": " ".join(sys.argv), "batch": args.batch, **report}, indent=2))
        print(f"| variant | UNet call s (batch {args.batch}), median of {args.paired} | x {report['ratio_against']}, median of the rounds' ratios | range of the ratios |")
        print("|---|---|---|---|")
        for r in report["results"]:
            spread = f"{min(r['ratio_all']):.2f}-{max(r['ratio_all']):.2f}" if "ratio_all" in r else "-"
            print(f"| {r['variant']} | {r['call_s']:.2f} | {r.get('ratio_median', '-')} | {spread} |")
        print(f"raw: {path}", file=sys.stderr)
        return 0
    if args.child:
        print("PROFILE " + json.dumps(child(args.child, args.calls, args.batch)), flush=True)
        return 0
    results = []
    for variant in args.variants:
        print(f"[profile] {variant}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--calls", str(args.calls),
                               "--batch", str(args.batch)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("PROFILE ")), None)
        if line is None:
            results.append({"variant": variant, "error": proc.stderr[-1500:]})
            continue
        results.append(json.loads(line[len("PROFILE "):]))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"profile_step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "batch": args.batch, "results": results}, indent=2))
    base = next((r for r in results if r.get("variant") == "diffusers_bf16" and "call_s" in r), None)
    print(f"| variant | UNet call s (batch {args.batch}) | x diffusers-bf16 | first call s | load s | top operators (self CPU share) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "call_s" not in r:
            print(f"| {r['variant']} | failed | | | | {r['error'][-200:]!r} |")
            continue
        ratio = f"{r['call_s'] / base['call_s']:.2f}" if base else "-"
        ops = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in r["top_ops"][:5])
        print(f"| {r['variant']} | {r['call_s']:.2f} | {ratio} | {r['first_call_s']:.1f} | {r['load_s']:.1f} | {ops} |")
    print(f"raw: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
