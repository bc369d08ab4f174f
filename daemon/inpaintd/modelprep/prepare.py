"""`inpaintd prepare-model`: turn what a user downloaded into a prepared folder, offline.

A *prepared* model is a diffusers folder of plain safetensors in one dtype (fp16, bf16 or fp32;
``--dtype auto`` keeps the source's published precision, weights.folder.prepared_dtype), which
the engine maps without copying and shapes for its CPU at run time, plus an
``inpaintd-manifest.json`` with per-file sha256 that `check_model` (check.py) verifies.
This module is the orchestrator of modelprep: it imports the steps (checkpoints, merge,
convert, lora, vae, embeddings, draft_decoder) and no module imports it back.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.digest import sha256_file
from ..core.errors import ModelError
from ..core.presets import check_defaults
from ..store.fsutil import publish_dir
from ..weights.folder import (
    DTYPES,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    WEIGHT_COMPONENTS,
    ModelFolder,
    architecture_name,
    inspect_model,
    list_files,
    manifest_id,
    prepared_dtype,
)
from . import lora, merge
from .check import non_finite_tensors
from .checkpoints import convert_checkpoint, inspect_checkpoint
from .convert import convert_folder, count_params
from .draft_decoder import apply_draft_decoder
from .embeddings import EmbeddingSpec, apply_embeddings
from .vae import apply_vae


@dataclass(frozen=True)
class PrepareOptions:
    """What `prepare-model` is asked to do besides converting SRC (its command-line options).

    `dtype` is the prepared weights' dtype (fp16|bf16|fp32, or auto: the source's, fp16 for an
    fp32 source; the same on every machine). For a single-file SRC: `config_dir`
    (a diffusers folder describing a non-standard shape; default: model_configs/), the
    tokenizer vocabulary from `tokenizer_dir`, the EMA UNet with `use_ema`. `make_inpainting`
    = (inpainting model, base model), each a diffusers folder or a single file: SRC is a
    4-channel fine-tune of the base and the result is the 9-channel add-difference merge
    (merge.py). `vae` (file or folder) replaces the VAE and `embeddings` (EmbeddingSpec or
    "FILE[:TOKEN]" strings) add textual-inversion tokens (vae.py, embeddings.py), listed in the
    manifest's "extras". `loras` (LoraSpec or "FILE[:SCALE]" strings) are fused into the UNet
    and text encoder in fp32 before the cast to `dtype` (lora.py), listed in "loras";
    `defaults` (presets.check_defaults) become the manifest's "defaults". `draft_decoder` (an
    AutoencoderTiny folder) becomes vae_tiny/ (draft_decoder.py).
    """

    dtype: str = "bf16"
    config_dir: Path | None = None
    tokenizer_dir: Path | None = None
    use_ema: bool = False
    allow_pickle: bool = False
    overwrite: bool = False
    make_inpainting: tuple[Path, Path] | None = None
    vae: Path | None = None
    embeddings: tuple[Any, ...] = ()
    loras: tuple[Any, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    draft_decoder: Path | None = None


def prepare_model(src: Path, dst: Path, options: PrepareOptions = PrepareOptions()) -> dict[str, Any]:
    """Convert the model at `src` into a prepared folder at `dst` and return its manifest.

    `src` is a diffusers folder (fp16/fp32/bf16 safetensors, plain or ``.fp16.`` variant
    names; pickle only with allow_pickle) or a single-file checkpoint in the original layout
    (checkpoints.convert_checkpoint). The result has plain-named safetensors in
    `options.dtype`, the unused safety checker and feature extractor dropped, and the manifest.
    Built in a temp dir beside `dst`, renamed into place, so a refusal or a crash leaves no
    `dst`; an existing `dst` raises FileExistsError unless options.overwrite.
    """
    o = options
    if o.dtype != "auto" and o.dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {DTYPES}, got {o.dtype!r}")
    src = Path(src)
    dst = Path(dst)
    if dst.exists() and not o.overwrite:
        raise FileExistsError(f"{dst} already exists")
    if not src.exists():
        raise ModelError(f"{src} does not exist")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.preparing-", dir=dst.parent))
    try:
        dtype = o.dtype if o.dtype != "auto" else prepared_dtype("auto", _source_dtype(src, o.allow_pickle))
        lora_specs = [s if isinstance(s, lora.LoraSpec) else lora.LoraSpec.parse(str(s)) for s in o.loras]
        # A merge subtracts models and a LoRA adds a small update: stage their inputs in fp32
        # so neither loses precision before the one cast to `dtype`.
        stage_dtype = "fp32" if o.make_inpainting or lora_specs else dtype
        stage = functools.partial(_staged, dtype=stage_dtype, tokenizer_dir=o.tokenizer_dir, allow_pickle=o.allow_pickle)
        source_dir, checkpoint = stage(src, tmp / "_from_single_file", config_dir=o.config_dir, use_ema=o.use_ema)
        if o.make_inpainting is not None:
            inpainting_dir, _ = stage(o.make_inpainting[0], tmp / "_inpainting_base")
            base_dir, _ = stage(o.make_inpainting[1], tmp / "_base")
            merged = tmp / "_merged"
            merge.add_difference(
                merge.MergeSources(custom=source_dir, inpainting=inpainting_dir, base=base_dir),
                merged,
                allow_pickle=o.allow_pickle,
            )
            source_dir = merged
        folder = inspect_model(source_dir, allow_pickle=o.allow_pickle)
        fusion = _plan_loras(folder, lora_specs)
        out = tmp / "model"
        out.mkdir()
        convert_folder(folder, out, dtype, fusion)
        if fusion is not None and fusion.missed():
            raise ModelError(f"LoRA layers found no tensor to fuse into: {', '.join(fusion.missed()[:5])}")
        baked: dict[str, Any] = {}
        if o.draft_decoder is not None:
            baked["draft_decoder"] = apply_draft_decoder(out, Path(o.draft_decoder), dtype)
        if o.vae is not None:
            baked["vae"] = apply_vae(out, Path(o.vae), dtype, allow_pickle=o.allow_pickle)
        if o.embeddings:
            parsed = [s if isinstance(s, EmbeddingSpec) else EmbeddingSpec.parse(str(s)) for s in o.embeddings]
            baked["embeddings"] = apply_embeddings(out, parsed, dtype, allow_pickle=o.allow_pickle)
        broken = non_finite_tensors(out)
        if broken:
            raise ModelError(f"weights hold NaN or infinite values (the model would paint black): {', '.join(broken)}; "
                             "the source file (or a LoRA fused into it) is broken")
        checked_defaults = check_defaults(o.defaults or {}, has_draft_decoder="draft_decoder" in baked)
        origin = _origin(checkpoint, use_ema=o.use_ema, custom_configs=o.config_dir is not None,
                         merge=o.make_inpainting)
        manifest = _write_manifest(
            out, src=src, layout=folder, dtype=dtype, origin=origin, extras=baked,
            loras=[p.record() for p in fusion.plans] if fusion is not None else [],
            defaults=checked_defaults,
        )
        publish_dir(out, dst, overwrite=o.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _source_dtype(src: Path, allow_pickle: bool) -> str:
    """The dtype of the UNet's weights in `src` (a single file or a diffusers folder)."""
    if src.is_file():
        return inspect_checkpoint(src, allow_pickle=allow_pickle).files_dtype
    return inspect_model(src, allow_pickle=allow_pickle).files_dtype


def _staged(
    path: Path,
    folder: Path,
    *,
    dtype: str,
    tokenizer_dir: Path | None,
    allow_pickle: bool,
    config_dir: Path | None = None,
    use_ema: bool = False,
) -> tuple[Path, Any]:
    """(a diffusers folder for `path`, its CheckpointInfo or None): a single file is converted into `folder`."""
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise ModelError(f"{path} does not exist")
        return path, None
    info = convert_checkpoint(
        path,
        folder,
        dtype=dtype,
        config_dir=config_dir,
        tokenizer_dir=tokenizer_dir,
        use_ema=use_ema,
        allow_pickle=allow_pickle,
    )
    return folder, info


def _origin(checkpoint: Any, *, use_ema: bool, custom_configs: bool, merge: tuple[Path, Path] | None) -> dict[str, Any]:
    """The manifest's record of what the prepared folder was made from."""
    origin: dict[str, Any] = {"format": "diffusers-folder"}
    if checkpoint is not None:
        origin = {
            "format": "single-file",
            "kind": checkpoint.kind,
            "files_dtype": checkpoint.files_dtype,
            "ema": use_ema,
            "prediction_type": checkpoint.prediction_type,
            "configs": "custom" if custom_configs else f"inpaintd:{checkpoint.kind}",
        }
    if merge is not None:
        origin = {
            "format": "add-difference",
            "custom": origin,
            "inpainting_base": str(Path(merge[0]).resolve()),
            "base": str(Path(merge[1]).resolve()),
            "formula": "inpainting + (custom - base); UNet input channels 4-8 from inpainting",
        }
    return origin


def _plan_loras(layout: ModelFolder, specs: list[Any]) -> Any:
    """A lora.Fusion for the specs against this model (None without any); refusals raise ModelError."""
    if not specs:
        return None
    if layout.weight_format != "safetensors":
        raise ModelError("--lora needs a model with safetensors weights (convert the pickle model first)")
    shapes = lora.model_shapes(layout.path)
    return lora.Fusion([lora.plan(spec, shapes) for spec in specs])


def _write_manifest(
    out: Path, *, src: Path, layout: ModelFolder, dtype: str, origin: dict[str, Any], extras: dict[str, Any] | None = None,
    loras: list[dict[str, Any]] | None = None, defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = {rel: sha256_file(out / rel).sha256 for rel in list_files(out)}
    params = {c: count_params(out / c) for c in WEIGHT_COMPONENTS}
    unet = layout.unet_config
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "id": manifest_id(files),
        "source": str(src.resolve()),
        "dtype": dtype,
        "random_weights": layout.random_weights,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "origin": origin,
        "extras": extras or {},
        "loras": loras or [],
        "defaults": defaults or {},
        "architecture": {
            "name": architecture_name(unet),
            "pipeline": "StableDiffusionInpaintPipeline",
            "unet_in_channels": layout.unet_in_channels,
            "unet_sample_size": unet.get("sample_size"),
            "unet_block_out_channels": unet.get("block_out_channels"),
            "unet_cross_attention_dim": unet.get("cross_attention_dim"),
            "params": params,
            "unet_params": params["unet"],
        },
        "files": files,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


