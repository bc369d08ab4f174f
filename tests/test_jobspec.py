"""Prompt files and per-job overrides: parsed safely, validated, merged over the defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from inpaintd.core.config import (
    BUILTIN_INFERENCE,
    Config,
    LimitsConfig,
    config_from_dict,
)
from inpaintd.core.errors import JobError
from inpaintd.paint.jobspec import build_request, load_job_options

LIMITS = LimitsConfig()


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_a_txt_file_is_the_prompt(tmp_path: Path) -> None:
    assert load_job_options(write(tmp_path / "a.txt", "  a red door\n"), LIMITS) == {"prompt": "a red door"}


def test_yaml_options_override_the_defaults_and_the_seed_is_kept(tmp_path: Path) -> None:
    options = load_job_options(write(tmp_path / "a.yaml", "prompt: sky\nsteps: 7\nseed: 42\npadding: 64\n"), LIMITS)
    request = build_request("a", tmp_path / "a.png", None, options, Config())
    assert request.params.prompt == "sky"
    assert request.params.steps == 7
    assert request.params.seed == 42
    assert request.params.scheduler == BUILTIN_INFERENCE["scheduler"] and request.sources["scheduler"] == "builtin"
    assert request.roi_overrides == {"padding": 64}


def test_json_options_are_read(tmp_path: Path) -> None:
    options = load_job_options(write(tmp_path / "a.json", '{"prompt": "sea", "scheduler": "ddim"}'), LIMITS)
    assert build_request("a", tmp_path / "a.png", None, options, Config()).params.scheduler == "ddim"


def test_a_seed_is_drawn_when_none_is_given(tmp_path: Path) -> None:
    request = build_request("a", tmp_path / "a.png", None, {}, Config(), draw_seed=lambda: 1234)
    assert request.params.seed == 1234


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("steps: lots\n", "options_invalid"),
        ("steps: 100000\n", "options_invalid"),
        ("guidance: -1\n", "options_invalid"),
        ("colour: red\n", "options_invalid"),
        ("- a\n- list\n", "options_invalid"),
        ("prompt: [unclosed\n", "prompt_invalid"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "prompt_invalid"),
        ("scheduler: nonsense\n", "options_invalid"),
        ("output_format: gif\n", "options_invalid"),
    ],
)
def test_bad_yaml_options_fail_the_job_with_a_code(tmp_path: Path, text: str, code: str) -> None:
    with pytest.raises(JobError) as caught:
        options = load_job_options(write(tmp_path / "a.yaml", text), LIMITS)
        build_request("a", tmp_path / "a.png", None, options, Config())
    assert caught.value.code == code
    assert caught.value.message


def test_non_utf8_prompt_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        load_job_options(write(tmp_path / "a.txt", b"caf\xe9"), LIMITS)
    assert caught.value.code == "prompt_invalid"


def test_huge_prompt_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    with open(path, "wb") as handle:
        handle.truncate(LIMITS.max_prompt_bytes + 1)
    with pytest.raises(JobError, match="limit") as caught:
        load_job_options(path, LIMITS)
    assert caught.value.code == "prompt_invalid"


def test_a_fifo_prompt_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    os.mkfifo(path)
    with pytest.raises(JobError) as caught:
        load_job_options(path, LIMITS)
    assert caught.value.code == "job_unsafe"


def test_a_symlinked_prompt_is_not_followed(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "password")
    link = tmp_path / "a.txt"
    link.symlink_to(secret)
    with pytest.raises(JobError) as caught:
        load_job_options(link, LIMITS)
    assert caught.value.code == "job_unsafe"


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_too_many_steps_for_lcm_or_tcd_fail_the_job_as_options_invalid(tmp_path: Path, scheduler: str) -> None:
    options = load_job_options(write(tmp_path / "a.yaml", f"scheduler: {scheduler}\nsteps: 51\nstrength: 0.5\n"),
                               LimitsConfig())
    with pytest.raises(JobError) as caught:
        build_request("a", tmp_path / "a.png", None, options, Config())
    assert caught.value.code == "options_invalid"
    assert "at most 50" in caught.value.message
    assert caught.value.details["max_steps"] == 50
    ok = build_request("a", tmp_path / "a.png", None, {**options, "steps": 50}, Config())
    assert (ok.params.scheduler, ok.params.steps) == (scheduler, 50)


def test_the_bound_applies_to_the_merged_settings(tmp_path: Path) -> None:
    """A job asking for LCM on a config of 60 steps, and a model whose defaults say LCM with a job's 60 steps."""
    config = config_from_dict({"inference": {"steps": 60}})
    with pytest.raises(JobError) as caught:
        build_request("a", tmp_path / "a.png", None, {"scheduler": "lcm"}, config)
    assert "steps from the config, scheduler from the job" in caught.value.message
    with pytest.raises(JobError) as caught:
        build_request("a", tmp_path / "a.png", None, {"steps": 60}, Config(), model_defaults={"scheduler": "tcd"})
    assert caught.value.details["sources"] == {"steps": "job", "scheduler": "model"}
