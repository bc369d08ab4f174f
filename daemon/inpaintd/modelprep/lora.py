"""LoRA files fused into a model's own weights at prepare time (prepare-model --lora FILE[:SCALE]).

A fused LoRA costs nothing at run time: the prepared folder holds W + scale * (alpha/rank) *
up @ down for every layer the LoRA touches, computed in fp32 *before* the cast to the
runtime dtype (convert.convert_file calls `Fusion.apply` per tensor), so the daemon still maps
its weights without copying and the int8 cache is built from the fused UNet.

Key layouts read (the ones diffusers' load_lora_weights reads for SD-1.x/2.x):

- kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, text encoder ``lora_te_`` (or ``lora_te1_``). The underscored name is matched
  against the model's own module names with their dots turned into underscores.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and
  ``text_encoder.<module>...``, alpha from ``<module>.alpha`` keys or the file's
  ``lora_adapter_metadata`` (``unet.lora_alpha``), else alpha = rank.
- older diffusers: ``<module>.lora.down.weight``, attention processors'
  ``...attn1.processor.to_q_lora.down.weight`` and text encoder ``lora_linear_layer``.

Refused with a message naming the keys: pickles (safetensors only), LyCORIS (LoHa/LoKr), DoRA,
SDXL's second text encoder, and any layer whose module the model does not have or whose
shape does not fit. Plain functions over names and shapes; torch only in `delta`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.digest import sha256_file
from ..core.errors import ModelError
from ..weights.safetensors import read_header, read_header_and_metadata

COMPONENTS = ("unet", "text_encoder")
_PAIRS = (  # (down suffix, up suffix)
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)
_UNSUPPORTED = {
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_te2_": "SDXL (second text encoder)",
    "text_encoder_2.": "SDXL (second text encoder)",
}
SHOWN = 5  # keys named in a refusal


@dataclass(frozen=True)
class LoraSpec:
    """One --lora argument: a file and its strength (diffusers' fuse_lora(lora_scale=...))."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """FILE or FILE:SCALE (a colon inside an existing file's name is part of the name)."""
        if Path(text).exists() or ":" not in text:
            return cls(Path(text))
        path, _, raw = text.rpartition(":")
        try:
            scale = float(raw)
        except ValueError:
            raise ModelError(f"--lora {text}: the scale after ':' must be a number, got {raw!r}") from None
        if not math.isfinite(scale):
            raise ModelError(f"--lora {text}: the scale must be finite")
        return cls(Path(path), scale)


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: tensor names in the LoRA file and the weight it lands on."""

    component: str  # "unet" | "text_encoder"
    weight: str  # the model tensor it changes, e.g. down_blocks.0.attentions.0.proj_in.weight
    down: str
    up: str
    alpha: float | None  # None: alpha = rank (scaling 1)


@dataclass
class LoraPlan:
    """A LoRA file matched against one model: what prepare-model fuses and the manifest records."""

    spec: LoraSpec
    sha256: str
    layout: str  # "kohya" | "peft" | "diffusers-legacy"
    layers: list[LoraLayer] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        touched = {c: sorted(l.weight for l in self.layers if l.component == c) for c in COMPONENTS}
        return {
            "file": self.spec.path.name,
            "sha256": self.sha256,
            "scale": self.spec.scale,
            "layout": self.layout,
            "ranks": sorted(set(self.ranks)),
            "layers": {c: len(v) for c, v in touched.items()},
            "keys": {c: v for c, v in touched.items() if v},
        }


# ----------------------------------------------------------------------------- matching


def plan(spec: LoraSpec, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> LoraPlan:
    """Match a LoRA file against a model's {component: {tensor name: shape}}.

    Raises ModelError (which keys, why) for anything that would not fuse exactly.
    """
    path = spec.path
    if not path.is_file():
        raise ModelError(f"LoRA {path} does not exist or is not a file")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"LoRA {path}: only .safetensors LoRA files are read (a pickle can run code when loaded)")
    header, metadata = read_header_and_metadata(path)
    keys = list(header)
    if not keys:
        raise ModelError(f"LoRA {path} holds no tensors")
    for marker, what in _UNSUPPORTED.items():
        hits = [k for k in keys if marker in k]
        if hits:
            raise ModelError(f"LoRA {path.name} is {what}, which inpaintd does not fuse (e.g. {hits[0]})")
    meta_alpha = _metadata_alphas(metadata, path)
    tables = {c: _module_tables(names) for c, names in shapes.items()}
    used: set[str] = set()
    layers: list[LoraLayer] = []
    ranks: list[int] = []
    unmatched: list[str] = []
    layouts: set[str] = set()
    for key in sorted(keys):
        pair = next(((d, u) for d, u in _PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        down_suffix, up_suffix = pair
        base = key[: -len(down_suffix)]
        up = base + up_suffix
        if up not in header:
            raise ModelError(f"LoRA {path.name}: {key} has no matching {up}")
        used.update((key, up))
        component, module, layout = _locate(base, down_suffix)
        layouts.add(layout)
        alpha_key = next((a for a in (base + ".alpha", base + ".lora.alpha") if a in header), None)
        alpha: float | None = None
        if alpha_key is not None:
            used.add(alpha_key)
            alpha = _read_scalar(path, alpha_key)
        elif component in meta_alpha:
            alpha = meta_alpha[component]
        weight = _resolve(component, module, tables, underscored=layout == "kohya")
        if weight is None:
            unmatched.append(key)
            continue
        target = tuple(shapes[component][weight])
        down_shape = tuple(int(d) for d in header[key]["shape"])
        up_shape = tuple(int(d) for d in header[up]["shape"])
        problem = _shape_problem(target, down_shape, up_shape)
        if problem:
            raise ModelError(f"LoRA {path.name}: {key} does not fit {component} {weight} {list(target)}: {problem}")
        ranks.append(down_shape[0])
        layers.append(LoraLayer(component, weight, key, up, alpha))
    # diffusers (peft_utils.get_peft_kwargs, one adapter config per component) gives a layer
    # without an alpha key its component's most common alpha, not alpha = rank.
    for component in COMPONENTS:
        keyed = [l.alpha for l in layers if l.component == component and l.alpha is not None]
        if keyed:
            common = max(sorted(set(keyed)), key=keyed.count)
            layers = [replace(l, alpha=common) if l.component == component and l.alpha is None else l for l in layers]
    if unmatched:
        raise ModelError(
            f"LoRA {path.name} does not match this model: {len(unmatched)} of its layers name modules the model "
            f"does not have (e.g. {', '.join(unmatched[:SHOWN])}); it was made for another architecture"
        )
    leftovers = sorted(k for k in keys if k not in used and not k.endswith(".alpha"))
    if leftovers:
        raise ModelError(
            f"LoRA {path.name}: {len(leftovers)} tensor(s) are not LoRA layers inpaintd knows "
            f"(e.g. {', '.join(leftovers[:SHOWN])})"
        )
    if not layers:
        raise ModelError(f"LoRA {path.name} has no LoRA layers (no lora_down/lora_A keys)")
    weights = [l.weight for l in layers]
    doubled = sorted({w for w in weights if weights.count(w) > 1})
    if doubled:
        raise ModelError(f"LoRA {path.name} updates {doubled[0]} twice (mixed key layouts)")
    return LoraPlan(spec, sha256_file(path, nofollow=False).sha256, "+".join(sorted(layouts)), layers, ranks)


def _locate(base: str, down_suffix: str) -> tuple[str, str, str]:
    """(component, module name as the file spells it, layout) for one layer's key stem."""
    if base.startswith("lora_unet_"):
        return "unet", base[len("lora_unet_"):], "kohya"
    for prefix in ("lora_te_", "lora_te1_"):
        if base.startswith(prefix):
            return "text_encoder", base[len(prefix):], "kohya"
    layout = "peft" if down_suffix == ".lora_A.weight" else "diffusers-legacy"
    component = "unet"
    for prefix, owner in (("unet.", "unet"), ("text_encoder.", "text_encoder"), ("base_model.model.", "unet")):
        if base.startswith(prefix):
            base, component = base[len(prefix):], owner
            break
    if down_suffix == "_lora.down.weight":  # attention processor: ...attn1.processor.to_out_lora
        stem, _, proj = base.rpartition(".")
        stem = stem.removesuffix(".processor")
        base = f"{stem}.{'to_out.0' if proj == 'to_out' else proj}"
    return component, base, layout


def _module_tables(names: Collection[str]) -> tuple[set[str], dict[str, str | None]]:
    """({module: ...} with a weight, {module with dots as underscores: module or None if ambiguous})."""
    modules = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
    underscored: dict[str, str | None] = {}
    for module in modules:
        flat = module.replace(".", "_")
        underscored[flat] = None if flat in underscored else module
    return modules, underscored


def _resolve(component: str, module: str, tables: Mapping[str, tuple[set[str], dict[str, str | None]]],
             *, underscored: bool) -> str | None:
    if component not in tables:
        return None
    modules, flat = tables[component]
    found = flat.get(module) if underscored else (module if module in modules else None)
    return None if found is None else found + ".weight"


def _shape_problem(target: tuple[int, ...], down: tuple[int, ...], up: tuple[int, ...]) -> str | None:
    if len(down) < 2 or len(up) < 2:
        return f"lora_down {list(down)} / lora_up {list(up)} are not matrices"
    rank = down[0]
    if rank < 1:
        return "rank 0"
    if up[1] != rank or math.prod(up[2:]) != 1:
        return f"lora_up {list(up)} does not pair with lora_down {list(down)} (rank {rank})"
    if up[0] != target[0] or up[0] * math.prod(down[1:]) != math.prod(target):
        return f"up x down gives {up[0]} x {math.prod(down[1:])} values"
    return None


def _metadata_alphas(metadata: Mapping[str, str], path: Path) -> dict[str, float]:
    """Per-component lora_alpha from diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig fields)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ModelError(f"LoRA {path.name}: unreadable lora_adapter_metadata") from None
    if not isinstance(data, dict):
        raise ModelError(f"LoRA {path.name}: lora_adapter_metadata is not a JSON object")
    alphas: dict[str, float] = {}
    for component in COMPONENTS:
        if data.get(f"{component}.alpha_pattern") or data.get(f"{component}.rank_pattern"):
            raise ModelError(f"LoRA {path.name}: per-layer alpha/rank patterns are not supported")
        if data.get(f"{component}.use_rslora") or data.get(f"{component}.use_dora"):
            raise ModelError(f"LoRA {path.name}: rsLoRA/DoRA adapters are not supported")
        value = data.get(f"{component}.lora_alpha")
        if value is not None:
            alphas[component] = _finite_alpha(value, f"{component}.lora_alpha", path)
    return alphas


def _finite_alpha(value: Any, what: str, path: Path) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ModelError(f"LoRA {path.name}: {what} is not a number") from None
    if not math.isfinite(alpha):
        raise ModelError(f"LoRA {path.name}: {what} is {alpha}")
    return alpha


def _read_scalar(path: Path, key: str) -> float:
    tensor = _read_tensor(path, key)
    if tensor.numel() != 1:
        raise ModelError(f"LoRA {path.name}: {key} holds {tensor.numel()} values, not one")
    return _finite_alpha(tensor.float().reshape(-1)[0].item(), key, path)


def _read_tensor(path: Path, key: str, handle: Any = None) -> Any:
    """One tensor of a LoRA file; a file safetensors cannot read is a ModelError."""
    from safetensors import safe_open

    try:
        if handle is not None:
            return handle.get_tensor(key)
        with safe_open(str(path), framework="pt") as opened:
            return opened.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ModelError(f"LoRA {path.name}: cannot read {key}: {exc}") from exc


# ----------------------------------------------------------------------------- fusing


class Fusion:
    """The fused weights of some LoRAs, one model tensor at a time (convert.convert_file)."""

    def __init__(self, plans: list[LoraPlan]):
        self.plans = plans
        self._by_weight: dict[tuple[str, str], list[tuple[LoraPlan, LoraLayer]]] = {}
        for p in plans:
            for layer in p.layers:
                self._by_weight.setdefault((layer.component, layer.weight), []).append((p, layer))
        self._handles: dict[Path, Any] = {}
        self.fused: set[tuple[str, str]] = set()

    def touches(self, component: str) -> bool:
        return any(c == component for c, _ in self._by_weight)

    def apply(self, component: str, name: str, tensor: Any) -> Any:
        """`tensor` plus every update aimed at it, in fp32; unchanged (same object) if none is."""
        updates = self._by_weight.get((component, name))
        if not updates:
            return tensor
        import torch

        fused = tensor.to(torch.float32, copy=True)
        for p, layer in updates:
            fused += delta(self._tensor(p.spec.path, layer.down), self._tensor(p.spec.path, layer.up),
                           layer.alpha, p.spec.scale, tuple(fused.shape))
        self.fused.add((component, name))
        return fused

    def missed(self) -> list[str]:
        """Planned updates whose weight never passed through apply (a model file changed meanwhile)."""
        return sorted(f"{c}.{w}" for c, w in self._by_weight if (c, w) not in self.fused)

    def close(self) -> None:
        self._handles.clear()

    def _tensor(self, path: Path, key: str) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for corrupt files
                raise ModelError(f"LoRA {path.name} is not a readable safetensors file: {exc}") from exc
        return _read_tensor(path, key, handle)


def delta(down: Any, up: Any, alpha: float | None, scale: float, shape: tuple[int, ...]) -> Any:
    """scale * (alpha / rank) * up @ down, shaped like the weight (linear, 1x1 or kxk conv), in fp32.

    A kxk conv LoRA is a kxk down conv then a 1x1 up conv; their product flattens the kernel
    into the down matrix's columns, which is the same sum PEFT's conv2d form computes.
    """
    import torch

    rank = int(down.shape[0])
    factor = scale * ((alpha / rank) if alpha is not None else 1.0)
    product = up.to(torch.float32).reshape(up.shape[0], rank) @ down.to(torch.float32).reshape(rank, -1)
    return (product * factor).reshape(shape)


def model_shapes(folder: Path, components: Collection[str] = COMPONENTS) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {tensor name: shape}} from a diffusers folder's safetensors headers."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in components:
        names: dict[str, tuple[int, ...]] = {}
        for f in sorted((folder / component).glob("*.safetensors")):
            for name, info in read_header(f).items():
                names[name] = tuple(int(d) for d in info["shape"])
        shapes[component] = names
    return shapes


__all__ = ["LoraSpec", "LoraLayer", "LoraPlan", "Fusion", "plan", "delta", "model_shapes"]
