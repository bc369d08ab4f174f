#!/usr/bin/env python3
"""Issue 11 at the real shapes, with random weights: slow (~11 min on 2 cores, 10.4 GiB peak), not a unit test.

    PYTHONPATH=$PWD/daemon python scripts/verify_real_shapes.py [--work /tmp/inpaintd-real] [--only sd2|merge] [--keep]

Two checks, each step in its own process (time and peak RSS per step, from wait4):

sd2    SD-2-inpainting (512 px, epsilon). A random-weight diffusers folder is built from the
       configs inpaintd ships (model_configs/sd2-inpaint: UNet, VAE, OpenCLIP-H text encoder;
       tokenizer = testmodels' byte-level vocabulary with SD-2's tokenizer configs), written as
       one original-layout .safetensors (write_single_file), `prepare-model`-ed
       offline with the shipped configs (no --config-dir; --tokenizer for the vocabulary), then
       compared tensor for tensor with the source folder and by pixels: one 512x512 job through
       inpaintd's Engine (fp32, channels_last off as in tests/test_checkpoints.py, and with the
       default channels_last on) against diffusers' StableDiffusionInpaintPipeline on the source
       folder, same inputs and seed.
merge  The add-difference merge at SD-1.5's shapes: three random fp16 models built from the
       shipped sd15 / sd15-inpaint configs (custom as a single file, base and inpainting as
       folders), `prepare-model CUSTOM DST --make-inpainting --inpainting-base INP --base BASE
       --dtype fp32`, then every tensor checked against inp + (custom - base) in fp32 (sources
       read through safetensors' mmap, one tensor at a time) and the 5 extra conv_in channels
       against the inpainting model's; then one 512x512 1-step `inpaintd process` job on it.

Weights are random: nothing here says anything about image quality. Everything is written under
--work (about 20 GB at the peak) and removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
sys.path.insert(0, str(DAEMON))

SD2_SEED = 20261202
SEEDS = {"custom": 101, "base": 202, "inpainting": 303}
JOB = dict(prompt="a window", negative_prompt="dark", scheduler="ddim", steps=2, guidance=6.0, strength=1.0, seed=9)


# ----------------------------------------------------------------------------- building


def build_from_configs(kind: str, out: Path, *, seed: int, dtype: str) -> Path:
    """A random-weight diffusers folder of the architecture in model_configs/<kind>."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from inpaintd.modelprep.checkpoints import CONFIGS_DIR
    from inpaintd.modelprep.tokenizer import write_tokenizer
    from inpaintd.weights.folder import RANDOM_MARKER, SOURCE_FILE

    configs = CONFIGS_DIR / kind
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def read(component: str) -> dict[str, Any]:
        return json.loads((configs / component / "config.json").read_text())

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # built in the saved dtype: half the peak for fp16
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(read("unet"))
        unet_params = sum(p.numel() for p in unet.parameters())
        unet.eval().save_pretrained(tmp / "unet", safe_serialization=True)
        del unet
        torch.manual_seed(seed + 1)
        AutoencoderKL.from_config(read("vae")).eval().save_pretrained(tmp / "vae", safe_serialization=True)
        torch.manual_seed(seed + 2)
        fields = {k: v for k, v in read("text_encoder").items() if not k.startswith("_") and k != "architectures"}
        CLIPTextModel(CLIPTextConfig(**fields)).eval().save_pretrained(tmp / "text_encoder", safe_serialization=True)
    finally:
        torch.set_default_dtype(previous)
    write_tokenizer(tmp / "tokenizer")
    for item in (configs / "tokenizer").iterdir():  # the architecture's special tokens and padding
        shutil.copy2(item, tmp / "tokenizer" / item.name)
    (tmp / "scheduler").mkdir()
    shutil.copy2(configs / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    index = json.loads((configs / "model_index.json").read_text())
    index["_diffusers_version"] = importlib.metadata.version("diffusers")  # from_pretrained needs it
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    label = {"random_weights": True, "configs": f"inpaintd:{kind}", "seed": seed, "dtype": dtype,
             "unet_params": unet_params, "generator": "scripts/verify_real_shapes.py"}
    (tmp / SOURCE_FILE).write_text(json.dumps(label, indent=2) + "\n")
    (tmp / RANDOM_MARKER).write_text(f"RANDOM weights ({kind}, seed {seed}); for verification only.\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- inputs and jobs


def job_inputs(size: int = 512) -> tuple[Any, Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(8)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 8 : size * 7 // 8, size // 4 : size * 3 // 4] = 255
    return image, Image.fromarray(mask, "L")


def run_engine(model: Path, out_png: Path, cache: Path, *, channels_last: bool) -> dict[str, Any]:
    from inpaintd.core.config import ModelConfig
    from inpaintd.engine.engine import Engine
    from inpaintd.core.jobs import InpaintParams

    engine = Engine.load(
        ModelConfig(path=model, dtype="fp32", threads=2, cache_dir=cache, channels_last=channels_last, unet_int8="off")
    )
    image, mask = job_inputs()
    start = time.monotonic()
    result = engine.inpaint(image, mask, InpaintParams(**JOB)).image
    seconds = time.monotonic() - start
    result.save(out_png)
    return {"job_seconds": round(seconds, 1), "size": list(result.size)}


def run_diffusers(folder: Path, out_png: Path) -> dict[str, Any]:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    torch.set_num_threads(2)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, mask = job_inputs()
    start = time.monotonic()
    with torch.inference_mode():
        result = pipe(
            prompt=JOB["prompt"], negative_prompt=JOB["negative_prompt"], image=image, mask_image=mask,
            height=512, width=512, num_inference_steps=JOB["steps"], guidance_scale=JOB["guidance"],
            strength=JOB["strength"], generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        ).images[0]
    seconds = time.monotonic() - start
    result.save(out_png)
    return {"job_seconds": round(seconds, 1), "size": list(result.size)}


def pixel_diff(a: Path, b: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB")).astype(np.int16)
    y = np.asarray(Image.open(b).convert("RGB")).astype(np.int16)
    assert x.shape == y.shape, (x.shape, y.shape)
    d = np.abs(x - y)
    inner = (x > 0) & (x < 255)
    return {
        "max_abs_diff": int(d.max()),
        "differing_values": int((d > 0).sum()),
        "values": int(d.size),
        # Random weights may saturate; say how much of the picture the comparison is about.
        "unsaturated_fraction": round(float(inner.mean()), 3),
        "distinct_values": int(len(np.unique(x))),
    }


# ----------------------------------------------------------------------------- comparing weights


def open_component(folder: Path, component: str) -> dict[str, Any]:
    """name -> a lazy safetensors handle (mmap) for one component's files."""
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        h = safe_open(str(f), framework="pt")
        for key in h.keys():
            handles[key] = h
    return handles


def compare_folders(a: Path, b: Path) -> dict[str, Any]:
    import torch

    from inpaintd.weights.folder import WEIGHT_COMPONENTS

    tensors = equal = 0
    worst = 0.0
    for component in WEIGHT_COMPONENTS:
        left, right = open_component(a, component), open_component(b, component)
        assert left.keys() == right.keys(), (component, sorted(left.keys() ^ right.keys())[:3])
        for key, h in left.items():
            x, y = h.get_tensor(key), right[key].get_tensor(key)
            tensors += 1
            if torch.equal(x, y):
                equal += 1
            else:
                worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {"tensors": tensors, "bit_identical": equal, "max_abs_diff": worst}


def verify_merge(custom: Path, inpainting: Path, base: Path, merged: Path) -> dict[str, Any]:
    import torch

    from inpaintd.weights.folder import WEIGHT_COMPONENTS
    from inpaintd.modelprep.keymaps import text_canonical

    tensors = exact = 0
    worst = worst_rel = 0.0
    extra_equal = None
    for component in WEIGHT_COMPONENTS:
        c, i, b, m = (open_component(f, component) for f in (custom, inpainting, base, merged))
        if component == "text_encoder":
            names = {text_canonical(k): k for k in i}
            c = {names[text_canonical(k)]: h for k, h in c.items()}
            b = {names[text_canonical(k)]: h for k, h in b.items()}
        assert m.keys() == i.keys() == c.keys() == b.keys(), component

        def get(handles: dict[str, Any], key: str, original: dict[str, str] | None = None) -> Any:
            return handles[key].get_tensor(original.get(key, key) if original else key)

        # The text encoder's handles were re-keyed; the files keep their own names.
        c_names = b_names = None
        if component == "text_encoder":
            c_names = {names[text_canonical(k)]: k for k in open_component(custom, component)}
            b_names = {names[text_canonical(k)]: k for k in open_component(base, component)}
        for key in m:
            result = get(m, key)
            target = get(i, key)
            assert result.dtype == torch.float32, (component, key, result.dtype)
            if not target.is_floating_point():
                assert torch.equal(result, target), (component, key)
                tensors += 1
                exact += 1
                continue
            delta = get(c, key, c_names).float() - get(b, key, b_names).float()
            expected = target.float().clone()
            if component == "unet" and key == "conv_in.weight":
                assert (target.shape[1], delta.shape[1]) == (9, 4), (target.shape, delta.shape)
                expected[:, :4] += delta
                extra_equal = bool(torch.equal(result[:, 4:], target[:, 4:].float()))
                assert extra_equal, "conv_in's 5 extra channels differ from the inpainting model's"
            else:
                expected += delta
            diff = float((result - expected).abs().max()) if result.numel() else 0.0
            worst = max(worst, diff)
            worst_rel = max(worst_rel, diff / max(float(expected.abs().max()), 1e-30))
            assert torch.allclose(result, expected, rtol=1e-6, atol=1e-6), (component, key, diff)
            tensors += 1
            exact += int(torch.equal(result, expected))
    return {"tensors": tensors, "bit_identical": exact, "max_abs_diff": worst, "max_rel_diff": worst_rel,
            "conv_in_extra_channels_equal": extra_equal}


# ----------------------------------------------------------------------------- steps (run in child processes)


def cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "inpaintd", *map(str, args)]


def steps(work: Path) -> dict[str, Any]:
    """name -> a command (list) or a callable run in a child process; results are JSON."""
    sd2, m = work / "sd2", work / "merge"
    return {
        "sd2-build": lambda: {"folder": str(build_from_configs("sd2-inpaint", sd2 / "src", seed=SD2_SEED, dtype="fp32"))},
        "sd2-single-file": lambda: _single_file(sd2 / "src", sd2 / "sd2-inpainting.safetensors"),
        "sd2-prepare": cli("prepare-model", sd2 / "sd2-inpainting.safetensors", sd2 / "prepared", "--dtype", "fp32",
                           "--tokenizer", sd2 / "src" / "tokenizer"),
        "sd2-weights": lambda: {**compare_folders(sd2 / "src", sd2 / "prepared"), **_manifest(sd2 / "prepared")},
        "sd2-inpaintd": lambda: run_engine(sd2 / "prepared", sd2 / "inpaintd.png", work / "cache", channels_last=False),
        "sd2-inpaintd-cl": lambda: run_engine(sd2 / "prepared", sd2 / "inpaintd-cl.png", work / "cache", channels_last=True),
        "sd2-diffusers": lambda: run_diffusers(sd2 / "src", sd2 / "diffusers.png"),
        "sd2-diffusers-again": lambda: run_diffusers(sd2 / "src", sd2 / "diffusers-again.png"),
        "merge-build": lambda: _build_merge_sources(m),
        "merge-prepare": cli("prepare-model", m / "custom.safetensors", m / "merged", "--dtype", "fp32", "--make-inpainting",
                             "--inpainting-base", m / "inpainting", "--base", m / "base", "--tokenizer", m / "custom" / "tokenizer"),
        "merge-verify": lambda: {**verify_merge(m / "custom", m / "inpainting", m / "base", m / "merged"), **_manifest(m / "merged")},
        "merge-job": cli("process", m / "photo.png", "--mask", m / "photo.mask.png", "--prompt", "a door", "--model",
                         m / "merged", "--config", m / "inpaintd.yaml", "--steps", "1", "--seed", "3", "-o", m / "out.png"),
    }


def _single_file(folder: Path, path: Path) -> dict[str, Any]:
    from inpaintd.modelprep.checkpoints import inspect_checkpoint
    from inpaintd.testing.single_file import write_single_file

    write_single_file(folder, path)
    info = inspect_checkpoint(path)
    return {"bytes": path.stat().st_size, "kind": info.kind, "text_encoder": info.text_encoder,
            "cross_attention_dim": info.cross_attention_dim, "files_dtype": info.files_dtype}


def _manifest(folder: Path) -> dict[str, Any]:
    from inpaintd.modelprep.check import check_model
    from inpaintd.weights.folder import read_manifest

    manifest = read_manifest(folder) or {}
    return {"check_model": check_model(folder), "architecture": manifest.get("architecture"),
            "origin": manifest.get("origin"), "random_weights": manifest.get("random_weights")}


def _build_merge_sources(m: Path) -> dict[str, Any]:
    from inpaintd.testing.single_file import write_single_file

    build_from_configs("sd15", m / "custom", seed=SEEDS["custom"], dtype="fp16")
    build_from_configs("sd15", m / "base", seed=SEEDS["base"], dtype="fp16")
    build_from_configs("sd15-inpaint", m / "inpainting", seed=SEEDS["inpainting"], dtype="fp16")
    write_single_file(m / "custom", m / "custom.safetensors")  # what a user downloads: one fp16 file
    image, mask = job_inputs()
    image.save(m / "photo.png")
    mask.save(m / "photo.mask.png")
    (m / "inpaintd.yaml").write_text(f"model:\n  path: {m / 'merged'}\n  dtype: fp32\n  threads: 2\n"
                                     f"  cache_dir: {m.parent / 'cache'}\n")
    return {"custom_file_bytes": (m / "custom.safetensors").stat().st_size}


def child(name: str, work: Path) -> int:
    result = steps(work)[name]()
    (work / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


# ----------------------------------------------------------------------------- the orchestrator


def run_step(name: str, work: Path, log: Any) -> dict[str, Any]:
    spec = steps(work)[name]
    command = spec if isinstance(spec, list) else [sys.executable, __file__, "--work", str(work), "--step", name]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DAEMON), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(command)}", flush=True)
    load = os.getloadavg()[0]  # the 2 cores may be shared: say how busy they were
    start = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    out: dict[str, Any] = {"step": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
                           "rc": proc.returncode, "load1_at_start": round(load, 2)}
    result_file = work / f"{name}.json"
    if result_file.exists():
        out.update(json.loads(result_file.read_text()))
    print(f"    rc={proc.returncode} {seconds:.0f}s peak RSS {out['peak_rss_gib']} GiB", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed (rc {proc.returncode}); see the log under {work}")
    return out


def machine() -> dict[str, str]:
    import diffusers
    import safetensors
    import torch
    import transformers

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {
        "cpu": f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs",
        "memory": f"{int(mem.split()[1]) / 2**20:.1f} GiB",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, safetensors {safetensors.__version__}",
    }


def table(results: dict[str, dict[str, Any]], command: str) -> str:
    info = machine()
    rows = ["| check | result | max abs diff | seconds | peak RSS (GiB) | load1 at start |", "|---|---|---|---|---|---|"]

    def row(check: str, outcome: str, diff: Any, *names: str) -> None:
        present = [results[n] for n in names if n in results]
        if not present:
            return
        seconds = sum(r["seconds"] for r in present)
        rss = max(r["peak_rss_gib"] for r in present)
        load = max(r.get("load1_at_start", float("nan")) for r in present)
        rows.append(f"| {check} | {outcome} | {diff} | {seconds:.0f} | {rss:.2f} | {load:.1f} |")

    if "sd2-build" in results:
        row("SD-2-inpainting: random fp32 folder from the shipped configs", "built", "", "sd2-build")
        sf = results.get("sd2-single-file", {})
        row("… written as one original-layout .safetensors (OpenCLIP layout)",
            f"{sf.get('bytes', 0) / 2**30:.2f} GiB, recognised as {sf.get('kind')} / {sf.get('text_encoder')}", "",
            "sd2-single-file")
        row("`prepare-model FILE DST --dtype fp32 --tokenizer …` (shipped configs, offline)", "ok", "", "sd2-prepare")
        w = results.get("sd2-weights", {})
        row("prepared tensors vs source folder", f"{w.get('bit_identical')}/{w.get('tensors')} bit-identical",
            w.get("max_abs_diff"), "sd2-weights")
        if "sd2-diffusers" in results:
            row("diffusers StableDiffusionInpaintPipeline on the source folder, 512x512, DDIM 2 steps", "reference", "",
                "sd2-diffusers")
        for name, label in (("sd2-diffusers-again", "diffusers again (fresh process, same folder): run-to-run floor"),
                            ("sd2-inpaintd", "channels_last off (as tests/test_checkpoints.py)"),
                            ("sd2-inpaintd-cl", "channels_last on (inpaintd's default)")):
            d = results.get(name, {}).get("pixels")
            if d:
                what = label if name == "sd2-diffusers-again" else f"inpaintd Engine on the prepared folder, same job, {label}"
                row(f"{what}: pixels vs diffusers",
                    f"{d['differing_values']}/{d['values']} values differ; {d['unsaturated_fraction']:.0%} unsaturated",
                    d["max_abs_diff"], name)
    if "merge-build" in results:
        row("SD-1.5 add-difference: 3 random fp16 models (custom as one file, base, inpainting) from the shipped configs",
            "built", "", "merge-build")
        row("`prepare-model CUSTOM DST --make-inpainting --inpainting-base INP --base BASE --dtype fp32`", "ok", "",
            "merge-prepare")
        v = results.get("merge-verify", {})
        row("every merged tensor vs inp + (custom − base) in fp32; conv_in's 5 extra channels vs inp",
            f"{v.get('bit_identical')}/{v.get('tensors')} bit-identical; extra channels equal: "
            f"{v.get('conv_in_extra_channels_equal')}", v.get("max_abs_diff"), "merge-verify")
        row("`inpaintd process` 512x512, 1 step, fp32, on the merged model", results.get("merge-job", {}).get("outcome", ""),
            "", "merge-job")
    lines = ["", *rows, "", f"Machine: {info['cpu']}, {info['memory']} RAM. {info['versions']}.",
             f"Command: `{command}`", "Peak RSS: per step (each step is its own process; wait4's ru_maxrss)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/inpaintd-real"))
    parser.add_argument("--only", choices=("sd2", "merge"))
    parser.add_argument("--keep", action="store_true", help="keep the models under --work")
    parser.add_argument("--skip-channels-last", action="store_true", help="skip the extra channels_last job")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if args.step:
        return child(args.step, work)
    import torch  # noqa: F401  (fail early outside the venv)

    if args.only in (None, "sd2"):
        shutil.rmtree(work / "sd2", ignore_errors=True)
    if args.only in (None, "merge"):
        shutil.rmtree(work / "merge", ignore_errors=True)
    (work / "sd2").mkdir(parents=True, exist_ok=True)
    (work / "merge").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    names: list[str] = []
    if args.only in (None, "sd2"):
        names += ["sd2-build", "sd2-single-file", "sd2-prepare", "sd2-weights", "sd2-diffusers", "sd2-diffusers-again"]
        names += ["sd2-inpaintd"]
        names += [] if args.skip_channels_last else ["sd2-inpaintd-cl"]
    if args.only in (None, "merge"):
        names += ["merge-build", "merge-prepare", "merge-verify", "merge-job"]
    failed = None
    problems: list[str] = []
    with open(work / f"log-{args.only or 'all'}.txt", "w") as log:
        for name in names:
            try:
                results[name] = run_step(name, work, log)
            except SystemExit as exc:
                failed = str(exc)
                break
            if name == "sd2-weights" and results[name]["bit_identical"] != results[name]["tensors"]:
                problems.append(f"{name}: prepared tensors differ from the source: {results[name]}")
            if name == "sd2-diffusers-again":
                # The floor: diffusers against itself, same folder, inputs and seed, a fresh process.
                results[name]["pixels"] = pixel_diff(work / "sd2" / "diffusers-again.png", work / "sd2" / "diffusers.png")
                print(f"    pixels: {results[name]['pixels']}", flush=True)
            if name in ("sd2-inpaintd", "sd2-inpaintd-cl"):
                results[name]["pixels"] = pixel_diff(work / "sd2" / f"{name[4:]}.png", work / "sd2" / "diffusers.png")
                print(f"    pixels: {results[name]['pixels']}", flush=True)
                if results[name]["pixels"]["max_abs_diff"] > 1:
                    problems.append(f"{name}: pixels differ from diffusers' by more than 1: {results[name]['pixels']}")
            if name == "merge-job":
                from PIL import Image

                log.flush()
                region = [line for line in Path(log.name).read_text().splitlines() if "region(s)" in line]
                out = Image.open(work / "merge" / "out.png")
                results[name]["outcome"] = f"completed, {out.size[0]}x{out.size[1]} written ({region[-1] if region else ''})"
            if name == "sd2-weights":
                (work / "sd2" / "sd2-inpainting.safetensors").unlink(missing_ok=True)
            if name == "sd2-inpaintd-cl" or (name == "sd2-inpaintd" and args.skip_channels_last):
                if not args.keep:
                    shutil.rmtree(work / "sd2", ignore_errors=True)  # disk: the merge needs room
    command = "cd /work/wt11b && PYTHONPATH=$PWD/daemon " + shlex.join([sys.executable, *sys.argv])
    report = table(results, command)
    tag = args.only or "all"
    (work / f"results-{tag}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (work / f"results-{tag}.md").write_text(report)
    print(report)
    if not args.keep:
        for sub in ("sd2", "merge", "cache"):
            shutil.rmtree(work / sub, ignore_errors=True)
    for problem in [failed, *problems]:
        if problem:
            print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
