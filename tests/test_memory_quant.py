"""Memory helpers (cgroup limits, malloc_trim) and the weight-only int8 UNet on the tiny model."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inpaintd.core.config import ModelConfig
from inpaintd.core.jobs import InpaintParams
from inpaintd.engine import memory
from inpaintd.engine.engine import Engine
from inpaintd.engine.memory import (
    cgroup_limit_bytes,
    malloc_trim,
    mem_total_bytes,
    memory_limit_bytes,
    release_file_pages,
)
from inpaintd.engine.quant import (
    Int8Conv2d,
    Int8Linear,
    quantize_module,
    write_quantized,
)
from PIL import Image


def _mountinfo(v2: Path | None = None, v1_memory: Path | None = None) -> str:
    lines = []
    if v2 is not None:
        lines.append(f"30 24 0:26 / {v2} rw,nosuid - cgroup2 cgroup2 rw")
    if v1_memory is not None:
        lines.append(f"31 24 0:27 / {v1_memory} rw,nosuid - cgroup cgroup rw,memory")
    return "\n".join(lines) + "\n"


def test_cgroup_v2_limit_is_the_tightest_max_or_high_on_the_path(tmp_path: Path) -> None:
    leaf = tmp_path / "system.slice" / "inpaintd.service"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("3758096384\n")
    (leaf / "memory.high").write_text("max\n")
    (tmp_path / "system.slice" / "memory.max").write_text("2147483648\n")
    limit = cgroup_limit_bytes("0::/system.slice/inpaintd.service\n", _mountinfo(v2=tmp_path))
    assert limit == 2 * 2**30


def test_cgroup_v1_unlimited_counts_as_no_limit(tmp_path: Path) -> None:
    leaf = tmp_path / "box"
    leaf.mkdir()
    (leaf / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_limit_bytes("4:memory:/box\n", _mountinfo(v1_memory=tmp_path)) is None
    (leaf / "memory.limit_in_bytes").write_text(str(1536 * 2**20))
    assert cgroup_limit_bytes("4:memory:/box\n", _mountinfo(v1_memory=tmp_path)) == 1536 * 2**20


def test_memory_limit_is_never_above_ram_and_trim_never_raises() -> None:
    limit = memory_limit_bytes()
    total = mem_total_bytes()
    assert limit is not None and total is not None and 0 < limit <= total
    assert malloc_trim() in (True, False)


TRIM_PROBE = """
import json
from inpaintd.engine import memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

# ~300 MB of malloc'd 1000-byte buffers, then every 100th kept: the freed rest sits in the
# allocator's free lists (nothing at the top of the heap to give back by itself).
buffers = [bytearray(1000) for _ in range(300_000)]
kept = buffers[::100]
del buffers
before = rss()
trimmed = memory.malloc_trim()
print(json.dumps({"allocator": memory.allocator(), "trimmed": trimmed, "before": before, "after": rss()}))
"""
TCMALLOC = sorted(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4"))


@pytest.mark.parametrize("preload", ["glibc", "tcmalloc"])
def test_trim_gives_freed_heap_back_to_the_kernel_under_either_allocator(preload: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload == "tcmalloc":
        if not TCMALLOC:
            pytest.skip("libtcmalloc-minimal4 is not installed (scripts/setup-systemd-test-deps.sh installs it)")
        env["LD_PRELOAD"] = "libtcmalloc_minimal.so.4"  # by soname, as the unit's drop-in does
    proc = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["allocator"] == preload and result["trimmed"] is True
    assert result["after"] < result["before"] - 100 * 2**20, result


def test_int8_layers_stay_close_to_the_float_layers() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 1))
    head = torch.nn.Linear(256, 512)
    x = torch.randn(2, 32, 8, 8)
    h = torch.randn(5, 256)
    ref, ref_h = net(x), head(h)
    holder = torch.nn.Sequential(head)
    quantize_module(net, torch.float32, min_params=1)
    quantize_module(holder, torch.float32, min_params=1)
    with torch.inference_mode():
        out = net(x.contiguous(memory_format=torch.channels_last))
        out_h = holder(h)
    assert isinstance(net[0], Int8Conv2d) and isinstance(net[2], Int8Conv2d)
    assert isinstance(holder[0], Int8Linear)
    assert (out - ref).abs().max() / ref.abs().max() < 0.03
    assert (out_h - ref_h).abs().max() / ref_h.abs().max() < 0.03


def test_cache_file_is_valid_safetensors_with_aligned_float_tensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(257, 513), torch.nn.Conv2d(63, 129, 3, padding=1)).to(torch.bfloat16)
    path = tmp_path / "q.safetensors"
    assert write_quantized(net, path, model_id="m", min_params=1) == 2
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert header.pop("__metadata__")["model_id"] == "m"
    widths = {"F32": 4, "BF16": 2, "I8": 1}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = info["data_offsets"]
        assert start == end, f"hole before {name}"
        assert (8 + size + start) % widths[info["dtype"]] == 0, f"{name} unaligned"
        end = stop
    assert 8 + size + end == len(raw)


@pytest.fixture()
def params() -> InpaintParams:
    return InpaintParams(prompt="a cat", negative_prompt="", scheduler="euler", steps=2, guidance=7.5, strength=1.0, seed=5)


def _inputs() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return image, Image.fromarray(mask, "L")


def test_engine_int8_on_builds_the_cache_once_and_paints(tiny_model: Path, tmp_path: Path, params: InpaintParams) -> None:
    config = ModelConfig(path=tiny_model, dtype="fp32", threads=1, unet_int8="on", cache_dir=tmp_path)
    engine = Engine.load(config)
    report = engine.runtime_report((64, 64))
    assert report["unet_weights"] == "int8" and report["channels_last"] is True
    cached = list((tmp_path / "int8").glob("unet-int8-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    image, mask = _inputs()
    first = np.asarray(engine.inpaint(image, mask, params).image)
    again = Engine.load(config)  # loads the cache, does not rebuild it
    assert cached[0].stat().st_mtime_ns == stamp
    assert np.array_equal(first, np.asarray(again.inpaint(image, mask, params).image))


def test_engine_int8_auto_follows_the_memory_limit(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 1536 * 2**20)
    small = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=tmp_path))
    assert small.runtime_report()["unet_weights"] == "int8"
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 8 * 2**30)
    big = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=tmp_path))
    assert big.runtime_report()["unet_weights"] == "native"
    off = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, unet_int8="off", cache_dir=tmp_path))
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 1536 * 2**20)
    assert off.runtime_report()["unet_weights"] == "native"


def test_a_damaged_cache_is_rebuilt(tiny_model: Path, tmp_path: Path, params: InpaintParams) -> None:
    config = ModelConfig(path=tiny_model, dtype="fp32", threads=1, unet_int8="on", cache_dir=tmp_path)
    Engine.load(config)
    (cached,) = list((tmp_path / "int8").glob("*.safetensors"))
    cached.write_bytes(b"garbage")
    engine = Engine.load(config)
    assert cached.stat().st_size > 100
    image, mask = _inputs()
    assert engine.inpaint(image, mask, params).image.size == (64, 64)


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0


def test_release_drops_mapped_weight_pages_and_never_touches_anonymous_memory(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(16 * 2**20 // 4, dtype=torch.float32)}, str(path))
    mapped = load_file(str(path))["w"]
    assert float(mapped.sum()) > 0  # fault every page in
    before = _rss_file()
    storage = mapped.untyped_storage()
    released = release_file_pages([(storage.data_ptr(), storage.nbytes())])
    assert released > 15 * 2**20
    assert _rss_file() < before - 8 * 2**20
    assert torch.equal(mapped[:5], torch.arange(5, dtype=torch.float32))  # faults back from the file

    anon = torch.ones(4 * 2**20 // 4)
    assert release_file_pages([(anon.untyped_storage().data_ptr(), anon.untyped_storage().nbytes())]) == 0
    assert float(anon.sum()) == anon.numel()


def test_engine_releases_the_text_encoder_after_a_new_prompt(tiny_model: Path, tmp_path: Path, params: InpaintParams) -> None:
    engine = Engine.load(ModelConfig(path=tiny_model, dtype="fp32", threads=1, cache_dir=tmp_path))
    image, mask = _inputs()
    first = np.asarray(engine.inpaint(image, mask, params).image)
    assert engine.runtime_report()["text_encoder_released_mib"] >= 0
    engine._embeddings.clear()  # force a second encode through the released pages
    assert np.array_equal(first, np.asarray(engine.inpaint(image, mask, params).image))
