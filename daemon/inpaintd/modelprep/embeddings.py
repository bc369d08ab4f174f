"""`prepare-model --embedding`: textual-inversion tokens baked into the tokenizer and text encoder.

Written into the folder's own safetensors in the runtime dtype, so the daemon still maps its
weights without copying and never loads a second file at run time. `apply_embeddings` adds textual-inversion tokens (A1111's ``emb_params`` files and
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

from ..core.digest import sha256_file
from ..core.errors import ModelError
from ..weights.folder import PICKLE_SUFFIXES
from . import checkpoints, keymaps

_SDXL_KEYS = {"clip_l", "clip_g"}
# CLIP reads 77 tokens, two of them start and end: no prompt can use a longer embedding.
MAX_VECTORS = 75


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


# ----------------------------------------------------------------------------- embeddings


def load_embedding(spec: EmbeddingSpec, *, allow_pickle: bool = False) -> tuple[str, Any, str]:
    """(token, vectors [n, dim], format) of one textual-inversion file."""
    import torch

    path = spec.path
    if not path.is_file():
        raise ModelError(f"--embedding {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
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
    if vectors.shape[0] > MAX_VECTORS:
        raise ModelError(f"--embedding {path}: {vectors.shape[0]} vectors; a prompt holds at most {MAX_VECTORS} tokens "
                         "(CLIP's 77 less its start and end), so such an embedding could never be used whole")
    if not bool(vectors.isfinite().all()):
        raise ModelError(f"--embedding {path}: its vectors hold NaN or infinite values")
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
    target = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
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
                "sha256": sha256_file(spec.path, nofollow=False).sha256,
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


