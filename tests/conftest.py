"""Shared fixtures: a tiny random-weight inpainting model built once per test session.

`tiny_model_raw` is the diffusers folder testmodels writes (fp32, no manifest);
`tiny_model` is its prepared copy (fp32 safetensors + inpaintd-manifest.json), the form the
daemon loads; `tiny_engine` is an Engine on `tiny_model` with one thread, loaded once; `tiny_sd15_raw` and
`tiny_sd2_raw` are the 4-channel and SD-2-structured tiny presets.
Tests must not modify these folders: copy them (shutil.copytree) to tamper.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.store.spool import Spool
from inpaintd.testing.models import build_random_model


@pytest.fixture(scope="session")
def tiny_model_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_model("tiny", tmp_path_factory.mktemp("tiny-model") / "raw")


@pytest.fixture(scope="session")
def tiny_sd15_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 4-channel (text-to-image) UNet, like an ordinary SD-1.5 checkpoint."""
    return build_random_model("tiny-sd15", tmp_path_factory.mktemp("tiny-sd15") / "raw")


@pytest.fixture(scope="session")
def tiny_sd2_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with SD-2-inpainting's structure."""
    return build_random_model("tiny-sd2-inpaint", tmp_path_factory.mktemp("tiny-sd2") / "raw")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_raw: Path) -> Path:
    dst = tiny_model_raw.parent / "prepared"
    prepare_model(tiny_model_raw, dst, PrepareOptions(dtype="fp32"))
    return dst


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from inpaintd.core.config import ModelConfig
    from inpaintd.engine.engine import Engine

    config = ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=tmp_path_factory.mktemp("cache"))
    return Engine.load(config)


@pytest.fixture
def place(tmp_path: Path):
    """(root, spool): inbox, outbox, failed and archive folders under root and an open spool."""
    for d in ("inbox", "outbox", "failed", "archive"):
        (tmp_path / d).mkdir()
    spool = Spool(tmp_path / "state")
    spool.open(tmp_path / "inbox")
    yield tmp_path, spool
    spool.close()
