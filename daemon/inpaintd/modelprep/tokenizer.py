"""CLIP tokenizer folders for converted single files: the vocabulary a checkpoint does not carry.

A single-file checkpoint holds no tokenizer. `write_tokenizer` takes CLIP's vocab.json and
merges.txt from `--tokenizer DIR` or the local Hugging Face cache; the random-weight models
(demo, tests) use the byte-level vocabulary built here in code (`write_byte_tokenizer`),
recognised by its size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.errors import ModelError


def write_tokenizer(folder: Path, configs: Path, checkpoint: Path, vocab_size: int | None,
                    tokenizer_dir: Path | None) -> None:
    """vocab.json + merges.txt for `checkpoint` (whose text encoder has `vocab_size` rows) from
    wherever they are available offline; the tokenizer configs from `configs`."""
    vocab_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if vocab_dir is None and vocab_size == BYTE_VOCAB_SIZE:
        write_byte_tokenizer(folder)
        return
    if vocab_dir is None:
        vocab_dir = find_cached_tokenizer(vocab_size)
    if vocab_dir is None:
        raise ModelError(
            f"{checkpoint}: a checkpoint does not contain its tokenizer's vocabulary (CLIP's vocab.json and "
            "merges.txt) and inpaintd found none offline; pass --tokenizer DIR with the tokenizer/ folder "
            "of any SD-1.5 or SD-2 diffusers download (they share CLIP's BPE vocabulary)"
        )
    for name in ("vocab.json", "merges.txt"):
        if not (vocab_dir / name).is_file():
            raise ModelError(f"tokenizer folder {vocab_dir} has no {name}")
    try:
        size = len(json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {vocab_dir / 'vocab.json'}: {exc}") from exc
    if vocab_size is not None and size > vocab_size:
        raise ModelError(
            f"tokenizer {vocab_dir} has {size} tokens but the checkpoint's text encoder only {vocab_size}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(vocab_dir / name, folder / name)
    for item in sorted(configs.iterdir()):
        # The configs (special tokens, padding: "!" for SD-2) come from the architecture's
        # folder; the vocabulary stays the one chosen above.
        if item.is_file() and item.name not in ("vocab.json", "merges.txt", "tokenizer.json"):
            shutil.copy2(item, folder / item.name)


def find_cached_tokenizer(vocab_size: int | None) -> Path | None:
    """A CLIP tokenizer folder already in the local Hugging Face cache, or None."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    if not hub.is_dir():
        return None
    patterns = (
        "models--openai--clip-vit-large-patch14/snapshots/*/vocab.json",
        "models--*stable-diffusion*/snapshots/*/tokenizer/vocab.json",
    )
    for pattern in patterns:
        for vocab in sorted(hub.glob(pattern)):
            if (vocab.parent / "merges.txt").is_file():
                try:
                    size = len(json.loads(vocab.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    continue
                if vocab_size is None or size <= vocab_size:
                    return vocab.parent
    return None


# The byte-level vocabulary of the random-weight models: recognised by its size, built in code.
BYTE_VOCAB_SIZE = 514

# CLIP's special tokens; like the real vocabulary they come last.
BOS = "<|startoftext|>"


EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tokenizer_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level CLIP vocabulary: every byte alone and as a word end, then BOS/EOS. No merges.

    Any text tokenizes (one token per byte), so prompts of any language work; the ids are
    always below len(vocab) == 514.
    """
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in symbols:
        vocab[sym] = len(vocab)
    for sym in symbols:
        vocab[sym + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, []


def write_byte_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs CLIPTokenizer loads from."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
