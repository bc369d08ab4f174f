"""Model folders on disk, without torch: what a folder holds, its manifest, the names inpaintd uses.

`inspect_model` checks a diffusers inpainting folder can be loaded safely and says what it
holds (`ModelFolder`); the engine loads what it accepts and modelprep writes folders that
pass it. Safety rules enforced here (and by the engine): pickle weights (.bin/.ckpt/.pt/.pth
run code when unpickled) are refused unless the operator sets ``model.allow_pickle``; remote
code is never trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ModelError
from .safetensors import read_header

MANIFEST_NAME = "inpaintd-manifest.json"
MANIFEST_SCHEMA = "inpaintd.model-manifest/1"
SOURCE_FILE = "inpaintd_source.json"
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"
# safetensors metadata key with which the random-model builders mark a file of random weights.
RANDOM_METADATA = "inpaintd.random_weights"
DRAFT_DECODER = "vae_tiny"  # the prepared folder's opt-in AutoencoderTiny (TAESD) for decoder: draft
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
# Components the pipeline needs; the safety checker and its feature extractor are not used.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Prepared folders' dtypes. fp16 is what SD checkpoints are published in: lossless to keep, half
# of fp32, and right on any CPU (the engine derives bf16 or upcasts to fp32 at run time).
DTYPES = ("fp16", "bf16", "fp32")
# 9: an inpainting UNet; 4: a text-to-image UNet, which the pipeline paints by latent blending.
UNET_IN_CHANNELS = (9, 4)
ST_DTYPE = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}
ST_DTYPE_NAME = {v: k for k, v in ST_DTYPE.items()}
FLOAT_ST = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class ModelFolder:
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


def inspect_model(path: Path, *, allow_pickle: bool = False) -> ModelFolder:
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
    unet_config = read_json(path / "unet" / "config.json", "the UNet config")
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
        fmt, variant = component_weights(folder, allow_pickle=allow_pickle)
        formats.add(fmt)
        variants.add(variant)
    if len(variants) > 1:
        # diffusers takes one variant for the whole pipeline; mixed folders would half-fail.
        raise ModelError(f"{path} mixes fp16-variant and plain weight files across components; prepare it first")
    variant = variants.pop()
    manifest = read_manifest(path)
    files_dtype = _unet_files_dtype(path / "unet", variant) if "safetensors" in formats else "fp32"
    return ModelFolder(
        path=path,
        variant=variant,
        weight_format="pickle" if "pickle" in formats else "safetensors",
        files_dtype=files_dtype,
        unet_in_channels=in_channels,
        unet_config=unet_config,
        manifest=manifest,
        random_weights=is_random_weights(path),
    )


def component_weights(folder: Path, *, allow_pickle: bool) -> tuple[str, str | None]:
    """("safetensors"|"pickle", variant) for one component folder."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    plain = [n for n in names if n.endswith(".safetensors") and not is_variant(n)]
    variant = [n for n in names if n.endswith(".safetensors") and is_variant(n)]
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
        return "pickle", "fp16" if all(is_variant(n) for n in pickles) else None
    raise ModelError(f"{folder} has no weight files (*.safetensors)")


def is_variant(name: str) -> bool:
    return ".fp16." in name


def _unet_files_dtype(unet: Path, variant: str | None) -> str:
    files = weight_files(unet, variant)
    dtypes: dict[str, int] = {}
    for f in files:
        for info in read_header(f).values():
            if info["dtype"] in FLOAT_ST:
                dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
    if not dtypes:
        return "fp32"
    top = max(dtypes, key=lambda k: dtypes[k])
    return ST_DTYPE_NAME.get(top, top.lower())


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    files = sorted(p for p in folder.glob("*.safetensors") if is_variant(p.name) == (variant is not None))
    return files


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


def read_json(path: Path, what: str) -> dict[str, Any]:
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


def architecture_name(unet: dict[str, Any]) -> str:
    """sd15-inpaint | sd15 | sd2-inpaint for the published shapes, else a name made of the shapes."""
    blocks = tuple(unet.get("block_out_channels") or ())
    cross = unet.get("cross_attention_dim")
    channels = unet.get("in_channels")
    if blocks == (320, 640, 1280, 1280) and cross in (768, 1024) and channels in (4, 9):
        return ("sd15" if cross == 768 else "sd2") + ("-inpaint" if channels == 9 else "")
    return f"unet{channels}-{'-'.join(str(b) for b in blocks)}-x{cross}"


def prepared_dtype(setting: str, source_dtype: str) -> str:
    """The dtype `prepare-model --dtype SETTING` writes for a source whose weights are `source_dtype`.

    auto keeps a 16-bit source's own precision (fp16 stays fp16, bf16 stays bf16: converting
    between the two loses bits) and writes fp16 for an fp32 source, as the published fp16
    checkpoints are made; fp32 needs ``--dtype fp32``. The folder is the same whatever CPU
    prepares it: the engine shapes it for its own CPU (engine/weightpolicy.py).
    """
    if setting in DTYPES:
        return setting
    if setting != "auto":
        raise ValueError(f"dtype must be auto or one of {DTYPES}, got {setting!r}")
    return "bf16" if source_dtype == "bf16" else "fp16"


def manifest_id(files: dict[str, str]) -> str:
    """A short id for a prepared model: sha256 over its sorted (path, sha256) list, 12 hex digits."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()[:12]


def list_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


# ----------------------------------------------------------------------------- check


