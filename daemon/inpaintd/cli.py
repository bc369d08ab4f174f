"""The `inpaintd` command: process, prepare-model, check, run, status, init-share, demo.

Exit codes (also in the README):
  0  success
  1  the job failed: the input is unusable (message names the code, e.g. mask_size_mismatch)
  2  usage or configuration error (message names the key)
  3  the model cannot be loaded or failed its check
  4  the output could not be written (disk full, unwritable directory); nothing was lost
  130 interrupted (Ctrl-C / SIGTERM)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .core.config import SCHEDULERS, load_config
from .core.errors import ConfigError, Interrupted, JobError, ModelError, TransientError
from .core.presets import PRESETS, parse_defaults
from .core.quoting import for_display, record_json
from .demo.model import model_folder
from .demo.run import run_demo
from .modelprep.check import check_model
from .modelprep.prepare import PrepareOptions, prepare_model
from .modelprep.summary import format_summary, lora_line, summarize
from .paint.job import run_job
from .paint.jobspec import build_request
from .service.daemon import run_service
from .store import fleet, status
from .store.fsutil import atomic_write_bytes

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        _error(f"configuration error: {exc}")
        return EXIT_USAGE
    except ModelError as exc:
        _error(f"model error: {exc}")
        return EXIT_MODEL
    except JobError as exc:
        _error(f"job failed [{exc.code}]: {exc.message}")
        return EXIT_JOB_FAILED
    except TransientError as exc:
        _error(f"cannot write output [{exc.code}]: {exc.message}")
        return EXIT_OUTPUT
    except (KeyboardInterrupt, Interrupted):
        _error("interrupted")
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inpaintd",
        description="ROI-sliced Stable Diffusion inpainting for CPU-only devices.",
        epilog="Exit codes: 0 ok, 1 job failed, 2 usage/config error, 3 model error, 4 output not writable, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"inpaintd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("process", help="inpaint one image now and write OUT plus OUT's JSON sidecar")
    p.add_argument("image", type=Path, help="the image to repaint")
    p.add_argument("--mask", type=Path, help="mask image, white = repaint (default: the image's alpha channel)")
    p.add_argument("--prompt", help="what to paint into the masked area")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--model", type=Path, help="prepared model folder (default: config, else the embedded tiny random model)")
    p.add_argument("-o", "--output", type=Path, help="output image (default: IMAGE.inpainted.EXT beside the input)")
    p.add_argument("--config", type=Path, help="YAML config file (defaults apply without one)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--guidance", type=float)
    p.add_argument("--strength", type=float)
    p.add_argument("--cfg-cutoff", type=float, dest="cfg_cutoff", help="guidance for steps 0..int(steps x this) only, batch 1 after (1.0: all steps guided; diffusers' SDCFGCutoffCallback rule)")
    p.add_argument("--step-cache", type=int, dest="step_cache", help="DeepCache interval: deep UNet features reused for N-1 of every N steps (1: off)")
    p.add_argument("--decoder", choices=("full", "draft"), help="draft: the model's tiny decoder (prepare-model --draft-decoder), faster and lower quality")
    p.add_argument("--debug-overlay", action="store_true", help="also write OUT.overlay.png with region boxes and mask outline")
    p.set_defaults(handler=_cmd_process)

    p = sub.add_parser("prepare-model", help="convert a model into the mmap-ready runtime form with a manifest")
    p.add_argument("source", type=Path, help="diffusers folder or a single-file checkpoint (.safetensors, original SD layout)")
    p.add_argument("destination", type=Path, help="folder to create")
    p.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="the prepared weights' dtype (auto: the source's published precision, fp16 for an fp32 "
                        "source; the same folder on every machine, shaped for its CPU when the daemon loads it)")
    p.add_argument("--config-dir", type=Path, help="diffusers folder whose configs describe a single file of non-standard shape (default: the SD-1.5/SD-2 configs inpaintd ships)")
    p.add_argument("--tokenizer", type=Path, dest="tokenizer_dir", help="folder with CLIP's vocab.json and merges.txt for a single file (default: the local Hugging Face cache)")
    p.add_argument("--ema", action="store_true", help="take the EMA copy of the UNet from a single file that has one")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.ckpt weights (they can run code when loaded)")
    p.add_argument("--make-inpainting", action="store_true", help="turn a 4-channel SOURCE into a 9-channel inpainting model: inpainting-base + (SOURCE - base)")
    p.add_argument("--inpainting-base", type=Path, help="with --make-inpainting: the inpainting model of SOURCE's family (e.g. SD-1.5-inpainting), file or folder")
    p.add_argument("--base", type=Path, help="with --make-inpainting: the model SOURCE was fine-tuned from (e.g. SD-1.5), file or folder")
    p.add_argument("--vae", type=Path, help="replace the model's VAE: a .safetensors file (original or diffusers names) or a diffusers VAE folder")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]", help="bake a textual-inversion embedding (.safetensors, A1111 or diffusers format) in; prompts use TOKEN (default: the file name, or the token stored in a diffusers file). Repeatable")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="fuse a LoRA (.safetensors, kohya/A1111 or diffusers/PEFT keys) into the UNet and text encoder at SCALE (default 1.0). Repeatable")
    p.add_argument("--draft-decoder", type=Path, dest="draft_decoder", help="an AutoencoderTiny folder (e.g. TAESD) kept beside the VAE for jobs with decoder: draft (faster, lower quality)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the model's inference defaults for a published few-step LoRA (lcm: LCM scheduler, 4 steps, guidance 1.0)")
    p.add_argument("--defaults", nargs="+", default=[], metavar="KEY=VALUE", help="the model's inference defaults (scheduler, steps, guidance, strength, negative_prompt, cfg_cutoff, step_cache, decoder); over --preset; config and job files still override")
    p.set_defaults(handler=_cmd_prepare)

    p = sub.add_parser("check", help="verify a prepared model (hashes, dtype, architecture), say what it is, and check a config file")
    p.add_argument("model", type=Path, nargs="?", help="prepared model folder (default: the config's model)")
    p.add_argument("--config", type=Path)
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser("run", help="run the watch-folder daemon (what the systemd unit starts)")
    p.add_argument("--config", type=Path, help="YAML config file")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("status", help="show the running daemon's queue, current job and last error")
    p.add_argument("--config", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw state as JSON")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("init-share", help="set up a mounted shared folder for several devices (fleet): its folders and marker")
    p.add_argument("dir", type=Path, help="the share's root, mounted (e.g. /mnt/nas/inpaint)")
    p.set_defaults(handler=_cmd_init_share)

    p = sub.add_parser("demo", help="run the daemon on a demo inbox, drop a sample job, wait for the result, stop")
    p.add_argument("--dir", type=Path, default=Path("demo"), help="demo folder (default: ./demo)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result")
    p.set_defaults(handler=_cmd_demo)
    return parser


def _cmd_process(args: argparse.Namespace) -> int:
    from .engine.engine import Engine  # deferred: imports torch

    config = load_config(args.config)
    if args.model is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=args.model))
    options = {
        key: value
        for key, value in {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "steps": args.steps,
            "seed": args.seed,
            "scheduler": args.scheduler,
            "guidance": args.guidance,
            "strength": args.strength,
            "cfg_cutoff": args.cfg_cutoff,
            "step_cache": args.step_cache,
            "decoder": args.decoder,
        }.items()
        if value is not None
    }
    build_request(args.image.stem, args.image, args.mask, options, config)  # bad options fail before loading
    _say(f"loading model {config.model.path or '(embedded tiny random model)'} ...")
    engine = Engine.load(dataclasses.replace(config.model, path=model_folder(config.model)))
    request = build_request(args.image.stem, args.image, args.mask, options, config,
                                    model_defaults=engine.model_defaults)
    if engine.info.random_weights:
        _say("note: this model has RANDOM WEIGHTS: it exercises the pipeline but paints noise")
    result = run_job(engine, request, config, on_step=_progress_printer(), debug_overlay=args.debug_overlay)
    _end_progress()

    output = args.output or args.image.with_name(f"{args.image.stem}.inpainted.{result.extension}")
    sidecar_path = output.with_suffix(".json")
    try:
        atomic_write_bytes(output, result.image_bytes)
        if result.debug_overlay is not None:
            atomic_write_bytes(output.with_suffix(".overlay.png"), result.debug_overlay)
        sidecar = {**result.sidecar, "status": "done", "output_file": output.name}
        atomic_write_bytes(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as exc:
        raise TransientError("output_unwritable", f"cannot write {output}: {exc.strerror or exc}") from exc
    regions = ", ".join(f"{r.crop_box} @ {r.work_size[0]}x{r.work_size[1]}" for r in result.regions)
    _out(f"wrote {output}")
    _out(f"wrote {sidecar_path}")
    _out(f"seed {request.params.seed}; {len(result.regions)} region(s): {regions}")
    return EXIT_OK


def _cmd_prepare(args: argparse.Namespace) -> int:

    merge = None
    if args.make_inpainting:
        if args.inpainting_base is None or args.base is None:
            raise ConfigError("--make-inpainting", "needs --inpainting-base and --base")
        merge = (args.inpainting_base, args.base)
    elif args.inpainting_base is not None or args.base is not None:
        raise ConfigError("--inpainting-base/--base", "only apply with --make-inpainting")
    options = PrepareOptions(
        dtype=args.dtype,
        config_dir=args.config_dir,
        tokenizer_dir=args.tokenizer_dir,
        use_ema=args.ema,
        allow_pickle=args.allow_pickle,
        make_inpainting=merge,
        vae=args.vae,
        embeddings=tuple(args.embedding),
        loras=tuple(args.lora),
        defaults=parse_defaults(args.preset, args.defaults),
        draft_decoder=args.draft_decoder,
    )
    manifest = prepare_model(args.source, args.destination, options)
    _out(f"prepared {args.destination} ({manifest['dtype']}, id {manifest['id']})")
    for record in manifest.get("extras", {}).get("embeddings", []):
        _out(f"embedding {record['token']} ({record['vectors']} vector(s)) from {record['source']}")
    for record in manifest.get("loras", []):
        _out(f"LoRA fused: {lora_line(record)}")
    if manifest.get("defaults"):
        _out("defaults: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest["defaults"].items())))
    if "vae" in manifest.get("extras", {}):
        _out(f"VAE from {manifest['extras']['vae']['source']}")
    if manifest.get("random_weights"):
        _out("note: RANDOM WEIGHTS model (for tests and benchmarks; paints noise)")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    if args.config is not None:
        _out(f"config {args.config}: ok")
    model_path = args.model or config.model.path
    if model_path is None:
        _out("model: embedded tiny random model (generated on first use); nothing to check")
        return EXIT_OK
    problems = check_model(Path(model_path))
    if problems:
        for problem in problems:
            _error(f"{model_path}: {problem}")
        return EXIT_MODEL
    _out(f"model {model_path}: ok")
    for line in format_summary(summarize(Path(model_path))):
        _out(f"  {line}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    return run_service(config, args.config)


def _cmd_status(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    if not config.fleet.enabled:
        state = status.read_status(config.paths.state)
        print(record_json(state) if args.json else status.format_status(state))
        return EXIT_OK

    me = fleet.device_id(config.fleet.device_id)
    state = status.read_status(config.paths.state / me)
    view = fleet.Fleet(config.paths.state, me, config.fleet.lease_seconds, config.fleet.heartbeat_seconds)
    devices = [_device_row(p, config.fleet.lease_seconds) for p in view.peers()]
    if args.json:
        print(record_json({**state, "device": me, "devices": devices}))
    else:
        print(status.format_status(state))
        print(status.format_devices(me, devices))
    return EXIT_OK


def _device_row(peer: fleet.Peer, lease: float) -> dict[str, Any]:
    """One device as `inpaintd status` lists it. Its status.json is another device's file on the
    share (or a forged one, issue 22): a value of the wrong type is shown as unknown, never a crash."""
    current = peer.status.get("current")
    state, queued = peer.status.get("state"), peer.status.get("queue_length")
    return {"device": peer.device, "heartbeat_age_seconds": None if peer.age is None else round(peer.age, 1),
            "presumed_dead": peer.dead(lease), "state": state if isinstance(state, str) else None,
            "current": current.get("name") if isinstance(current, dict) and isinstance(current.get("name"), str)
            else None,
            "queue_length": queued if isinstance(queued, int) and not isinstance(queued, bool) else None}


def _cmd_init_share(args: argparse.Namespace) -> int:
    try:
        marker, made = fleet.init_share(args.dir)
    except OSError as exc:
        _error(f"init-share: {args.dir}: {exc.strerror or exc}")
        return EXIT_USAGE
    print(f"{'created' if made else 'kept'} {marker}; inbox/ outbox/ failed/ archive/ state/ are in {args.dir}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:

    return run_demo(args.dir.resolve(), timeout=args.timeout)


_progress_active = False


def _progress_printer() -> Any:
    """Step progress on a terminal; silent when stderr is a pipe or file."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        global _progress_active
        _progress_active = True
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r  painting [{'#' * filled}{'.' * (width - filled)}] step {done}/{total}")
        sys.stderr.flush()

    return show


def _end_progress() -> None:
    if _progress_active:
        sys.stderr.write("\n")


def _out(text: str) -> None:
    """A line for the person at the terminal: paths and names may come from drops or downloads."""
    print(for_display(text, 4000))


def _say(message: str) -> None:
    print(for_display(message, 4000), file=sys.stderr)


def _error(message: str) -> None:
    print(for_display(f"inpaintd: {message}", 4000), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
