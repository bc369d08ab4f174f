"""Model folders: what inpaintd accepts, and `prepare_model`, which makes a folder fast to load.

Importing this module sets the Hugging Face offline switches (HF_HUB_OFFLINE and friends)
before anything imports diffusers or transformers, so no network access is ever tried.

A *prepared* model is a diffusers folder whose safetensors already hold the runtime dtype
(bf16 or fp32), so `from_pretrained(torch_dtype=...)` maps the files without copying, plus an
``inpaintd-manifest.json`` with per-file sha256 that `check_model` verifies.

Safety rules enforced here (and by the engine): pickle weights (.bin/.ckpt/.pt/.pth run code
when unpickled) are refused unless the operator sets ``model.allow_pickle``; remote code is
never trusted. Single-file checkpoints are recognised and converted by checkpoints.py.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import lora as _lora
from .errors import ModelError

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
}


def set_offline_env() -> None:
    """Force the Hugging Face libraries offline. Called at import, before diffusers loads."""
    os.environ.update(_OFFLINE_ENV)
    # Importing the pipeline makes transformers warn that image processors we never use want
    # torchvision; on a device that is noise in every start-up log. Errors still come through,
    # and an operator can set TRANSFORMERS_VERBOSITY=warning to see everything.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


set_offline_env()

MANIFEST_NAME = "inpaintd-manifest.json"
MANIFEST_SCHEMA = "inpaintd.model-manifest/1"
SOURCE_FILE = "inpaintd_source.json"
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
# Components the pipeline needs; the safety checker and its feature extractor are not used.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = ("bf16", "fp32")
# 9: an inpainting UNet; 4: a text-to-image UNet, which the pipeline paints by latent blending.
UNET_IN_CHANNELS = (9, 4)
_ST_DTYPE = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}
_ST_DTYPE_NAME = {v: k for k, v in _ST_DTYPE.items()}
_FLOAT_ST = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class ModelLayout:
    """What a model folder holds, found without importing torch."""

    path: Path
    variant: str | None  # "fp16" when the weights are only in *.fp16.safetensors files
    weight_format: str  # "safetensors" | "pickle"
    files_dtype: str  # dtype of the UNet's floating tensors: fp16 | bf16 | fp32
    unet_in_channels: int
    unet_config: dict[str, Any]
    manifest: dict[str, Any] | None
    random_weights: bool


# ----------------------------------------------------------------------------- inspection


def inspect_model(path: Path, *, allow_pickle: bool = False) -> ModelLayout:
    """Check a diffusers inpainting folder can be loaded safely; raise ModelError if not."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES or path.suffix == ".safetensors":
            raise ModelError(
                f"{path} is a single-file checkpoint; convert it first with `inpaintd prepare-model {path} OUT`"
            )
        raise ModelError(f"{path} is a file, not a diffusers model folder")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} has no model_index.json; it is not a diffusers model folder")
    unet_config = _read_json(path / "unet" / "config.json", "the UNet config")
    in_channels = int(unet_config.get("in_channels", 0))
    if in_channels not in UNET_IN_CHANNELS:
        raise ModelError(
            f"{path}: the UNet has {in_channels} input channels; inpaintd runs inpainting UNets (9: latent, "
            "mask and masked-image latent) and text-to-image UNets (4, painted by latent blending)"
        )

    variants: set[str | None] = set()
    formats: set[str] = set()
    for component in WEIGHT_COMPONENTS:
        folder = path / component
        if not folder.is_dir():
            raise ModelError(f"{path} has no {component}/ folder")
        fmt, variant = _component_weights(folder, allow_pickle=allow_pickle)
        formats.add(fmt)
        variants.add(variant)
    if len(variants) > 1:
        # diffusers takes one variant for the whole pipeline; mixed folders would half-fail.
        raise ModelError(f"{path} mixes fp16-variant and plain weight files across components; prepare it first")
    variant = variants.pop()
    manifest = read_manifest(path)
    files_dtype = _unet_files_dtype(path / "unet", variant) if "safetensors" in formats else "fp32"
    return ModelLayout(
        path=path,
        variant=variant,
        weight_format="pickle" if "pickle" in formats else "safetensors",
        files_dtype=files_dtype,
        unet_in_channels=in_channels,
        unet_config=unet_config,
        manifest=manifest,
        random_weights=is_random_weights(path),
    )


def _component_weights(folder: Path, *, allow_pickle: bool) -> tuple[str, str | None]:
    """("safetensors"|"pickle", variant) for one component folder."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    plain = [n for n in names if n.endswith(".safetensors") and not _is_variant(n)]
    variant = [n for n in names if n.endswith(".safetensors") and _is_variant(n)]
    if plain:
        return "safetensors", None
    if variant:
        return "safetensors", "fp16"
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        if not allow_pickle:
            raise ModelError(
                f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); pickle files can run "
                "code when loaded. Convert them to safetensors, or set model.allow_pickle: true if you trust them"
            )
        return "pickle", "fp16" if all(_is_variant(n) for n in pickles) else None
    raise ModelError(f"{folder} has no weight files (*.safetensors)")


def _is_variant(name: str) -> bool:
    return ".fp16." in name


def _unet_files_dtype(unet: Path, variant: str | None) -> str:
    files = _weight_files(unet, variant)
    dtypes: dict[str, int] = {}
    for f in files:
        for info in read_safetensors_header(f).values():
            if info["dtype"] in _FLOAT_ST:
                dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
    if not dtypes:
        return "fp32"
    top = max(dtypes, key=lambda k: dtypes[k])
    return _ST_DTYPE_NAME.get(top, top.lower())


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    files = sorted(p for p in folder.glob("*.safetensors") if _is_variant(p.name) == (variant is not None))
    return files


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file's JSON header."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:
            raise ModelError(f"{path} is not a safetensors file (header size {size})")
        try:
            header = json.loads(handle.read(size))
        except ValueError as exc:
            raise ModelError(f"{path} is not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The prepared-model manifest of a folder, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_random_weights(path: Path) -> bool:
    """True when the folder says it holds random weights (testmodels output or its prepared copy)."""
    path = Path(path)
    if (path / RANDOM_MARKER).exists():
        return True
    for name in (SOURCE_FILE, MANIFEST_NAME):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("random_weights") is True:
            return True
    return False


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{path.parent.parent} has no {path.parent.name}/{path.name} ({what})") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what} {path} is not a JSON object")
    return data


# ----------------------------------------------------------------------------- prepare


def prepare_model(
    src: Path,
    dst: Path,
    dtype: str = "bf16",
    *,
    config_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    use_ema: bool = False,
    allow_pickle: bool = False,
    overwrite: bool = False,
    make_inpainting: tuple[Path, Path] | None = None,
    vae: Path | None = None,
    embeddings: Iterable[Any] = (),
    loras: Iterable[Any] = (),
    defaults: Mapping[str, Any] | None = None,
    draft_decoder: Path | None = None,
) -> dict[str, Any]:
    """Convert a model into a prepared folder at `dst` and return its manifest.

    `src` is a diffusers folder (fp16/fp32/bf16 safetensors, plain or ``.fp16.`` variant
    names; pickle only with allow_pickle) or a single-file checkpoint in the original layout
    (checkpoints.convert_checkpoint: configs shipped with inpaintd unless `config_dir`, the
    tokenizer vocabulary from `tokenizer_dir`, the EMA UNet with `use_ema`). The result has
    plain-named safetensors in `dtype`, the unused safety checker and feature extractor
    dropped, and the manifest. Built in a temp dir beside `dst`, renamed into place, so a
    refusal or a crash leaves no `dst`; an existing `dst` raises FileExistsError unless overwrite.

    `make_inpainting` = (inpainting model, base model), each a diffusers folder or a single
    file: `src` is a 4-channel fine-tune of the base and the result is the 9-channel
    add-difference merge (merge.py). `vae` (file or folder) replaces the VAE and
    `embeddings` (extras.EmbeddingSpec or "FILE[:TOKEN]" strings) add textual-inversion
    tokens, both baked into the folder's own weight files (extras.py) and listed in the
    manifest's "extras". `loras` (lora.LoraSpec or "FILE[:SCALE]" strings) are fused into the
    UNet and text encoder in fp32 before the cast to `dtype` (lora.py), each listed in the
    manifest's "loras"; `defaults` (checked by presets.check_defaults) become the manifest's
    "defaults", the inference settings a job without its own uses. `draft_decoder` (an
    AutoencoderTiny folder) becomes vae_tiny/, used by jobs with ``decoder: draft``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    src = Path(src)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    if not src.exists():
        raise ModelError(f"{src} does not exist")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.preparing-", dir=dst.parent))
    try:
        lora_specs = [s if isinstance(s, _lora.LoraSpec) else _lora.LoraSpec.parse(str(s)) for s in loras]
        # A merge subtracts models and a LoRA adds a small update: stage their inputs in fp32
        # so neither loses precision before the one cast to `dtype`.
        stage_dtype = "fp32" if make_inpainting or lora_specs else dtype
        stage = functools.partial(_staged, dtype=stage_dtype, tokenizer_dir=tokenizer_dir, allow_pickle=allow_pickle)
        source_dir, checkpoint = stage(src, tmp / "_from_single_file", config_dir=config_dir, use_ema=use_ema)
        if make_inpainting is not None:
            from . import merge

            inpainting_dir, _ = stage(make_inpainting[0], tmp / "_inpainting_base")
            base_dir, _ = stage(make_inpainting[1], tmp / "_base")
            merged = tmp / "_merged"
            merge.add_difference(
                merge.MergeSources(custom=source_dir, inpainting=inpainting_dir, base=base_dir),
                merged,
                allow_pickle=allow_pickle,
            )
            source_dir = merged
        layout = inspect_model(source_dir, allow_pickle=allow_pickle)
        fusion = _plan_loras(layout, lora_specs)
        out = tmp / "model"
        out.mkdir()
        _convert_folder(layout, out, dtype, fusion)
        if fusion is not None and fusion.missed():
            raise ModelError(f"LoRA layers found no tensor to fuse into: {', '.join(fusion.missed()[:5])}")
        baked: dict[str, Any] = {}
        specs = list(embeddings)
        if vae is not None or specs or draft_decoder is not None:
            from . import extras

            if draft_decoder is not None:
                baked["draft_decoder"] = extras.apply_draft_decoder(out, Path(draft_decoder), dtype)
            if vae is not None:
                baked["vae"] = extras.apply_vae(out, Path(vae), dtype, allow_pickle=allow_pickle)
            if specs:
                parsed = [s if isinstance(s, extras.EmbeddingSpec) else extras.EmbeddingSpec.parse(str(s)) for s in specs]
                baked["embeddings"] = extras.apply_embeddings(out, parsed, dtype, allow_pickle=allow_pickle)
        from .presets import check_defaults

        checked_defaults = check_defaults(defaults or {}, has_draft_decoder="draft_decoder" in baked)
        origin = _origin(checkpoint, use_ema=use_ema, custom_configs=config_dir is not None, merge=make_inpainting)
        manifest = _write_manifest(
            out, src=src, layout=layout, dtype=dtype, origin=origin, extras=baked,
            loras=[p.record() for p in fusion.plans] if fusion is not None else [],
            defaults=checked_defaults,
        )
        _publish_dir(out, dst, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


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
    from . import checkpoints

    info = checkpoints.convert_checkpoint(
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


def _plan_loras(layout: ModelLayout, specs: list[Any]) -> Any:
    """A lora.Fusion for the specs against this model (None without any); refusals raise ModelError."""
    if not specs:
        return None
    if layout.weight_format != "safetensors":
        raise ModelError("--lora needs a model with safetensors weights (convert the pickle model first)")
    shapes = _lora.model_shapes(layout.path)
    return _lora.Fusion([_lora.plan(spec, shapes) for spec in specs])


def _convert_folder(layout: ModelLayout, out: Path, dtype: str, fusion: Any = None) -> None:
    src = layout.path
    index = _read_json(src / "model_index.json", "model_index.json")
    for key in ("safety_checker", "feature_extractor", "image_encoder"):
        if key in index:
            index[key] = [None, None]
    index["requires_safety_checker"] = False
    # diffusers' from_pretrained reads this key (KeyError without it); the configs shipped for
    # single files do not carry it.
    index.setdefault("_diffusers_version", importlib.metadata.version("diffusers"))
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for name in (SOURCE_FILE, RANDOM_MARKER):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for component in COMPONENTS:
        folder = src / component
        if not folder.is_dir():
            raise ModelError(f"{src} has no {component}/ folder")
        target = out / component
        target.mkdir()
        if component in WEIGHT_COMPONENTS:
            _convert_component(folder, target, dtype, layout.variant, layout.weight_format, fusion)
        else:
            for item in sorted(folder.iterdir()):
                if item.is_file() and not item.name.endswith(PICKLE_SUFFIXES):
                    shutil.copy2(item, target / item.name)


def _convert_component(folder: Path, target: Path, dtype: str, variant: str | None, fmt: str, fusion: Any = None) -> None:
    transform = None
    if fusion is not None and fusion.touches(folder.name):
        transform = functools.partial(fusion.apply, folder.name)
    for item in sorted(folder.iterdir()):
        if not item.is_file():
            continue
        name = item.name
        if name.endswith(".json") and "index" not in name:
            shutil.copy2(item, target / name)
    if fmt == "safetensors":
        files = _weight_files(folder, variant)
        for f in files:
            _convert_file(f, target / _plain_name(f.name), dtype, transform)
        for idx in folder.glob("*.safetensors.index*.json"):
            if _is_variant(idx.name) != (variant is not None):
                continue
            data = json.loads(idx.read_text(encoding="utf-8"))
            data["weight_map"] = {k: _plain_name(v) for k, v in data.get("weight_map", {}).items()}
            (target / _plain_name(idx.name)).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        pickles = sorted(p for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if len(pickles) != 1:
            raise ModelError(f"{folder}: expected one pickle weight file, found {len(pickles)}")
        st_name = "diffusion_pytorch_model.safetensors" if folder.name != "text_encoder" else "model.safetensors"
        _convert_pickle(pickles[0], target / st_name, dtype)


def _plain_name(name: str) -> str:
    return name.replace(".fp16.", ".")


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _convert_file(src: Path, dst: Path, dtype: str, transform: Callable[[str, Any], Any] | None = None) -> None:
    """Cast every floating tensor of one safetensors file, streaming one tensor at a time.

    `transform(name, tensor)` (a LoRA fusion) sees each tensor before the cast.

    The output is written by hand in the safetensors layout (8-byte header length, JSON
    header, packed data) so peak memory is one tensor, not the whole file: preparing the SD
    UNet on a 4 GB device must not need 3.4 GB.
    """
    import torch
    from safetensors import safe_open

    header = read_safetensors_header(src)
    target_st = _ST_DTYPE[dtype]
    out_header: dict[str, Any] = {}
    offset = 0
    names = sorted(header)
    for name in names:
        info = header[name]
        st = target_st if info["dtype"] in _FLOAT_ST else info["dtype"]
        if st not in _ST_ITEMSIZE:
            raise ModelError(f"{src}: tensor {name} has unsupported dtype {info['dtype']}")
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        size = count * _ST_ITEMSIZE[st]
        out_header[name] = {"dtype": st, "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    with safe_open(str(src), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        metadata.setdefault("format", "pt")
        blob = json.dumps({"__metadata__": metadata, **out_header}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        target = _torch_dtype(dtype)
        with open(dst, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for name in names:
                tensor = handle.get_tensor(name)
                if transform is not None:
                    tensor = transform(name, tensor)
                if tensor.is_floating_point():
                    tensor = tensor.to(target)
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                expected = out_header[name]["data_offsets"]
                if len(data) != expected[1] - expected[0]:
                    raise ModelError(f"{src}: tensor {name} has {len(data)} bytes, expected {expected[1] - expected[0]}")
                out.write(data)
                del tensor, data


def _convert_pickle(src: Path, dst: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    state = torch.load(str(src), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = _torch_dtype(dtype)
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _write_manifest(
    out: Path, *, src: Path, layout: ModelLayout, dtype: str, origin: dict[str, Any], extras: dict[str, Any] | None = None,
    loras: list[dict[str, Any]] | None = None, defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = {rel: sha256_file(out / rel) for rel in _list_files(out)}
    params = {c: _count_params(out / c) for c in WEIGHT_COMPONENTS}
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


def architecture_name(unet: dict[str, Any]) -> str:
    """sd15-inpaint | sd15 | sd2-inpaint for the published shapes, else a name made of the shapes."""
    blocks = tuple(unet.get("block_out_channels") or ())
    cross = unet.get("cross_attention_dim")
    channels = unet.get("in_channels")
    if blocks == (320, 640, 1280, 1280) and cross in (768, 1024) and channels in (4, 9):
        return ("sd15" if cross == 768 else "sd2") + ("-inpaint" if channels == 9 else "")
    return f"unet{channels}-{'-'.join(str(b) for b in blocks)}-x{cross}"


def manifest_id(files: dict[str, str]) -> str:
    """A short id for a prepared model: sha256 over its sorted (path, sha256) list, 12 hex digits."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()[:12]


def _list_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def _count_params(folder: Path) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        for info in read_safetensors_header(f).values():
            n = 1
            for dim in info["shape"]:
                n *= int(dim)
            total += n
    return total


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish_dir(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    """Rename a finished folder into place; an old one is moved aside first and then removed."""
    from .fsutil import fsync_dir

    for f in tmp.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    old: Path | None = None
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists")
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- check


def check_model(path: Path) -> list[str]:
    """Problems with a prepared model folder; an empty list means it is fine to load.

    Checks: the manifest exists and has the known schema; every file it lists exists with
    the recorded sha256; no weight file exists that it does not list; the floating tensors
    hold the manifest's dtype; the UNet has 9 or 4 input channels.
    """
    path = Path(path)
    problems: list[str] = []
    if not path.is_dir():
        return [f"{path} is not a folder"]
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{path} has no readable {MANIFEST_NAME}; run `inpaintd prepare-model` on it"]
    if manifest.get("schema") != MANIFEST_SCHEMA:
        problems.append(f"manifest schema is {manifest.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return problems + ["manifest lists no files"]
    for rel, expected in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        actual = sha256_file(f)
        if actual != expected:
            problems.append(f"{rel}: sha256 {actual[:12]}… differs from the manifest's {str(expected)[:12]}…")
    present = set(_list_files(path))
    for rel in sorted(present - set(files)):
        if rel.endswith((".safetensors", *PICKLE_SUFFIXES)):
            problems.append(f"{rel}: weight file not listed in the manifest")
    if manifest.get("id") != manifest_id(files):
        problems.append("manifest id does not match its file list")
    dtype = manifest.get("dtype")
    want = _ST_DTYPE.get(str(dtype))
    if want is None:
        problems.append(f"manifest dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    else:
        for rel in sorted(files):
            if not rel.endswith(".safetensors") or not (path / rel).is_file():
                continue
            try:
                header = read_safetensors_header(path / rel)
            except ModelError as exc:
                problems.append(str(exc))
                continue
            wrong = sorted({i["dtype"] for i in header.values() if i["dtype"] in _FLOAT_ST and i["dtype"] != want})
            if wrong:
                problems.append(f"{rel}: tensors in {', '.join(wrong)}, manifest says {dtype}")
    try:
        in_channels = int(_read_json(path / "unet" / "config.json", "the UNet config").get("in_channels", 0))
        if in_channels not in UNET_IN_CHANNELS:
            problems.append(f"the UNet has {in_channels} input channels; inpaintd needs 9 or 4")
    except ModelError as exc:
        problems.append(str(exc))
    return problems


def iter_problems(paths: Iterable[Path]) -> dict[str, list[str]]:
    """check_model over several folders (for `inpaintd check-model a b c`)."""
    return {str(p): check_model(p) for p in paths}


def read_state(folder: Path, weight_format: str, variant: str | None) -> dict[str, Any]:
    """Every tensor of one component folder (safetensors, or pickles the caller allowed)."""
    state: dict[str, Any] = {}
    if weight_format == "safetensors":
        from safetensors.torch import load_file

        for f in _weight_files(folder, variant):
            state.update(load_file(str(f)))
    else:
        import torch

        for f in sorted(folder.iterdir()):
            if f.name.endswith(PICKLE_SUFFIXES):
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state
