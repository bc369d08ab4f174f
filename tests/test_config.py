"""Config loading: defaults, the example file, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from inpaintd.core.config import (
    _RANGES,
    SCHEDULER_MAX_STEPS,
    SCHEDULERS,
    Config,
    config_from_dict,
    load_config,
    replace_section,
    scheduler_steps_problem,
)
from inpaintd.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_example_file_documents_exactly_the_defaults() -> None:
    example = load_config(REPO / "config.example.yaml")
    defaults = Config()
    # cache_dir's default depends on $HOME/$XDG_CACHE_HOME; the example spells it with "~".
    example = dataclasses.replace(example, model=dataclasses.replace(example.model, cache_dir=defaults.model.cache_dir))
    assert example == defaults


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"roi": {"paddding": 3}}, "roi.paddding"),
        ({"nonsense": {}}, "nonsense"),
        ({"inference": {"steps": 0}}, "inference.steps"),
        ({"inference": {"steps": "20"}}, "inference.steps"),
        ({"inference": {"guidance": True}}, "inference.guidance"),
        ({"model": {"dtype": "fp16"}}, "model.dtype"),
        ({"model": {"allow_pickle": "yes"}}, "model.allow_pickle"),
        ({"roi": {"bucket_sides": [500]}}, "roi.bucket_sides[0]"),
        ({"roi": {"min_size": 1024, "max_size": 512}}, "roi.min_size"),
        ({"roi": {"min_size": 256, "max_size": 256, "bucket_sides": [512]}}, "roi.bucket_sides"),
        ({"watch": "fast"}, "watch"),
        ({"paths": {"inbox": 3}}, "paths.inbox"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert caught.value.key == key
    assert str(caught.value).startswith(key)


def test_yaml_tags_that_construct_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text("paths:\n  inbox: in\nmodel:\n  path: m\n")
    config = load_config(path)
    assert config.paths.inbox == path.parent / "in"
    assert config.model.path == path.parent / "m"
    assert config.paths.outbox == Config().paths.outbox


def test_replace_section_validates_like_a_file() -> None:
    config = replace_section(Config(), "inference", steps=4)
    assert config.inference.steps == 4
    with pytest.raises(ConfigError, match="inference.steps"):
        replace_section(config, "inference", steps=1000)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


# ----------------------------------------------------------------------------- steps per scheduler


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_too_many_steps_for_a_distilled_scheduler_is_a_config_error(scheduler: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"inference": {"scheduler": scheduler, "steps": 51}})
    assert caught.value.key == "inference.steps"
    assert "at most 50" in caught.value.message
    assert config_from_dict({"inference": {"scheduler": scheduler, "steps": 50}}).inference.steps == 50


def test_steps_are_bounded_only_for_the_schedulers_that_need_it() -> None:
    assert config_from_dict({"inference": {"scheduler": "euler", "steps": 150}}).inference.steps == 150
    # Either alone is fine: the model's defaults may supply the other (checked per job then).
    assert config_from_dict({"inference": {"steps": 150}}).inference.steps == 150
    assert config_from_dict({"inference": {"scheduler": "lcm"}}).inference.scheduler == "lcm"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_schedulers_bound_is_what_diffusers_accepts(scheduler: str) -> None:
    """The real scheduler, built as the engine builds it from a model's config, takes the bound and
    refuses one more (the pipeline calls set_timesteps with the whole step count, strength later)."""
    from diffusers import PNDMScheduler
    from inpaintd.engine.schedulers import make_scheduler

    model_config = PNDMScheduler(skip_prk_steps=True).config  # an SD-1.5 scheduler_config.json
    bound = SCHEDULER_MAX_STEPS.get(scheduler, _RANGES["inference.steps"][1])
    make_scheduler(scheduler, model_config).set_timesteps(int(bound))
    if scheduler in SCHEDULER_MAX_STEPS:
        with pytest.raises(ValueError):
            make_scheduler(scheduler, model_config).set_timesteps(int(bound) + 1)
        assert scheduler_steps_problem(scheduler, int(bound)) is None
        assert scheduler_steps_problem(scheduler, int(bound) + 1) is not None
