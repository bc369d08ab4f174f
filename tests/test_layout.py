"""Channels-last conv weights mapped from a cache file (layout.py): same weights, same pixels,
file-backed views, and a cache that is rebuilt whenever it does not hold the loaded weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.core.config import ModelConfig
from inpaintd.core.jobs import InpaintParams
from inpaintd.engine.channels_last import (
    apply_channels_last,
    cache_path,
    conv_weights,
    folder_identity,
)
from inpaintd.engine.engine import Engine
from inpaintd.engine.memory import _file_mappings
from test_fastpath import _inputs  # the same small random image and rectangular mask
from torch import nn

PARAMS = InpaintParams(prompt="a door", negative_prompt="blurry", scheduler="euler", steps=4, guidance=6.0,
                       strength=1.0, seed=5)


def _paint(engine: Engine) -> np.ndarray:
    image, mask = _inputs()
    return np.asarray(engine.inpaint(image, mask, PARAMS).image).astype(int)


def _mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's bytes lie in this process's mapping of `path`."""
    start = tensor.data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    return any(lo <= start and end <= hi and name == str(path) for lo, hi, name in _file_mappings())


def test_engine_maps_channels_last_weights_from_the_cache_and_paints_the_same_pixels(tiny_model: Path, tmp_path: Path) -> None:
    plain = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=tmp_path, channels_last_weights="off"))
    laid = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=tmp_path))  # the default
    assert laid.runtime_report()["channels_last_weights"] == {"unet": "mapped", "vae": "mapped"}
    assert plain.runtime_report()["channels_last_weights"] == "off"
    for component, module in (("unet", laid._eager_unet), ("vae", laid.pipeline.vae)):
        cache = cache_path(tmp_path, laid.info.model_id, component)
        convs = conv_weights(module)
        assert convs
        for conv in convs.values():
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert _mapped_from(conv.weight, cache), "a conv weight is not a view of the cache file"
    originals = conv_weights(plain._eager_unet)
    for name, conv in conv_weights(laid._eager_unet).items():
        assert torch.equal(conv.weight, originals[name].weight)
    # The same convolutions in another memory order: equal up to float rounding.
    assert np.abs(_paint(laid) - _paint(plain)).max() <= 1


def test_unwritable_cache_keeps_the_weights_as_loaded_and_the_job_runs(tiny_model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would be")
    engine = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=blocker))
    report = engine.runtime_report()["channels_last_weights"]
    assert set(report) == {"unet", "vae"} and all("unwritable" in why for why in report.values())
    assert engine._eager_unet.conv_in.weight.is_contiguous()
    assert _paint(engine).shape == (64, 64, 3)


def _net(seed: int, channels: tuple[int, ...], kernel: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.SiLU()]
    layers.append(nn.Linear(channels[-1], 3))  # not a conv: left alone
    return nn.Sequential(*layers).eval()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), channels=st.lists(st.integers(1, 24), min_size=2, max_size=4),
       kernel=st.sampled_from([1, 3, 5]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_conv_stack_computes_the_same_from_the_mapped_cache(seed: int, channels: list[int], kernel: int,
                                                               dtype: torch.dtype, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("layout")
    reference = _net(seed, tuple(channels), kernel).to(dtype)
    net = _net(seed, tuple(channels), kernel).to(dtype)
    cache = cache_path(folder, "m", "unet")
    stats = apply_channels_last(net, cache, model_id="m", component="unet")
    assert stats.built and stats.layers == len(channels) - 1
    again = _net(seed, tuple(channels), kernel).to(dtype)
    assert not apply_channels_last(again, cache, model_id="m", component="unet").built  # mapped, not rebuilt
    for name, conv in conv_weights(reference).items():
        for candidate in (net, again):
            laid = candidate.get_submodule(name).weight
            assert torch.equal(laid.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               conv.weight.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
            assert laid.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, channels[0], 9, 7, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.inference_mode():
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(net[:-1](x), reference[:-1](x), rtol=tol, atol=tol)


def test_a_cache_holding_other_weights_or_damaged_is_rebuilt(tmp_path: Path) -> None:
    cache = cache_path(tmp_path, "same-id", "vae")
    apply_channels_last(_net(1, (4, 8, 8), 3), cache, model_id="same-id", component="vae")
    # Another model's weights under the same id (a raw folder changed in place): not trusted.
    other = _net(2, (4, 8, 8), 3)
    expected = {n: c.weight.clone() for n, c in conv_weights(other).items()}
    assert apply_channels_last(other, cache, model_id="same-id", component="vae").built
    for name, conv in conv_weights(other).items():
        assert torch.equal(conv.weight, expected[name])
    # Other shapes, then a truncated file: rebuilt each time, the weights stay the module's own.
    assert apply_channels_last(_net(2, (4, 8, 8, 8), 3), cache, model_id="same-id", component="vae").built
    size = cache.stat().st_size
    with open(cache, "r+b") as handle:
        handle.truncate(size // 2)
    last = _net(3, (4, 8, 8, 8), 3)
    expected = {n: c.weight.clone() for n, c in conv_weights(last).items()}
    assert apply_channels_last(last, cache, model_id="same-id", component="vae").built
    assert cache.stat().st_size == size
    for name, conv in conv_weights(last).items():
        assert torch.equal(conv.weight, expected[name])
    assert not [p for p in os.listdir(cache.parent) if p.startswith(".")], "a temp file was left behind"


def test_a_cache_built_from_other_source_files_is_rebuilt(tmp_path: Path) -> None:
    """A raw folder's model id covers names and sizes only: a fine-tune copied over another of the
    same size has the same id, and the source identity (names, sizes, mtimes) tells them apart."""
    folder = tmp_path / "unet"
    folder.mkdir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"a" * 64)
    cache = cache_path(tmp_path / "cache", "raw-id", "unet")
    first = folder_identity(folder)
    assert apply_channels_last(_net(4, (3, 6), 3), cache, model_id="raw-id", component="unet", source=first).built
    assert not apply_channels_last(_net(4, (3, 6), 3), cache, model_id="raw-id", component="unet", source=first).built
    weights.write_bytes(b"b" * 64)  # same name, same size, rewritten
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = folder_identity(folder)
    assert second != first
    assert apply_channels_last(_net(4, (3, 6), 3), cache, model_id="raw-id", component="unet", source=second).built
