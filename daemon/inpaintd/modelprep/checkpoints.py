"""Single-file SD checkpoints (CompVis/A1111 layout): read safely, recognise, convert to a folder.

`inspect_checkpoint` reads only the safetensors header (names, shapes, dtypes), so a corrupt,
truncated or foreign file is refused before a byte of tensor data is read, and says what the
file is. `convert_checkpoint` writes a diffusers folder from it with the configs that ship in
``model_configs/`` (or a folder the user names), checking every tensor's name and shape
against the architecture those configs describe: a file that does not match is refused, never
half-loaded. Nothing here touches the network.

The inverse (diffusers tensors -> one original-layout file), with which tests build files the
way users get them, is inpaintd.testing.single_file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ModelError
from ..weights.folder import PICKLE_SUFFIXES, RANDOM_METADATA, SOURCE_FILE
from ..weights.safetensors import read_header_and_metadata
from . import keymaps
from .tokenizer import write_tokenizer

CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
KINDS = ("sd15-inpaint", "sd15", "sd2-inpaint")
SUPPORTED = (
    "inpaintd converts SD-1.5 inpainting (9-channel), ordinary SD-1.5 (4-channel) and SD-2 inpainting "
    "(9-channel, 512px) checkpoints"
)
_CONV_IN = keymaps.UNET_PREFIX + "input_blocks.0.0.weight"
_CLIP_TOKEN = keymaps.CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
_CLIP_TOKEN_OLD = keymaps.CLIP_PREFIX + "embeddings.token_embedding.weight"  # transformers < 4.x layout
_OPEN_CLIP_TOKEN = keymaps.OPEN_CLIP_PREFIX + "token_embedding.weight"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint is, read from its tensor names and shapes alone."""

    path: Path
    kind: str  # one of KINDS
    family: str  # "sd1" | "sd2"
    unet_in_channels: int
    cross_attention_dim: int
    text_encoder: str | None  # "clip" (SD-1) | "open_clip" (SD-2) | None when the file has none
    has_vae: bool
    has_ema: bool
    prediction_type: str  # "epsilon" | "v_prediction" (only when the file says so)
    files_dtype: str
    vocab_size: int | None


# ----------------------------------------------------------------------------- reading


class TensorFile:
    """Tensors of one checkpoint file by name: lazily from safetensors, eagerly from a pickle."""

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        self._pickled: dict[str, Any] | None = None
        self._handle: Any = None
        self.metadata: dict[str, str] = {}
        if not self.path.is_file():
            raise ModelError(f"{self.path} does not exist or is not a file")
        if self.path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ModelError(
                    f"{self.path} is a pickle checkpoint; loading a pickle can run code. Use the .safetensors "
                    "version of the model, or pass --allow-pickle if you trust the file"
                )
            self._pickled = _load_pickle(self.path)
            self.header = {
                k: {"dtype": _torch_st_dtype(v), "shape": list(v.shape)} for k, v in self._pickled.items()
            }
        else:
            self.header, self.metadata = read_header_and_metadata(self.path)

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key: str) -> bool:
        return key in self.header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.header[key]["shape"])

    def get(self, key: str) -> Any:
        if self._pickled is not None:
            return self._pickled[key]
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for corrupt files
                raise ModelError(f"{self.path} is not a readable safetensors file: {exc}") from exc
        return self._handle.get_tensor(key)


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        # weights_only: tensors and plain containers only, so a hostile pickle cannot run code.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable checkpoint: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if hasattr(v, "shape") and hasattr(v, "dtype")}


def _torch_st_dtype(tensor: Any) -> str:
    return {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32"}.get(str(tensor.dtype), "OTHER")


# ----------------------------------------------------------------------------- recognising


def what_is_it(keys: list[str]) -> str | None:
    """A sentence naming a file that is not a supported checkpoint, or None when it may be one."""
    if not keys:
        return "holds no tensors"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "is a LoRA, not a checkpoint (inpaintd does not fuse LoRAs)"
    if any("joint_blocks." in k for k in keys):
        return "is a Stable Diffusion 3 checkpoint"
    if any("double_blocks." in k for k in keys):
        return "is a Flux checkpoint"
    if any(k.startswith("conditioner.embedders.") for k in keys) or any(
        k.startswith(keymaps.UNET_PREFIX + "label_emb.") for k in keys
    ):
        return "is an SDXL checkpoint"
    if any(k.startswith("control_model.") for k in keys):
        return "is a ControlNet"
    if set(keys) <= {"emb_params", "string_to_param", "string_to_token", "name", "step", "clip_l", "clip_g"} or (
        len(keys) == 1 and keys[0].startswith("<") and keys[0].endswith(">")  # diffusers' {"<token>": vectors}
    ):
        return "is a textual-inversion embedding; pass it with --embedding"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "is a VAE; pass it with --vae"
    if _CONV_IN not in keys:
        return "is not a Stable Diffusion checkpoint (it has no UNet in the original layout)"
    return None


def inspect_checkpoint(path: Path, *, allow_pickle: bool = False, source: TensorFile | None = None) -> CheckpointInfo:
    """Recognise a single-file checkpoint; raise ModelError naming it when it is not supported."""
    tensors = source or TensorFile(path, allow_pickle=allow_pickle)
    keys = tensors.keys()
    problem = what_is_it(keys)
    if problem:
        raise ModelError(f"{path} {problem}. {SUPPORTED}")
    in_channels = tensors.shape(_CONV_IN)[1]
    cross = next(
        (tensors.shape(k)[1] for k in keys if k.startswith(keymaps.UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
        0,
    )
    if any(k.startswith(keymaps.OPEN_CLIP_PREFIX) for k in keys):
        text, vocab = "open_clip", tensors.shape(_OPEN_CLIP_TOKEN)[0] if _OPEN_CLIP_TOKEN in tensors else None
    elif any(k.startswith(keymaps.CLIP_PREFIX) for k in keys):
        token = _CLIP_TOKEN if _CLIP_TOKEN in tensors else _CLIP_TOKEN_OLD
        text, vocab = "clip", tensors.shape(token)[0] if token in tensors else None
    else:
        text, vocab = None, None
    family = "sd2" if text == "open_clip" or (text is None and cross == 1024) else "sd1"
    if in_channels == 9:
        kind = "sd2-inpaint" if family == "sd2" else "sd15-inpaint"
    elif in_channels == 4 and family == "sd1":
        kind = "sd15"
    elif in_channels == 4:
        raise ModelError(
            f"{path} is an SD-2 text-to-image checkpoint (4 input channels, OpenCLIP text encoder). {SUPPORTED}"
        )
    else:
        what = {8: "an InstructPix2Pix-style", 7: "an upscaler"}.get(in_channels, "an unknown")
        raise ModelError(f"{path} is {what} model ({in_channels} UNet input channels). {SUPPORTED}")
    dtypes: dict[str, int] = {}
    for k in keys:
        if k.startswith(keymaps.UNET_PREFIX):
            d = tensors.header[k]["dtype"]
            dtypes[d] = dtypes.get(d, 0) + 1
    files_dtype = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(max(dtypes, key=dtypes.get), "other")
    return CheckpointInfo(
        path=Path(path),
        kind=kind,
        family=family,
        unet_in_channels=in_channels,
        cross_attention_dim=cross,
        text_encoder=text,
        has_vae=any(k.startswith(keymaps.VAE_PREFIX) for k in keys),
        has_ema=keymaps.ema_name("input_blocks.0.0.weight") in tensors,
        # LDM files do not record the parameterization; some trainers leave an empty "v_pred" marker.
        prediction_type="v_prediction" if "v_pred" in tensors else "epsilon",
        files_dtype=files_dtype,
        vocab_size=vocab,
    )


# ----------------------------------------------------------------------------- converting


def convert_checkpoint(
    path: Path,
    out: Path,
    *,
    dtype: str = "fp32",
    config_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    use_ema: bool = False,
    allow_pickle: bool = False,
) -> CheckpointInfo:
    """Write the diffusers folder `out` (must not exist) from the single file `path`.

    Configs come from ``model_configs/<kind>`` unless `config_dir` (a diffusers folder of the
    same architecture, e.g. for a non-standard size) is given. `use_ema` takes the EMA copy
    of the UNet when the file has one. The tokenizer's vocabulary is not in the file:
    `tokenizer_dir`, else the Hugging Face cache, else (for the random-weight models) the
    byte-level vocabulary built in code.
    """
    import torch

    path, out = Path(path), Path(out)
    tensors = TensorFile(path, allow_pickle=allow_pickle)
    info = inspect_checkpoint(path, source=tensors)
    if info.text_encoder is None:
        raise ModelError(f"{path} has no text encoder; inpaintd needs a full checkpoint (UNet, VAE, text encoder)")
    if not info.has_vae:
        raise ModelError(f"{path} has no VAE baked in; add one with --vae FILE")
    if use_ema and not info.has_ema:
        raise ModelError(f"{path} has no EMA weights (use_ema was asked for)")
    configs = Path(config_dir) if config_dir is not None else CONFIGS_DIR / info.kind
    if not (configs / "model_index.json").is_file():
        raise ModelError(f"{configs} is not a diffusers config folder (no model_index.json)")
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    out.mkdir(parents=True)
    shutil.copy2(configs / "model_index.json", out / "model_index.json")

    unet_cfg = read_config(configs / "unet" / "config.json")
    vae_cfg = read_config(configs / "vae" / "config.json")
    text_cfg = read_config(configs / "text_encoder" / "config.json")
    if info.vocab_size is not None:
        text_cfg["vocab_size"] = info.vocab_size  # a fine-tune may carry extra (embedding) tokens
    arch = f"the {info.kind} architecture of {configs}"

    def unet_source(key: str) -> str:
        ldm = keymaps.unet_to_ldm(key, unet_cfg)
        return keymaps.ema_name(ldm) if use_ema else keymaps.UNET_PREFIX + ldm

    unet_expected = _expected_shapes("unet", unet_cfg)
    unet_sd = _gather(tensors, unet_expected, unet_source, target, arch, "UNet")
    used = {keymaps.UNET_PREFIX + keymaps.unet_to_ldm(k, unet_cfg) for k in unet_expected}
    _refuse_leftovers(tensors, keymaps.UNET_PREFIX, used, arch, path)
    _save_component(out / "unet", unet_sd, unet_cfg, "diffusion_pytorch_model.safetensors")
    del unet_sd

    vae_expected = _expected_shapes("vae", vae_cfg)
    vae_sd = _gather(
        tensors, vae_expected, lambda k: keymaps.VAE_PREFIX + keymaps.vae_to_ldm(k, vae_cfg), target, arch, "VAE"
    )
    _save_component(out / "vae", vae_sd, vae_cfg, "diffusion_pytorch_model.safetensors")
    del vae_sd

    text_expected = _expected_shapes("text_encoder", text_cfg)
    if info.text_encoder == "clip":
        # Files saved with an old transformers lack the "text_model." level.
        strip = 0 if _CLIP_TOKEN in tensors else len("text_model.")
        text_sd = _gather(
            tensors,
            text_expected,
            lambda k: keymaps.CLIP_PREFIX + keymaps.text_canonical(k)[strip:],
            target,
            arch,
            "text encoder",
        )
    else:
        text_sd = _open_clip_to_diffusers(tensors, text_expected, target, arch)
    _save_component(out / "text_encoder", text_sd, text_cfg, "model.safetensors")
    del text_sd

    scheduler = read_config(configs / "scheduler" / "scheduler_config.json")
    scheduler["prediction_type"] = info.prediction_type
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(out / "tokenizer", configs / "tokenizer", path, info.vocab_size, tokenizer_dir)
    if tensors.metadata.get(RANDOM_METADATA) == "true":
        # The random-model builders label the files they write; the label must survive conversion.
        label = {"random_weights": True, "from_single_file": path.name}
        (out / SOURCE_FILE).write_text(json.dumps(label, indent=2) + "\n", encoding="utf-8")
    return info


def read_config(path: Path) -> dict[str, Any]:
    """A JSON config file that must hold an object; ModelError otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"config {path} is not a JSON object")
    return data


def _expected_shapes(component: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the model `config` describes, from a model on the meta device."""
    return {k: tuple(v.shape) for k, v in build_meta(component, config).state_dict().items()}


def build_meta(component: str, config: dict[str, Any]) -> Any:
    """The module for one component, without memory for its weights."""
    import torch

    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel

        fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",)}
        return CLIPTextModel(CLIPTextConfig(**fields))


def _gather(
    tensors: TensorFile,
    expected: dict[str, tuple[int, ...]],
    source_name: Callable[[str], str],
    target: Any,
    arch: str,
    what: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, shape in expected.items():
        name = source_name(key)
        if name not in tensors:
            raise ModelError(f"{tensors.path}: the {what} does not match {arch}: it has no tensor {name}")
        tensor = tensors.get(name)
        if tuple(tensor.shape) != shape:
            # LDM's VAE attention uses 1x1 convolutions where diffusers has linear layers.
            if tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1) and tuple(tensor.shape[:2]) == shape:
                tensor = tensor[:, :, 0, 0]
            else:
                raise ModelError(
                    f"{tensors.path}: the {what} does not match {arch}: {name} has shape "
                    f"{list(tensor.shape)}, expected {list(shape)}"
                )
        out[key] = _cast(tensor, target)
    return out


def _cast(tensor: Any, target: Any) -> Any:
    return (tensor.to(target) if tensor.is_floating_point() else tensor).contiguous()


def _refuse_leftovers(tensors: TensorFile, prefix: str, used: set[str], arch: str, path: Path) -> None:
    extra = sorted(k for k in tensors.keys() if k.startswith(prefix) and k not in used)
    if extra:
        raise ModelError(
            f"{path}: the UNet has {len(extra)} tensors {arch} does not have (e.g. {extra[0]}); "
            "for a non-standard architecture pass --config-dir with its diffusers configs"
        )


def _open_clip_to_diffusers(
    tensors: TensorFile, expected: dict[str, tuple[int, ...]], target: Any, arch: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fused: dict[str, Any] = {}
    for key, shape in expected.items():
        name, part = keymaps.open_clip_layer(key)
        name = keymaps.OPEN_CLIP_PREFIX + name
        if name not in tensors:
            raise ModelError(f"{tensors.path}: the text encoder does not match {arch}: it has no tensor {name}")
        if part is None:
            tensor = tensors.get(name)
        else:
            if name not in fused:
                fused[name] = tensors.get(name)
            tensor = fused[name].chunk(3, dim=0)["qkv".index(part)]
        if tuple(tensor.shape) != shape:
            raise ModelError(
                f"{tensors.path}: the text encoder does not match {arch}: {name} has shape "
                f"{list(tensor.shape)}, expected {list(shape)}"
            )
        out[key] = _cast(tensor, target)
    return out


def _save_component(folder: Path, state: dict[str, Any], config: dict[str, Any], filename: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(state, str(folder / filename), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- tokenizer


# ----------------------------------------------------------------------------- the inverse


