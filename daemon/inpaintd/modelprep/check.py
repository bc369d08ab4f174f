"""`inpaintd check`: verify a prepared folder against its manifest (hashes, dtype, architecture)."""

from __future__ import annotations

from pathlib import Path

from ..core.digest import sha256_file
from ..core.errors import ModelError
from ..core.quoting import shorten
from ..weights.folder import (
    DTYPES,
    FLOAT_ST,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    PICKLE_SUFFIXES,
    ST_DTYPE,
    UNET_IN_CHANNELS,
    WEIGHT_COMPONENTS,
    list_files,
    manifest_id,
    read_json,
    read_manifest,
)
from ..weights.safetensors import read_header
from .checkpoints import build_meta


def check_model(path: Path) -> list[str]:
    """Problems with a prepared model folder; an empty list means it is fine to load.

    Checks: the manifest exists and has the known schema; every file it lists exists with
    the recorded sha256; no weight file exists that it does not list; the floating tensors
    hold the manifest's dtype and only finite values; the UNet has 9 or 4 input channels.
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
        actual = sha256_file(f, nofollow=False).sha256
        if actual != expected:
            problems.append(f"{rel}: sha256 {actual[:12]}… differs from the manifest's {str(expected)[:12]}…")
    present = set(list_files(path))
    for rel in sorted(present - set(files)):
        if rel.endswith((".safetensors", *PICKLE_SUFFIXES)):
            problems.append(f"{rel}: weight file not listed in the manifest")
    if manifest.get("id") != manifest_id(files):
        problems.append("manifest id does not match its file list")
    dtype = manifest.get("dtype")
    want = ST_DTYPE.get(str(dtype))
    if want is None:
        problems.append(f"manifest dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    else:
        for rel in sorted(files):
            if not rel.endswith(".safetensors") or not (path / rel).is_file():
                continue
            try:
                header = read_header(path / rel)
            except ModelError as exc:
                problems.append(str(exc))
                continue
            wrong = sorted({i["dtype"] for i in header.values() if i["dtype"] in FLOAT_ST and i["dtype"] != want})
            if wrong:
                problems.append(f"{rel}: tensors in {', '.join(wrong)}, manifest says {dtype}")
    try:
        in_channels = int(read_json(path / "unet" / "config.json", "the UNet config").get("in_channels", 0))
        if in_channels not in UNET_IN_CHANNELS:
            problems.append(f"the UNet has {in_channels} input channels; inpaintd needs 9 or 4")
    except ModelError as exc:
        problems.append(str(exc))
    problems += component_problems(path)
    for weight in non_finite_tensors(path):
        problems.append(f"{weight}: holds NaN or infinite values (such a model paints black)")
    return problems


def component_problems(folder: Path, shown: int = 3) -> list[str]:
    """Why a component would not load: its weight files must hold exactly the tensors, of the
    shapes, that its config.json describes (compared on the meta device, no weights read)."""
    problems: list[str] = []
    for component in WEIGHT_COMPONENTS:
        try:
            config = read_json(folder / component / "config.json", f"the {component} config")
            expected = {k: tuple(v.shape) for k, v in build_meta(component, config).state_dict().items()}
        except ModelError as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - diffusers/transformers refuse a config many ways
            problems.append(f"{component}/config.json does not describe a model diffusers can build: "
                            f"{type(exc).__name__}: {shorten(str(exc), 200)}")
            continue
        actual: dict[str, tuple[int, ...]] = {}
        try:
            for weights in sorted((folder / component).glob("*.safetensors")):
                actual.update({k: tuple(v["shape"]) for k, v in read_header(weights).items()})
        except ModelError as exc:
            problems.append(str(exc))
            continue
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        wrong = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
        if missing:
            problems.append(f"{component}: {len(missing)} weights its config needs are missing (e.g. {', '.join(missing[:shown])})")
        if extra:
            problems.append(f"{component}: {len(extra)} weights its config does not have (e.g. {', '.join(extra[:shown])})")
        for key in wrong[:shown]:
            problems.append(f"{component}: {key} has shape {list(actual[key])}, its config needs {list(expected[key])}")
    return problems


def non_finite_tensors(folder: Path, limit: int = 5) -> list[str]:
    """'FILE: TENSOR' for (up to `limit`) weights holding NaN or infinity in a model folder.

    Such weights load and run, and paint pure black: prepare-model refuses them and `check`
    reports them. Read tensor by tensor through safetensors' mapping, so memory stays one tensor.
    """
    import torch
    from safetensors import safe_open

    found: list[str] = []
    for weights in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    found.append(f"{weights.relative_to(folder)}: {name}")
                    if len(found) >= limit:
                        return found
    return found
