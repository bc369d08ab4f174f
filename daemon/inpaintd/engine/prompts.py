"""Prompts and textual-inversion tokens: how far diffusers' prompt conversion expands a prompt.

A multi-vector embedding is stored as TOKEN, TOKEN_1 ... TOKEN_{n-1}; diffusers rewrites each
TOKEN in a prompt into all n of them in a loop that runs outside any denoising step, so the
engine bounds the expansion before it starts.
"""

from __future__ import annotations

from typing import Any

# A prompt may name an embedding's tokens a few times over (CLIP reads 77 tokens in all).
MAX_EXPANDED_EXTRA_TOKENS = 4 * 77


def multi_vector_tokens(added: Any) -> dict[str, int]:
    """Textual-inversion tokens stored as TOKEN, TOKEN_1 ... TOKEN_{n-1} (prepare-model's layout,
    diffusers' load_textual_inversion's too): TOKEN -> n, for n > 1."""
    names = set(added)
    counts: dict[str, int] = {}
    for token in names:
        n = 1
        while f"{token}_{n}" in names:
            n += 1
        if n > 1:
            counts[token] = n
    return counts


def expanded_extra_tokens(prompt: str, tokens: dict[str, int]) -> int:
    """How many tokens diffusers' prompt conversion adds (each TOKEN becomes n of them); an upper bound."""
    return sum(prompt.count(token) * (n - 1) for token, n in tokens.items())
