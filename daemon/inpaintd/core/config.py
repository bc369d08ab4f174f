"""Configuration: frozen dataclasses with every default in one place, and one loader.

`load_config(path)` reads YAML (safe loader only), rejects unknown keys, checks types and
bounds, and raises ConfigError naming the dotted key. `config_from_dict` does the same for
an in-memory mapping (tests, per-job overrides reuse the field checks).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .quoting import quote, shorten

SCHEDULERS = (
    "dpmpp_2m_karras",
    "dpmpp_2m",
    "euler_a",
    "euler",
    "ddim",
    "unipc",
    "lcm",
    "tcd",
    "pndm",
)
# The most steps a scheduler accepts. LCM and TCD sample a subset of the schedule they were
# distilled on (diffusers' `original_inference_steps`, 50 unless a model's scheduler config says
# otherwise) and their set_timesteps raises for more. The pipeline calls set_timesteps with the
# full step count and applies strength afterwards, so the bound is on steps, not steps x strength.
SCHEDULER_MAX_STEPS: dict[str, int] = {"lcm": 50, "tcd": 50}

OUTPUT_FORMATS = ("same", "png", "jpg", "webp")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inpaintd"


@dataclass(frozen=True)
class ModelConfig:
    # None means the embedded default: a tiny random-weight model generated on first use.
    path: Path | None = None
    dtype: str = "auto"  # auto | bf16 | fp32   (the compute dtype)
    # Whether the CPU's native bf16 counts: auto reads /proc/cpuinfo (and INPAINTD_CPU_BF16=0|1,
    # and a oneDNN ISA cap below bf16); ignore makes dtype auto compute fp32 on any CPU.
    cpu_bf16: str = "auto"  # auto | use | ignore
    # The form the folder's weights take when they are not already the compute dtype
    # (engine/weightpolicy.py): auto = cache for bf16 compute, upcast for fp32 from 16-bit files.
    weights: str = "auto"  # auto | files | cache | upcast
    threads: int = 0  # 0 = number of physical cores
    allow_pickle: bool = False  # .bin/.ckpt run code when loaded; off unless the operator says so
    attention_slicing: str = "auto"  # auto | on | off
    vae_tiling: str = "auto"  # auto | on | off
    vae_tiling_min_side: int = 1024  # auto: tile the VAE only when a working side reaches this
    compile: str = "off"  # off | inductor
    # Activations in channels-last layout (a pre-hook on the UNet and VAE; weights untouched, so
    # they stay memory-mapped). Measured: VAE decode 5.1 s -> 1.9 s at 512x512 in bf16.
    channels_last: bool = True
    # The UNet's and VAE's conv weights in channels-last order too, as views of a cache file
    # written once under cache_dir (layout.py): no copy, still file-backed. Measured (AMX, UNet
    # call, BENCHMARKS.md 9.4): the fastest of the three layouts. auto and on: from the cache
    # (auto is the older name); off: in the files' order.
    channels_last_weights: str = "auto"  # auto | on | off
    # Weight-only int8 UNet (half the bytes of bf16, cached on disk and mmapped). auto: on when
    # the memory this process may use (cgroup MemoryMax/MemoryHigh, else RAM) is below
    # unet_int8_below_gib; a bf16 SD-1.5 UNet alone is 1.6 GiB. See BENCHMARKS.md.
    unet_int8: str = "auto"  # auto | on | off
    unet_int8_below_gib: float = 3.0
    # Give glibc's free heap pages back to the kernel before and after each VAE pass and after each job.
    malloc_trim: bool = True
    # After encoding a new prompt (embeddings are cached), drop the text encoder's mmapped
    # weight pages; they come back from the file when the next new prompt arrives.
    release_text_encoder: bool = True
    text_embedding_cache: int = 16  # prompts kept encoded (LRU)
    cache_dir: Path = field(default_factory=default_cache_dir)


# What a job gets for a setting that neither its job file, the config nor the model's manifest
# sets (presets.resolve). In InferenceConfig these keys are None until the config sets them.
BUILTIN_INFERENCE: dict[str, Any] = {
    "negative_prompt": "",
    "scheduler": "dpmpp_2m_karras",
    "steps": 20,
    "guidance": 7.5,  # <= 1 runs without classifier-free guidance: the UNet at batch 1
    "strength": 1.0,
    # Drop classifier-free guidance after this fraction of the steps (1.0: never), as diffusers'
    # SDCFGCutoffCallback does; the later steps run the UNet at batch 1.
    "cfg_cutoff": 1.0,
    # DeepCache: the deep UNet features computed in full every N steps, reused in between (1: off).
    "step_cache": 1,
    # "draft": decode with the model's AutoencoderTiny (prepare-model --draft-decoder): much
    # faster, visibly lower fidelity than the model's own VAE.
    "decoder": "full",
}


@dataclass(frozen=True)
class InferenceConfig:
    """Defaults for jobs. None: not set here (the model's manifest default, else BUILTIN_INFERENCE)."""

    prompt: str = ""
    negative_prompt: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    seed: int | None = None  # None: a fresh random seed per job, always reported
    cfg_cutoff: float | None = None
    step_cache: int | None = None
    decoder: str | None = None


@dataclass(frozen=True)
class RoiConfig:
    mask_threshold: int = 127  # mask pixels above this are repainted
    dilate: int = 8  # px the mask grows before anything else
    feather: int = 8  # px of soft edge when pasting back
    padding: int = 32  # context px around a region's mask bbox
    merge_gap: int = 32  # regions whose context boxes are closer than this merge
    min_size: int = 512  # context box grows towards this side length (model's native size)
    max_size: int = 512  # working side cap; bigger boxes are downscaled to fit
    # Working long sides; short sides are k/8 of them (geometry.aspect_shapes), so a warmed or
    # compiled model sees few distinct shapes and no crop is stretched.
    bucket_sides: tuple[int, ...] = (256, 384, 512)
    # Match the painted patch's per-channel mean and spread to the original on the unmasked ring
    # around it before blending (color.py): corrects a model's colour shift. Opt-in.
    color_match: bool = False


@dataclass(frozen=True)
class PathsConfig:
    inbox: Path = Path("/var/lib/inpaintd/inbox")
    outbox: Path = Path("/var/lib/inpaintd/outbox")
    failed: Path = Path("/var/lib/inpaintd/failed")
    archive: Path = Path("/var/lib/inpaintd/archive")
    state: Path = Path("/var/lib/inpaintd/state")


@dataclass(frozen=True)
class WatchConfig:
    observer: str = "auto"  # auto | inotify | polling
    settle_seconds: float = 2.0  # no writes for this long before a file counts as complete
    poll_interval: float = 1.0
    incomplete_timeout: float = 600.0  # a job missing a part this long goes to failed
    # Client debris (dotfiles, *.part, Thumbs.db) unchanged this long goes to failed/ as not_a_job:
    # longer than incomplete_timeout because a paused upload looks the same until it resumes.
    abandoned_timeout: float = 86400.0
    rescan_interval: float = 60.0  # safety net full scan even when events flow


@dataclass(frozen=True)
class LimitsConfig:
    max_pixels: int = 50_000_000  # refused before decoding (decompression bomb guard)
    max_prompt_bytes: int = 65_536
    max_input_bytes: int = 256 * 1024 * 1024
    poison_after: int = 3  # a job that crashed the daemon this many times goes to failed
    # Bounds on the work one job may cause, so no drop can take the device for hours.
    max_regions: int = 16  # separate mask areas painted per job; more are merged, else mask_too_fragmented
    max_region_steps: int = 320  # regions x denoising steps per job; more is job_too_costly
    max_job_seconds: float = 1800.0  # wall-clock budget of one job's painting; 0 = no limit
    # A job held by a transient error (disk full, unwritable folder) is retried beside the queue
    # for this long, then fails with retries_exhausted, its inputs kept.
    hold_timeout: float = 86400.0
    # Claims take turns by owner (the uid that dropped the job; service/queues.py), so one
    # user's flood delays another user's next job by one job. false: one FIFO by arrival.
    fair_share: bool = True
    # Claimed-and-queued jobs per owner; the rest wait in the inbox (nothing fails). 0 = no cap.
    max_queued_per_owner: int = 0
    # The low-disk guard: while a folder the daemon writes has less free than either, no job is
    # claimed (they wait in the inbox) and it resumes by itself. Room for a few outputs and
    # failure records on a small card; 0 turns either check off.
    min_free_bytes: int = 256 * 1024 * 1024
    min_free_fraction: float = 0.02


@dataclass(frozen=True)
class OutputConfig:
    format: str = "same"  # same | png | jpg | webp
    jpeg_quality: int = 95
    after_success: str = "archive"  # archive | delete


@dataclass(frozen=True)
class ServiceConfig:
    shutdown_timeout: float = 30.0
    watchdog_from_steps: bool = True


@dataclass(frozen=True)
class FleetConfig:
    # Several devices on one shared folder (README "Several devices"): paths.state is then the
    # share's state root and each device keeps its state in paths.state/<device_id>/.
    enabled: bool = False
    device_id: str = ""  # "" = the first 12 characters of /etc/machine-id, else the host name
    lease_seconds: float = 60.0  # a device silent this long (server clock) is presumed dead
    heartbeat_seconds: float = 10.0
    prefetch: int = 1  # jobs a device claims ahead of the one it paints; the rest stay for the others
    # The share's root, where `inpaintd init-share` wrote .inpaintd-share; "" = the folder
    # holding all five paths. A device works only while that marker is there (the share is mounted).
    share: str = ""


@dataclass(frozen=True)
class RetentionConfig:
    """What is removed, oldest first, from outbox/, archive/ and failed/ (store/retention.py).

    Ages in days, sizes in bytes, 0 = no limit. The defaults keep a year unattended on a 32 GB
    card: together at most 13 GiB (outbox 8 + archive 4 + failed 1) beside the system, the
    model (2-4 GB) and its cache (1.3 GB); results stay in the outbox for 90 days, which is
    longer than anyone waits to collect them, and the inputs of successful jobs (archive, the
    least useful copy: the result's sidecar names them with their sha256) go first, after 30.
    """

    enabled: bool = True
    min_age_days: float = 1.0  # nothing younger is ever removed, whatever a budget says
    interval_seconds: float = 600.0  # how often the folders are looked at (between jobs)
    outbox_max_days: float = 90.0
    outbox_max_bytes: int = 8 * 1024**3
    archive_max_days: float = 30.0
    archive_max_bytes: int = 4 * 1024**3
    failed_max_days: float = 90.0
    failed_max_bytes: int = 1024**3


@dataclass(frozen=True)
class MetricsConfig:
    # A node_exporter textfile-collector file (*.prom), rewritten atomically; null = none.
    textfile: Path | None = None
    interval_seconds: float = 5.0  # rewritten at most this often


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"  # auto | console | json | journald
    level: str = "info"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def folders(self) -> dict[str, Path]:
        """Our folders by the name errors about them use (boundary.classify)."""
        paths = self.paths
        return {"inbox": paths.inbox, "outbox": paths.outbox, "failed": paths.failed, "archive": paths.archive,
                "state": paths.state}


# Bounds and choices, checked by _check. Keys are dotted paths.
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "bf16", "fp32"),
    "model.cpu_bf16": ("auto", "use", "ignore"),
    "model.weights": ("auto", "files", "cache", "upcast"),
    "model.attention_slicing": ("auto", "on", "off"),
    "model.vae_tiling": ("auto", "on", "off"),
    "model.compile": ("off", "inductor"),
    "model.unet_int8": ("auto", "on", "off"),
    "model.channels_last_weights": ("auto", "on", "off"),
    "inference.scheduler": SCHEDULERS,
    "inference.decoder": ("full", "draft"),
    "watch.observer": ("auto", "inotify", "polling"),
    "output.format": OUTPUT_FORMATS,
    "output.after_success": ("archive", "delete"),
    "logging.format": ("auto", "console", "json", "journald"),
    "logging.level": ("debug", "info", "warning", "error"),
}
_RANGES: dict[str, tuple[float, float]] = {
    "model.threads": (0, 256),
    "model.vae_tiling_min_side": (64, 16384),
    "model.text_embedding_cache": (0, 4096),
    "model.unet_int8_below_gib": (0.0, 1024.0),
    "inference.steps": (1, 150),
    "inference.guidance": (0.0, 30.0),
    "inference.strength": (0.01, 1.0),
    "inference.seed": (0, 2**32 - 1),
    "inference.cfg_cutoff": (0.0, 1.0),
    "inference.step_cache": (1, 10),
    "roi.mask_threshold": (0, 254),
    "roi.dilate": (0, 256),
    "roi.feather": (0, 256),
    "roi.padding": (0, 4096),
    "roi.merge_gap": (0, 4096),
    "roi.min_size": (64, 4096),
    "roi.max_size": (64, 4096),
    "watch.settle_seconds": (0.0, 3600.0),
    "watch.poll_interval": (0.05, 3600.0),
    "watch.incomplete_timeout": (1.0, 7 * 86400.0),
    "watch.abandoned_timeout": (1.0, 365 * 86400.0),
    "watch.rescan_interval": (1.0, 86400.0),
    "limits.max_pixels": (1, 2**31),
    "limits.max_prompt_bytes": (1, 16 * 1024 * 1024),
    "limits.max_input_bytes": (1, 2**40),
    "limits.poison_after": (1, 100),
    "limits.max_regions": (1, 1024),
    "limits.max_region_steps": (1, 1_000_000),
    "limits.max_job_seconds": (0.0, 7 * 86400.0),
    "limits.hold_timeout": (1.0, 30 * 86400.0),
    "output.jpeg_quality": (1, 100),
    "service.shutdown_timeout": (1.0, 3600.0),
    "fleet.lease_seconds": (2.0, 86400.0),
    "fleet.heartbeat_seconds": (0.2, 3600.0),
    "fleet.prefetch": (0, 1000),
    "limits.max_queued_per_owner": (0, 1_000_000),
    "limits.min_free_bytes": (0, 2**50),
    "limits.min_free_fraction": (0.0, 0.5),
    "retention.min_age_days": (0.0, 3650.0),
    "retention.interval_seconds": (1.0, 86400.0),
    "retention.outbox_max_days": (0.0, 36500.0),
    "retention.archive_max_days": (0.0, 36500.0),
    "retention.failed_max_days": (0.0, 36500.0),
    "retention.outbox_max_bytes": (0, 2**50),
    "retention.archive_max_bytes": (0, 2**50),
    "retention.failed_max_bytes": (0, 2**50),
    "metrics.interval_seconds": (0.5, 3600.0),
}


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a YAML config file; None gives the defaults."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    config = config_from_dict(data)
    return _resolve_relative_paths(config, Path(path).resolve().parent)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", "the config must be a mapping of sections")
    return _build(Config, data, prefix="")


def replace_section(config: Config, section: str, **changes: Any) -> Config:
    """A copy of config with some fields of one section changed, validated like a file."""
    current = dataclasses.asdict(getattr(config, section))
    current.update(changes)
    merged = dataclasses.asdict(config)
    merged[section] = current
    return config_from_dict(merged)


def check_field(key: str, value: Any, annotation: Any) -> Any:
    """Validate and normalise one value for a dotted key; used by per-job overrides too."""
    return _check(key, value, annotation)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(
            f"{prefix}{shorten(unknown[0], 120)}",
            f"unknown key in {where} (known: {', '.join(sorted(fields))})",
        )
    kwargs: dict[str, Any] = {}
    hints = _type_hints(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(key, "must be a mapping")
            kwargs[name] = _build(hint, value, prefix=f"{key}.")
        else:
            kwargs[name] = _check(key, value, hint)
    config = cls(**kwargs)
    # Checked here only when the config sets both (a model's defaults may supply either; a job
    # whose merged settings make no step fails with options_invalid).
    if cls is InferenceConfig and config.steps is not None and config.strength is not None:
        steps, strength = config.steps, config.strength
        if int(steps * strength) < 1:
            raise ConfigError(f"{prefix}strength", f"steps x strength ({steps} x {strength:g}) must "
                                                   "make at least one denoising step")
    if cls is InferenceConfig and config.steps is not None and config.scheduler is not None:
        problem = scheduler_steps_problem(config.scheduler, config.steps)
        if problem:
            raise ConfigError(f"{prefix}steps", problem)
    if cls is RoiConfig and config.min_size > config.max_size:
        raise ConfigError(f"{prefix}min_size", f"must be <= roi.max_size ({config.max_size})")
    if cls is FleetConfig and config.heartbeat_seconds * 3 > config.lease_seconds:
        raise ConfigError(f"{prefix}heartbeat_seconds", f"must be at most a third of fleet.lease_seconds "
                                                        f"({config.lease_seconds:g}) so a live device never looks dead")
    if cls is RoiConfig and min(config.bucket_sides) > config.max_size:
        raise ConfigError(f"{prefix}bucket_sides", f"needs a side <= roi.max_size ({config.max_size})")
    return config


def scheduler_steps_problem(scheduler: str, steps: int) -> str | None:
    """Why `steps` is too many for `scheduler`, or None."""
    bound = SCHEDULER_MAX_STEPS.get(scheduler)
    if bound is None or steps <= bound:
        return None
    return (f"{steps} steps are too many for scheduler {scheduler}: it samples the {bound}-step schedule "
            f"it was distilled on, so at most {bound} (it is meant for 2-8)")


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _check(key: str, value: Any, hint: Any) -> Any:
    import typing

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)

    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {quote(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {quote(value)}")
        _check_range(key, value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {quote(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(key, f"is far out of range, got {quote(value)}") from None
        _check_range(key, number)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {quote(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a YAML/JSON escape: no tokenizer takes it
            raise ConfigError(key, "must be valid Unicode text (it holds a lone surrogate escape)") from None
        choices = _CHOICES.get(key)
        if choices is not None:
            value = value.strip().lower()
            if value not in choices:
                raise ConfigError(key, f"must be one of {', '.join(choices)}; got {quote(value)}")
        return value
    if hint is Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError(key, f"must be a path, got {quote(value)}")
        return Path(os.path.expanduser(str(value)))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(key, f"must be a non-empty list, got {quote(value)}")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 64 <= item <= 4096 or item % 8:
                raise ConfigError(f"{key}[{index}]", f"must be a multiple of 8 in 64..4096, got {quote(item)}")
            items.append(item)
        return tuple(sorted(set(items)))
    raise ConfigError(key, f"unsupported type {hint!r}")  # a programming error, named anyway


def _check_range(key: str, value: float) -> None:
    bounds = _RANGES.get(key)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ConfigError(key, f"must be between {bounds[0]} and {bounds[1]}, got {quote(value)}")


def _resolve_relative_paths(config: Config, base: Path) -> Config:
    """Relative paths in a config file are relative to the file, not to the working directory."""

    def fix(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return base / p

    paths = PathsConfig(**{f.name: fix(getattr(config.paths, f.name)) for f in dataclasses.fields(PathsConfig)})
    model = dataclasses.replace(config.model, path=fix(config.model.path), cache_dir=fix(config.model.cache_dir))
    metrics = dataclasses.replace(config.metrics, textfile=fix(config.metrics.textfile))
    return dataclasses.replace(config, paths=paths, model=model, metrics=metrics)
