"""Converting weights into a prepared folder: one tensor at a time, in the prepared dtype (fp16, bf16, fp32).

Used by prepare.py for the folder as a whole and by lora, merge, vae and embeddings for
their parts; `convert_file` takes a `transform` (a LoRA fusion) applied to each tensor
before its cast.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

from ..core.digest import sha256_file
from ..core.errors import ModelError
from ..weights.folder import (
    COMPONENTS,
    FLOAT_ST,
    PICKLE_SUFFIXES,
    RANDOM_MARKER,
    SOURCE_FILE,
    ST_DTYPE,
    WEIGHT_COMPONENTS,
    ModelFolder,
    component_weights,
    is_variant,
    manifest_id,
    read_json,
    weight_files,
)
from ..weights.safetensors import ITEM_BYTES, read_header


def convert_folder(layout: ModelFolder, out: Path, dtype: str, fusion: Any = None) -> None:
    src = layout.path
    index = read_json(src / "model_index.json", "model_index.json")
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
            convert_component(folder, target, dtype, layout.variant, layout.weight_format, fusion)
        else:
            for item in sorted(folder.iterdir()):
                if item.is_file() and not item.name.endswith(PICKLE_SUFFIXES):
                    shutil.copy2(item, target / item.name)


def convert_component(folder: Path, target: Path, dtype: str, variant: str | None, fmt: str, fusion: Any = None) -> None:
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
        files = weight_files(folder, variant)
        for f in files:
            convert_file(f, target / _plain_name(f.name), dtype, transform)
        for idx in folder.glob("*.safetensors.index*.json"):
            if is_variant(idx.name) != (variant is not None):
                continue
            data = json.loads(idx.read_text(encoding="utf-8"))
            data["weight_map"] = {k: _plain_name(v) for k, v in data.get("weight_map", {}).items()}
            (target / _plain_name(idx.name)).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        pickles = sorted(p for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if len(pickles) != 1:
            raise ModelError(f"{folder}: expected one pickle weight file, found {len(pickles)}")
        st_name = "diffusion_pytorch_model.safetensors" if folder.name != "text_encoder" else "model.safetensors"
        convert_pickle(pickles[0], target / st_name, dtype)


def _plain_name(name: str) -> str:
    return name.replace(".fp16.", ".")


def torch_dtype(dtype: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]




def convert_file(src: Path, dst: Path, dtype: str, transform: Callable[[str, Any], Any] | None = None) -> None:
    """Cast every floating tensor of one safetensors file, streaming one tensor at a time.

    `transform(name, tensor)` (a LoRA fusion) sees each tensor before the cast.

    The output is written by hand in the safetensors layout (8-byte header length, JSON
    header, packed data) so peak memory is one tensor, not the whole file: preparing the SD
    UNet on a 4 GB device must not need 3.4 GB.
    """
    import torch
    from safetensors import safe_open

    header = read_header(src)
    target_st = ST_DTYPE[dtype]
    out_header: dict[str, Any] = {}
    offset = 0
    names = sorted(header)
    for name in names:
        info = header[name]
        st = target_st if info["dtype"] in FLOAT_ST else info["dtype"]
        if st not in ITEM_BYTES:
            raise ModelError(f"{src}: tensor {name} has unsupported dtype {info['dtype']}")
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        size = count * ITEM_BYTES[st]
        out_header[name] = {"dtype": st, "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    with safe_open(str(src), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        metadata.setdefault("format", "pt")
        blob = json.dumps({"__metadata__": metadata, **out_header}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        target = torch_dtype(dtype)
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


def convert_pickle(src: Path, dst: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    state = torch.load(str(src), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = torch_dtype(dtype)
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(tensors, str(dst), metadata={"format": "pt"})


def count_params(folder: Path) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        for info in read_header(f).values():
            n = 1
            for dim in info["shape"]:
                n *= int(dim)
            total += n
    return total


def read_state(folder: Path, weight_format: str, variant: str | None) -> dict[str, Any]:
    """Every tensor of one component folder (safetensors, or pickles the caller allowed)."""
    state: dict[str, Any] = {}
    if weight_format == "safetensors":
        from safetensors.torch import load_file

        for f in weight_files(folder, variant):
            state.update(load_file(str(f)))
    else:
        import torch

        for f in sorted(folder.iterdir()):
            if f.name.endswith(PICKLE_SUFFIXES):
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def folder_state(folder: Path, *, allow_pickle: bool) -> dict[str, Any]:
    fmt, variant = component_weights(folder, allow_pickle=allow_pickle)
    return read_state(folder, fmt, variant)


def component_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in read_header(f).items():
            shapes[name] = tuple(int(d) for d in info["shape"])
    return shapes


def source_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path, nofollow=False).sha256
    files = {p.relative_to(path).as_posix(): sha256_file(p, nofollow=False).sha256 for p in sorted(path.rglob("*")) if p.is_file()}
    return manifest_id(files)
