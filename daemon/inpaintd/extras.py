"""What prepare-model bakes into a prepared folder besides the model: a swapped VAE, embeddings.

Both are written into the folder's own safetensors in the runtime dtype, so the daemon still
maps its weights without copying and never loads a second file at run time:

- `apply_vae` replaces vae/ with a VAE from a single file (original LDM layout, with or
  without ``first_stage_model.``, or diffusers names) or a diffusers AutoencoderKL folder.
  It must be a drop-in: the same tensors and shapes as the model's VAE.
- `apply_embeddings` adds textual-inversion tokens (A1111's ``emb_params`` files and
  diffusers' ``{"<token>": vectors}`` files) to the tokenizer and their vectors as new rows of
  the text encoder's token embedding. A vector count n > 1 becomes the tokens TOKEN, TOKEN_1,
  ..., TOKEN_{n-1}, which diffusers' pipeline expands a prompt's TOKEN into (the same
  convention as its load_textual_inversion), so prompts just say TOKEN.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoints, keymaps, models
from .errors import ModelError

_SDXL_KEYS = {"clip_l", "clip_g"}


@dataclass(frozen=True)
class EmbeddingSpec:
    """One --embedding argument: a file and the token prompts use (None: from the file)."""

    path: Path
    token: str | None = None

    @classmethod
    def parse(cls, text: str) -> "EmbeddingSpec":
        """FILE or FILE:TOKEN (a colon inside an existing file's name is part of the name)."""
        if Path(text).exists() or ":" not in text:
            return cls(Path(text))
        path, token = text.rsplit(":", 1)
        if not token:
            raise ModelError(f"--embedding {text}: empty token after ':'")
        return cls(Path(path), token)


# ----------------------------------------------------------------------------- VAE

DRAFT_DECODER = "vae_tiny"  # the prepared folder's opt-in AutoencoderTiny (TAESD) for decoder: draft


def apply_draft_decoder(model: Path, source: Path, dtype: str) -> dict[str, Any]:
    """Add `source` (a diffusers AutoencoderTiny folder, e.g. TAESD for SD-1.x) as `model`/vae_tiny.

    Not listed in model_index.json, so diffusers never loads it as part of the pipeline; the
    engine loads it only for jobs that ask for ``decoder: draft``.
    """
    import torch
    from safetensors.torch import save_file

    source = Path(source)
    if not (source / "config.json").is_file():
        raise ModelError(f"--draft-decoder {source}: expected a diffusers AutoencoderTiny folder (config.json + safetensors)")
    config = checkpoints.read_config(source / "config.json")
    if config.get("_class_name") != "AutoencoderTiny":
        raise ModelError(f"--draft-decoder {source}: a {config.get('_class_name')}, not an AutoencoderTiny")
    vae_config = json.loads((Path(model) / "vae" / "config.json").read_text(encoding="utf-8"))
    if int(config.get("latent_channels", 4)) != int(vae_config.get("latent_channels", 4)):
        raise ModelError(f"--draft-decoder {source}: {config.get('latent_channels')} latent channels, the model's VAE "
                         f"{vae_config.get('latent_channels', 4)}")
    state = _folder_state(source, allow_pickle=False)
    expected = {k: tuple(v.shape) for k, v in _tiny_meta(config).state_dict().items()}
    if set(state) != set(expected) or any(tuple(state[k].shape) != s for k, s in expected.items()):
        raise ModelError(f"--draft-decoder {source}: its weights do not match its config.json")
    target = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    folder = Path(model) / DRAFT_DECODER
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return {"source": str(source.resolve()), "format": "diffusers-folder", "sha256": _source_hash(source),
            "quality": "draft: TAESD-class decoder, lower fidelity than the model's VAE"}


def _tiny_meta(config: dict[str, Any]) -> Any:
    import torch
    from diffusers import AutoencoderTiny

    with torch.device("meta"):
        return AutoencoderTiny.from_config(config)



def apply_vae(model: Path, source: Path, dtype: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Replace `model`/vae with `source`; return what the manifest records about it."""
    import torch
    from safetensors.torch import save_file

    model, source = Path(model), Path(source)
    target = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    config = json.loads((model / "vae" / "config.json").read_text(encoding="utf-8"))
    if source.is_dir() and (source / "model_index.json").is_file():
        source = source / "vae"  # a whole diffusers model: take its VAE
    if source.is_dir():
        layout_config = checkpoints.read_config(source / "config.json")
        if layout_config.get("_class_name") not in (None, "AutoencoderKL"):
            raise ModelError(f"--vae {source}: a {layout_config.get('_class_name')}, not an AutoencoderKL")
        state = _folder_state(source, allow_pickle=allow_pickle)
        config = layout_config
        fmt = "diffusers-folder"
    elif source.is_file():
        state, fmt = _vae_file_state(source, config, allow_pickle=allow_pickle)
    else:
        raise ModelError(f"--vae {source} does not exist")
    expected = {k: tuple(v.shape) for k, v in checkpoints.build_meta("vae", config).state_dict().items()}
    current = _shapes(model / "vae")
    if expected != current:
        raise ModelError(f"--vae {source}: its architecture differs from the model's VAE; it must be a drop-in replacement")
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        example = f"no {missing[0]}" if missing else f"an extra {sorted(set(state) - set(expected))[0]}"
        raise ModelError(f"--vae {source}: not a complete VAE for this model (e.g. {example})")
    out: dict[str, Any] = {}
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise ModelError(f"--vae {source}: {key} has shape {list(tensor.shape)}, the model's VAE {list(shape)}")
        out[key] = (tensor.to(target) if tensor.is_floating_point() else tensor).contiguous()
    folder = model / "vae"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(out, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return {"source": str(source.resolve()), "format": fmt, "sha256": _source_hash(source)}


def _vae_file_state(path: Path, config: dict[str, Any], *, allow_pickle: bool) -> tuple[dict[str, Any], str]:
    tensors = checkpoints.TensorFile(path, allow_pickle=allow_pickle)
    keys = tensors.keys()
    expected = checkpoints.build_meta("vae", config).state_dict()
    if "encoder.conv_in.weight" in tensors and any(k.startswith("encoder.down_blocks.") for k in keys):
        return {k: tensors.get(k) for k in expected if k in tensors}, "diffusers-file"
    prefix = keymaps.VAE_PREFIX if any(k.startswith(keymaps.VAE_PREFIX) for k in keys) else ""
    if prefix + "encoder.conv_in.weight" not in tensors:
        problem = checkpoints.what_is_it(keys) or "has no VAE encoder"
        raise ModelError(f"--vae {path}: not a VAE file ({problem.removeprefix('is ')})")
    state: dict[str, Any] = {}
    for key, meta in expected.items():
        name = prefix + keymaps.vae_to_ldm(key, config)
        if name in tensors:
            tensor = tensors.get(name)
            if tensor.dim() == 4 and meta.dim() == 2 and tuple(tensor.shape[2:]) == (1, 1):
                tensor = tensor[:, :, 0, 0]  # LDM's attention uses 1x1 convolutions
            state[key] = tensor
    return state, "original"


# ----------------------------------------------------------------------------- embeddings


def load_embedding(spec: EmbeddingSpec, *, allow_pickle: bool = False) -> tuple[str, Any, str]:
    """(token, vectors [n, dim], format) of one textual-inversion file."""
    import torch

    path = spec.path
    if not path.is_file():
        raise ModelError(f"--embedding {path} does not exist")
    if path.suffix in checkpoints.PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"--embedding {path} is a pickle file; loading a pickle can run code. Use the .safetensors "
                "version of the embedding, or pass --allow-pickle if you trust the file"
            )
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"--embedding {path} is not readable: {type(exc).__name__}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
            data = {"emb_params": next(iter(data["string_to_param"].values()))}
    else:
        tensors = checkpoints.TensorFile(path)
        data = {k: tensors.get(k) for k in tensors.keys()}
    if not isinstance(data, dict) or not data:
        raise ModelError(f"--embedding {path} holds no embedding")
    keys = set(data)
    if keys & _SDXL_KEYS:
        raise ModelError(f"--embedding {path} is an SDXL embedding (clip_l/clip_g); inpaintd models are SD-1.5/SD-2")
    if "emb_params" in data:
        vectors, fmt, token = data["emb_params"], "a1111", spec.token or path.stem
    elif len(data) == 1:
        (name, vectors), fmt = next(iter(data.items())), "diffusers"
        token = spec.token or name
    else:
        raise ModelError(
            f"--embedding {path} is not a textual-inversion embedding (expected emb_params or one "
            f"token tensor, found {len(data)} tensors such as {sorted(data)[0]})"
        )
    if not hasattr(vectors, "dim") or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        raise ModelError(f"--embedding {path}: the vectors are not a 1-D or 2-D float tensor")
    if vectors.dim() == 1:
        vectors = vectors[None, :]
    if not token.strip() or any(c.isspace() for c in token):
        raise ModelError(f"--embedding {path}: token {token!r} must be one word without spaces")
    return token, vectors, fmt


def apply_embeddings(
    model: Path, specs: list[EmbeddingSpec], dtype: str, *, allow_pickle: bool = False
) -> list[dict[str, Any]]:
    """Add every embedding's tokens and vectors to `model`; return the manifest's records."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    model = Path(model)
    target = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"), local_files_only=True)
    weights_file = _text_weights_file(model / "text_encoder")
    state = load_file(str(weights_file))
    key = next(k for k in state if keymaps.text_canonical(k) == "text_model.embeddings.token_embedding.weight")
    table = state[key]
    if len(tokenizer) != table.shape[0]:
        raise ModelError(
            f"{model}: the tokenizer has {len(tokenizer)} tokens but the text encoder {table.shape[0]} rows; "
            "embeddings cannot be added to a model whose two disagree"
        )
    records: list[dict[str, Any]] = []
    rows = [table]
    for spec in specs:
        token, vectors, fmt = load_embedding(spec, allow_pickle=allow_pickle)
        if vectors.shape[1] != table.shape[1]:
            made_for = {768: " (SD-1.x)", 1024: " (SD-2.x)"}.get(int(vectors.shape[1]), "")
            raise ModelError(
                f"--embedding {spec.path}: its vectors are {vectors.shape[1]} wide{made_for}, this model's text "
                f"encoder {table.shape[1]}; it was made for another model family"
            )
        tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
        clash = [t for t in tokens if t in tokenizer.get_vocab()]
        if clash:
            raise ModelError(
                f"--embedding {spec.path}: token {clash[0]!r} already exists in the tokenizer; "
                "choose another with FILE:TOKEN"
            )
        added = tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise ModelError(f"--embedding {spec.path}: the tokenizer accepted {added} of the tokens {tokens}")
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(sum(r.shape[0] for r in rows), sum(r.shape[0] for r in rows) + len(tokens))):
            raise ModelError(f"--embedding {spec.path}: the tokenizer gave unexpected ids {ids}")
        rows.append(vectors.to(target))
        records.append(
            {
                "token": token,
                "tokens": tokens,
                "vectors": int(vectors.shape[0]),
                "format": fmt,
                "source": str(spec.path.resolve()),
                "sha256": models.sha256_file(spec.path),
            }
        )
    state[key] = torch.cat(rows, dim=0).contiguous()
    save_file(state, str(weights_file), metadata={"format": "pt"})
    config_path = model / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["vocab_size"] = int(state[key].shape[0])
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer_dir = model / "tokenizer"
    staging = model / ".tokenizer-new"
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(tokenizer_dir)
    staging.rename(tokenizer_dir)
    return records


# ----------------------------------------------------------------------------- helpers


def _text_weights_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ModelError(f"{folder}: expected one text encoder weight file, found {len(files)}")
    return files[0]


def _folder_state(folder: Path, *, allow_pickle: bool) -> dict[str, Any]:
    fmt, variant = models._component_weights(folder, allow_pickle=allow_pickle)
    return models.read_state(folder, fmt, variant)


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in models.read_safetensors_header(f).items():
            shapes[name] = tuple(int(d) for d in info["shape"])
    return shapes


def _source_hash(path: Path) -> str:
    if path.is_file():
        return models.sha256_file(path)
    files = {p.relative_to(path).as_posix(): models.sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return models.manifest_id(files)
