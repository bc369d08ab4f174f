"""What a job asks for: the prompt file's options merged over the configured defaults.

A prompt arrives as NAME.txt (the prompt, UTF-8), or NAME.yaml / NAME.json (a mapping with
`prompt` and per-job overrides). Overrides are checked against the same bounds as the config
file; unknown keys are rejected so a typo never silently does nothing.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..core import config as config_mod
from ..core import presets
from ..core.config import Config, LimitsConfig, RoiConfig
from ..core.errors import ConfigError, JobError
from ..core.jobs import InpaintParams, JobRequest
from ..core.quoting import quote, shorten

# Job files are a few options: anything deeper or bigger is refused before it is built.
MAX_NESTING = 8
MAX_NODES = 1_000

# Per-job key -> (dotted config key it is checked as, type)
_INFERENCE_KEYS: dict[str, tuple[str, Any]] = {
    "prompt": ("inference.prompt", str),
    "negative_prompt": ("inference.negative_prompt", str),
    "scheduler": ("inference.scheduler", str),
    "steps": ("inference.steps", int),
    "guidance": ("inference.guidance", float),
    "strength": ("inference.strength", float),
    "seed": ("inference.seed", int),
    "cfg_cutoff": ("inference.cfg_cutoff", float),
    "step_cache": ("inference.step_cache", int),
    "decoder": ("inference.decoder", str),
}
_ROI_KEYS: dict[str, tuple[str, Any]] = {
    "padding": ("roi.padding", int),
    "dilate": ("roi.dilate", int),
    "feather": ("roi.feather", int),
    "mask_threshold": ("roi.mask_threshold", int),
    "color_match": ("roi.color_match", bool),
}
_OUTPUT_KEYS: dict[str, tuple[str, Any]] = {
    "output_format": ("output.format", str),
}
JOB_OPTION_KEYS = tuple(sorted({**_INFERENCE_KEYS, **_ROI_KEYS, **_OUTPUT_KEYS}))


def load_job_options(path: Path | None, limits: LimitsConfig) -> dict[str, Any]:
    """Read a prompt file into a dict of raw options (validated later by build_request)."""
    if path is None:
        return {}
    text = _read_text(path, limits.max_prompt_bytes)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return {"prompt": text.strip()}
    kind = "JSON" if suffix == ".json" else "YAML"
    try:
        if suffix == ".json":
            _check_json_shape(text, path.name)
            data = json.loads(text)
        else:
            _check_yaml_shape(text, path.name)
            data = yaml.safe_load(text)
    except JobError:
        raise
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: JSON errors, 10k-digit ints
        raise JobError("prompt_invalid", f"{path.name} is not valid {kind}: {shorten(_first_line(exc), 300)}") from exc
    if data is None:
        return {}
    if isinstance(data, str):  # a YAML file holding just the prompt
        return {"prompt": data.strip()}
    if not isinstance(data, dict):
        raise JobError("options_invalid", f"{path.name} must hold a mapping of options, not {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def build_request(
    name: str,
    image: Path,
    mask: Path | None,
    options: dict[str, Any],
    config: Config,
    draw_seed: Callable[[], int] = lambda: random.SystemRandom().randrange(2**32),
    model_defaults: Mapping[str, Any] | None = None,
) -> JobRequest:
    """Merge options over the config's and the model's defaults (presets.resolve), validate, fix the seed."""
    unknown = sorted(set(options) - set(JOB_OPTION_KEYS))
    if unknown:
        raise JobError(
            "options_invalid",
            f"unknown option {quote(unknown[0])}; allowed: {', '.join(JOB_OPTION_KEYS)}",
            {"key": shorten(unknown[0], 200)},
        )
    checked = {key: _check_option(key, value) for key, value in options.items()}

    defaults = config.inference
    seed = checked.get("seed", defaults.seed)
    values, sources = presets.resolve(checked, defaults, model_defaults or {})
    params = InpaintParams(
        prompt=checked.get("prompt", defaults.prompt),
        seed=draw_seed() if seed is None else seed,
        **values,
    )
    if int(params.steps * params.strength) < 1:
        # diffusers runs int(steps * strength) steps and refuses 0 of them.
        raise JobError(
            "options_invalid",
            f"steps x strength = {params.steps} x {params.strength:g} runs no denoising step; raise steps or strength",
            {"steps": params.steps, "strength": params.strength},
        )
    # The merged pair: the job, the config and the model's defaults may each supply one of them.
    problem = config_mod.scheduler_steps_problem(params.scheduler, params.steps)
    if problem:
        raise JobError(
            "options_invalid",
            f"{problem} (steps from the {sources['steps']}, scheduler from the {sources['scheduler']})",
            {"steps": params.steps, "scheduler": params.scheduler,
             "max_steps": config_mod.SCHEDULER_MAX_STEPS[params.scheduler],
             "sources": {"steps": sources["steps"], "scheduler": sources["scheduler"]}},
        )
    roi_overrides = {key: checked[key] for key in _ROI_KEYS if key in checked}
    return JobRequest(
        name=name,
        image=image,
        mask=mask,
        params=params,
        output_format=checked.get("output_format", config.output.format),
        roi_overrides=roi_overrides,
        sources=sources,
    )


def effective_roi(roi: RoiConfig, overrides: dict[str, Any]) -> RoiConfig:
    """The ROI settings for one job; overrides were validated by build_request."""
    from dataclasses import replace

    return replace(roi, **overrides)


def _check_option(key: str, value: Any) -> Any:
    dotted, kind = {**_INFERENCE_KEYS, **_ROI_KEYS, **_OUTPUT_KEYS}[key]
    if key == "seed" and value is None:
        return None
    try:
        return config_mod.check_field(dotted, value, kind)
    except ConfigError as exc:
        raise JobError("options_invalid", f"option {key!r} {exc.message}", {"key": key}) from exc


def _read_text(path: Path, max_bytes: int) -> str:
    # O_NONBLOCK + fstat: a FIFO planted under a prompt name must not block the daemon.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JobError("job_unsafe", f"{path.name} is a symbolic link; inpaintd never follows links") from exc
        raise JobError("prompt_invalid", f"cannot open {path.name}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JobError("job_unsafe", f"{path.name} is not a regular file")
        if info.st_size > max_bytes:
            raise JobError(
                "prompt_invalid",
                f"{path.name} is {info.st_size} bytes; the limit is {max_bytes} (limits.max_prompt_bytes)",
            )
        raw = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobError("prompt_invalid", f"{path.name} is not UTF-8 text (byte {exc.start})") from exc


def _check_yaml_shape(text: str, name: str) -> None:
    """Refuse anchors/aliases (a few bytes expand to gigabytes), explicit tags, deep nesting and
    more than MAX_NODES nodes, from the parser's events, before anything is constructed."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise JobError("prompt_invalid", f"{name}: YAML anchors and aliases (&, *) are not allowed in job files")
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            nodes += 1
            implicit = event.implicit if isinstance(event, yaml.CollectionStartEvent) else any(event.implicit)
            if event.tag not in (None, "!") and not implicit:
                raise JobError("prompt_invalid", f"{name}: YAML tags ({quote(event.tag, 60)}) are not allowed in job files")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if depth > MAX_NESTING or nodes > MAX_NODES:
            raise JobError("prompt_invalid", f"{name}: a job file holds at most {MAX_NODES} values nested "
                                             f"{MAX_NESTING} deep")


def _check_json_shape(text: str, name: str) -> None:
    """Nesting depth of a JSON text, counted outside strings, before the parser recurses into it."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise JobError("prompt_invalid", f"{name}: a job file nests at most {MAX_NESTING} deep")
        elif char in "]}":
            depth -= 1


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
