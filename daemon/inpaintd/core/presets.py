"""A prepared model's recommended inference defaults (manifest "defaults") and the known presets.

A job's setting comes from the first of: its own job file, the config file (only keys the
config sets), the model's defaults, then BUILTIN (config.BUILTIN_INFERENCE). So a model fused
with LCM-LoRA paints with the LCM scheduler at 4 steps without any config change, and an
operator or a job can still ask for anything else. Pure data and checks; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .config import BUILTIN_INFERENCE, InferenceConfig, check_field
from .errors import ConfigError, ModelError

# The published few-step LoRAs' own recommendations (their model cards; see README "Fast path"):
# - lcm: latent-consistency/lcm-lora-sdv1-5, "2 - 8 steps ... either disable guidance_scale or
#   use values between 1.0 and 2.0", with diffusers' LCMScheduler.
# - tcd: h1t/TCD-SD15, 2-8 steps with diffusers' TCDScheduler, guidance disabled (the inpainting
#   pipeline passes eta 0, so TCD's gamma is 0: its deterministic setting, not the card's 0.3).
PRESETS: dict[str, dict[str, Any]] = {
    "lcm": {"scheduler": "lcm", "steps": 4, "guidance": 1.0},
    "tcd": {"scheduler": "tcd", "steps": 4, "guidance": 1.0},
}
MODEL_DEFAULT_KEYS = tuple(BUILTIN_INFERENCE)


def check_defaults(defaults: Mapping[str, Any], *, has_draft_decoder: bool = True) -> dict[str, Any]:
    """Validated defaults (each value checked as its inference.KEY is); ModelError names a bad one.

    decoder=draft is refused for a model without a draft decoder: every job would fail.
    """
    checked: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in MODEL_DEFAULT_KEYS:
            raise ModelError(f"--defaults {key}: not a model default (allowed: {', '.join(MODEL_DEFAULT_KEYS)})")
        try:
            checked[key] = check_field(f"inference.{key}", value, type(BUILTIN_INFERENCE[key]))
        except ConfigError as exc:
            raise ModelError(f"--defaults {key}={value!r}: {exc}") from None
    if checked.get("decoder") == "draft" and not has_draft_decoder:
        raise ModelError("--defaults decoder=draft needs a draft decoder (prepare-model --draft-decoder DIR)")
    steps = checked.get("steps", BUILTIN_INFERENCE["steps"])
    strength = checked.get("strength", BUILTIN_INFERENCE["strength"])
    if int(steps * strength) < 1:
        raise ModelError(f"--defaults: steps x strength ({steps} x {strength:g}) makes no denoising step")
    return checked


def parse_defaults(preset: str | None, pairs: Iterable[str]) -> dict[str, Any]:
    """--preset NAME then --defaults KEY=VALUE ... (later wins), checked (prepare_model checks the
    result again against the model); numbers and booleans read as YAML scalars."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ModelError(f"--preset {preset}: unknown (known: {', '.join(sorted(PRESETS))})")
        merged.update(PRESETS[preset])
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"--defaults {pair!r}: expected KEY=VALUE")
        key = key.strip()
        if isinstance(BUILTIN_INFERENCE.get(key), str):
            value: Any = raw  # text stays text: negative_prompt=no is the word "no"
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        merged[key] = value
    return check_defaults(merged)


def resolve(
    job: Mapping[str, Any], configured: InferenceConfig, model: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """({key: value}, {key: "job" | "config" | "model" | "builtin"}) for every BUILTIN key."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, builtin in BUILTIN_INFERENCE.items():
        if key in job:
            values[key], sources[key] = job[key], "job"
        elif getattr(configured, key) is not None:
            values[key], sources[key] = getattr(configured, key), "config"
        elif key in model:
            values[key], sources[key] = model[key], "model"
        else:
            values[key], sources[key] = builtin, "builtin"
    return values, sources


__all__ = ["PRESETS", "MODEL_DEFAULT_KEYS", "check_defaults", "parse_defaults", "resolve"]
