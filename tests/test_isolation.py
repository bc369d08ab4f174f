"""Fault isolation (issue 10): each way one drop could stop, crash or starve the daemon, as a
regression test, plus the invariants behind them over random inputs.

The numbered cases are the issue's: (1) one file blocked all claiming, (2) names near NAME_MAX,
(3) unbounded work per job, (4) amplified user strings, (5) a full state disk failed a valid job,
(6) archive on another filesystem + a kill mid-copy, (7) delete-after-success + a stop before
the claim was dropped, (8) two daemons recorded one rejection twice. The randomised run against
live daemons is tests/test_chaos.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import (
    Daemon,
    Dirs,
    drop_job,
    image_bytes,
    mask_bytes,
    put,
    read_status,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inpaintd.core.boundary import classify
from inpaintd.core.config import LimitsConfig, config_from_dict
from inpaintd.core.errors import JobError
from inpaintd.core.jobs import DISTINCT_SUFFIX_CHARS
from inpaintd.core.quoting import LOG_VALUE_CHARS, MESSAGE_CHARS, TRACEBACK_CHARS
from inpaintd.intake import grouping
from inpaintd.intake.grouping import NAME_TOO_LONG, JobGroup, Kind, Rules, Seen, Stat
from inpaintd.intake.names import DERIVED_SUFFIX_BYTES, junk_reason
from inpaintd.paint.images import encode_image, load_image, load_mask, probe_alpha
from inpaintd.paint.jobspec import build_request, load_job_options
from inpaintd.service.logs import bound_fields
from inpaintd.store import outbox, records
from inpaintd.store.fsutil import move_entry, rename_distinct
from inpaintd.store.records import (
    archive_inputs,
    error_record,
    fail_claim,
    record_dir_name,
)
from inpaintd.store.status import StatusFile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DDS_HEADER = b"DDS " + (124).to_bytes(4, "little") + b"\x07\x10\x08\x00" + b"\x40\x00\x00\x00" * 2 + b"\0" * 112


def png(size=(64, 64), mode="RGB") -> bytes:
    return image_bytes(size, "PNG", mode=mode)


# ---------------------------------------------------------------------------- (1) the alpha probe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=2048), st.sampled_from([DDS_HEADER, png()[:50], png(mode="RGBA")[:-20]])))
def test_the_alpha_probe_never_raises_on_any_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert probe_alpha(path) in (True, False)


def test_the_alpha_probe_never_raises_on_what_is_not_a_readable_file(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "dds.png").write_bytes(DDS_HEADER)
    for name in ("dir.png", "fifo.png", "link.png", "missing.png", "dds.png"):
        assert probe_alpha(tmp_path / name) is False
    (tmp_path / "alpha.png").write_bytes(png(mode="RGBA"))
    assert probe_alpha(tmp_path / "alpha.png") is True


# ---------------------------------------------------------------------------- (2) names


name_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"), min_size=1,
                    max_size=130)


@settings(max_examples=300, deadline=None)
@given(name=name_text, name_max=st.sampled_from([255, 143]))
def test_a_job_is_ready_only_when_every_name_derived_from_it_fits(name: str, name_max: int) -> None:
    seen = {}
    for entry in (f"{name}.png", f"{name}.mask.png"):
        if len(entry.encode()) > 255 or junk_reason(entry):
            return
        seen[entry] = Seen(Stat(entry, Kind.FILE, 10, 1, 1, hash(entry)), 0.0, 0.0)
    rules = Rules(settle_seconds=0, incomplete_timeout=60, name_max=name_max)
    plan = grouping.plan(seen, 100.0, rules)
    for job in plan.ready:
        longest = max(len(f"{job.name}-12345678.{ext}".encode()) for ext in ("webp", "tiff", "json"))
        assert longest <= name_max
    for rejected in plan.rejected:
        if rejected.code == NAME_TOO_LONG:
            assert len(rejected.name.encode()) + DERIVED_SUFFIX_BYTES > name_max


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=300))
def test_record_folder_names_always_fit_with_their_distinct_suffix(name: str) -> None:
    folder = record_dir_name(name)
    assert len(os.fsencode(folder)) + DISTINCT_SUFFIX_CHARS <= 255
    if len(name.encode()) <= 255 - DISTINCT_SUFFIX_CHARS:
        assert folder == name


# ---------------------------------------------------------------------------- (3) bounded work


def dots(size: int, spacing: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    for y in range(spacing // 2, size, spacing):
        for x in range(spacing // 2, size, spacing):
            mask[y : y + 3, x : x + 3] = 255
    return mask


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


class CountingEngine:
    """The real tiny engine, counting model passes."""

    def __init__(self, engine) -> None:
        self.engine, self.passes = engine, 0
        self.info = engine.info
        self.has_draft_decoder = engine.has_draft_decoder
        self.versions = engine.versions

    def inpaint(self, *args, **kwargs):
        self.passes += 1
        return self.engine.inpaint(*args, **kwargs)

    def runtime_report(self, *args):
        return self.engine.runtime_report(*args)


def job_config(tmp_path: Path, **limits):
    return config_from_dict({
        "roi": {"min_size": 64, "max_size": 64, "bucket_sides": [64], "padding": 8, "dilate": 0, "feather": 2},
        "inference": {"steps": 1, "prompt": "x", "scheduler": "euler"},
        "limits": limits,
        "paths": {k: str(tmp_path / k) for k in ("inbox", "outbox", "failed", "archive", "state")},
    })


def test_a_mask_of_hundreds_of_specks_is_merged_down_to_max_regions(tmp_path: Path, tiny_engine) -> None:
    from inpaintd.paint.job import run_job
    from inpaintd.paint.jobspec import build_request

    image = write_png(tmp_path / "i.png", np.full((400, 400, 3), 120, dtype=np.uint8))
    mask = write_png(tmp_path / "m.png", dots(400, 16))  # 625 specks
    config = job_config(tmp_path, max_regions=8)
    engine = CountingEngine(tiny_engine)
    result = run_job(engine, build_request("d", image, mask, {}, config), config)
    assert 1 <= len(result.regions) <= 8 and engine.passes == len(result.regions)


def test_far_apart_specks_beyond_max_regions_fail_before_any_model_pass(tmp_path: Path, tiny_engine) -> None:
    from inpaintd.paint.job import run_job
    from inpaintd.paint.jobspec import build_request

    image = write_png(tmp_path / "i.png", np.full((1000, 1000, 3), 120, dtype=np.uint8))
    mask = write_png(tmp_path / "m.png", dots(1000, 200))  # 25 specks 200 px apart, merge stops at 128
    config = job_config(tmp_path, max_regions=4)
    engine = CountingEngine(tiny_engine)
    with pytest.raises(JobError) as caught:
        run_job(engine, build_request("d", image, mask, {}, config), config)
    assert caught.value.code == "mask_too_fragmented" and engine.passes == 0


def test_regions_times_steps_over_the_budget_fail_before_any_model_pass(tmp_path: Path, tiny_engine) -> None:
    from inpaintd.paint.job import run_job
    from inpaintd.paint.jobspec import build_request

    image = write_png(tmp_path / "i.png", np.full((64, 64, 3), 120, dtype=np.uint8))
    mask = write_png(tmp_path / "m.png", dots(64, 64))
    config = job_config(tmp_path, max_region_steps=40)
    engine = CountingEngine(tiny_engine)
    with pytest.raises(JobError) as caught:
        run_job(engine, build_request("d", image, mask, {"steps": 41}, config), config)
    assert caught.value.code == "job_too_costly" and engine.passes == 0
    # strength shortens the schedule, and the budget counts the steps that really run
    result = run_job(engine, build_request("d", image, mask, {"steps": 60, "strength": 0.5}, config), config)
    assert len(result.regions) == 1


def service_with_jobs(tmp_path: Path, engine, names, **limits):
    from inpaintd.service.daemon import Service

    config = job_config(tmp_path, **limits)
    for key in ("inbox", "outbox", "failed", "archive", "state"):
        getattr(config.paths, key).mkdir(exist_ok=True)
    svc = Service(config, None)
    svc.spool.open(config.paths.inbox)
    svc.status = StatusFile(config.paths.state)
    svc.engine = engine
    claims = []
    for name in names:
        (config.paths.inbox / f"{name}.png").write_bytes(png())
        (config.paths.inbox / f"{name}.mask.png").write_bytes(mask_bytes())
        group = JobGroup(name, f"{name}.png", f"{name}.mask.png", None, (f"{name}.mask.png", f"{name}.png"), None, 0)
        claims.append(svc.spool.claim(config.paths.inbox, group, arrived=time.time()))
    return svc, config, claims


def test_a_job_past_its_wall_clock_budget_fails_and_the_next_one_runs(tmp_path: Path, tiny_engine) -> None:
    svc, config, (slow, fast) = service_with_jobs(tmp_path, tiny_engine, ["slow", "fast"], max_job_seconds=0.001)
    time.sleep(0.01)
    svc.process(slow)
    error = json.loads((config.paths.failed / "slow" / "error.json").read_text())
    assert error["code"] == "job_too_costly" and "max_job_seconds" in error["message"]
    svc.config = job_config(tmp_path)  # no budget: the next job is painted
    svc.process(fast)
    assert (config.paths.outbox / "fast.json").exists()
    svc.spool.close()


# ---------------------------------------------------------------------------- (4) bounded records


def test_an_aliased_yaml_of_a_few_hundred_bytes_is_refused_before_it_expands(tmp_path: Path) -> None:
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, letter in zip("abcdefgh", "bcdefghi"):
        laughs.append(f"{letter}: &{letter} [" + ",".join([f"*{prev}"] * 9) + "]")
    laughs.append("negative_prompt: *i")
    path = tmp_path / "j.yaml"
    path.write_text("\n".join(laughs) + "\n")
    assert len(path.read_bytes()) < 700
    with pytest.raises(JobError) as caught:
        load_job_options(path, LimitsConfig())
    assert caught.value.code == "prompt_invalid" and "aliases" in caught.value.message


@pytest.mark.parametrize("text,suffix,why", [
    ("prompt: !!python/object/apply:os.system ['true']\n", ".yaml", "tags"),
    ("prompt: !!binary aGVsbG8=\n", ".yaml", "tags"),
    ("prompt: " + "[" * 50 + "]" * 50 + "\n", ".yaml", "nested"),
    ('{"prompt": ' + "[" * 50 + "]" * 50 + "}", ".json", "nests"),
    ('{"seed": ' + "9" * 20000 + "}", ".json", "not valid JSON"),
    ("seed: " + "9" * 20000 + "\n", ".yaml", "not valid YAML"),
])
def test_job_files_that_would_be_expensive_to_build_are_refused(tmp_path: Path, text: str, suffix: str, why: str) -> None:
    path = tmp_path / f"j{suffix}"
    path.write_text(text)
    with pytest.raises(JobError) as caught:
        load_job_options(path, LimitsConfig())
    assert caught.value.code == "prompt_invalid" and why in caught.value.message
    assert len(caught.value.message) <= MESSAGE_CHARS


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=5000), value=st.one_of(st.text(max_size=20000), st.lists(st.integers(), max_size=3000)))
def test_whatever_a_job_file_holds_its_error_record_stays_small(key: str, value) -> None:
    config = config_from_dict({})
    for options in ({key: value}, {"steps": value}, {"prompt": value}, {"scheduler": value}):
        try:
            build_request("n", Path("n.png"), None, options, config)
        except JobError as exc:
            record = error_record(exc, "n")
            assert len(json.dumps(record)) < 64 * 1024


def test_log_fields_are_cut_to_a_bounded_size() -> None:
    event = bound_fields(None, "info", {"event": "x", "error": "e" * 10_000_000, "files": list(range(100_000)),
                                        "exception": "t" * 10_000_000})
    assert len(event["error"]) <= LOG_VALUE_CHARS
    assert len(str(event["files"])) <= LOG_VALUE_CHARS
    assert len(event["exception"]) <= TRACEBACK_CHARS


def test_status_writes_are_rate_limited_and_skipped_when_nothing_changed(tmp_path: Path) -> None:
    now = [1000.0]
    status = StatusFile(tmp_path, clock=lambda: now[0])
    status.update(state="idle")
    first = (tmp_path / "status.json").stat().st_mtime_ns, (tmp_path / "status.json").read_text()
    for step in range(1000):
        status.update(current={"step": step})  # within MIN_INTERVAL: held back
    assert (tmp_path / "status.json").read_text() == first[1]
    now[0] += 1.0
    status.flush()
    assert json.loads((tmp_path / "status.json").read_text())["current"] == {"step": 999}
    written = (tmp_path / "status.json").read_text()
    now[0] += 1.0
    status.update(current={"step": 999})  # unchanged: not written again
    assert (tmp_path / "status.json").read_text() == written


# ---------------------------------------------------------------------------- (5) a full state disk


FULL_STATE_SCRIPT = textwrap.dedent("""
    import errno, json, os, sys, time
    from pathlib import Path
    root, model = Path(sys.argv[1]), Path(sys.argv[2])
    from inpaintd.core.config import config_from_dict
    from inpaintd.engine.engine import Engine
    from inpaintd.intake.grouping import JobGroup
    from inpaintd.service.daemon import Service
    from inpaintd.store.status import StatusFile
    from PIL import Image, ImageDraw
    fs = root / "fs"
    config = config_from_dict({
        "model": {"path": str(model), "dtype": "fp32", "threads": 1, "cache_dir": str(root / "cache")},
        "roi": {"min_size": 64, "max_size": 64, "bucket_sides": [64]},
        "inference": {"steps": 1, "prompt": "x", "scheduler": "euler"},
        "paths": {k: str(fs / k) for k in ("inbox", "outbox", "failed", "archive", "state")}})
    for k in ("inbox", "outbox", "failed", "archive", "state"):
        getattr(config.paths, k).mkdir()
    svc = Service(config, None)
    svc.spool.open(config.paths.inbox)
    svc.status = StatusFile(config.paths.state)
    svc.engine = Engine.load(config.model)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(config.paths.inbox / "j.png")
    m = Image.new("L", (64, 64)); ImageDraw.Draw(m).rectangle([20, 20, 40, 40], fill=255)
    m.save(config.paths.inbox / "j.mask.png")
    claim = svc.spool.claim(config.paths.inbox, JobGroup("j", "j.png", "j.mask.png", None, ("j.mask.png", "j.png"), None, 0), time.time())
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    for block in (1 << 20, 4096, 1):
        try:
            while os.write(fd, b"0" * block):
                pass
        except OSError:
            pass
    os.close(fd)
    before = dict(claim.record)
    try:
        svc.spool.mark(claim, "publishing", publishing={"image": "j.png"})
        mark = "written"
    except OSError as exc:
        mark = errno.errorcode[exc.errno]
    unchanged = claim.record == before and json.loads((claim.dir / "job.json").read_text()) == before
    svc.process(claim)
    held = svc.held.first()
    failed_now = os.listdir(config.paths.failed)
    os.unlink(fs / "filler")
    svc.process(held.claim, svc.held.pop_due(time.monotonic() + 3600))
    print(json.dumps({"mark": mark, "unchanged": unchanged, "held_code": held.code if held else None,
                      "failed_while_full": failed_now, "published": sorted(os.listdir(config.paths.outbox)),
                      "claims_left": os.listdir(config.paths.state / "claimed")}))
""")


def test_a_full_state_disk_holds_a_valid_job_and_it_completes_once_space_returns(tmp_path: Path, tiny_model: Path) -> None:
    from chaos import namespace_unavailable

    reason = namespace_unavailable()
    if reason:
        pytest.skip(reason)
    (tmp_path / "fs").mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_STATE_SCRIPT)
    shell = (f"mount -t tmpfs -o size=600k tmpfs {tmp_path / 'fs'} && "
             f"exec {sys.executable} {script} {tmp_path} {tiny_model}")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mark"] == "ENOSPC" and result["unchanged"], result
    assert result["held_code"] == "disk_full" and result["failed_while_full"] == [], result
    assert result["published"] == ["j.json", "j.png"] and result["claims_left"] == [], result


# ---------------------------------------------------------------------------- (6), (7) moves and stops


class Stop(BaseException):
    """Stands in for kill -9 at a chosen point: nothing after it runs."""


def claimed(place, name="cat", folder=False):
    root, spool = place
    if folder:
        (root / "inbox" / name).mkdir()
        (root / "inbox" / name / "image.png").write_bytes(b"i" * 300_000)
        (root / "inbox" / name / "mask.png").write_bytes(b"m")
        group = JobGroup(name, f"{name}/image.png", f"{name}/mask.png", None, (name,), name, 0)
    else:
        for n in (f"{name}.png", f"{name}.mask.png"):
            (root / "inbox" / n).write_bytes(n.encode() * 50_000)
        group = JobGroup(name, f"{name}.png", f"{name}.mask.png", None, (f"{name}.mask.png", f"{name}.png"), None, 0)
    return spool.claim(root / "inbox", group, arrived=1000.0)


other_fs = pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
    reason="needs two filesystems (/dev/shm and /tmp)")


@other_fs
@pytest.mark.parametrize("folder", [False, True])
@pytest.mark.parametrize("grown", ["data", "sparse"])
def test_an_input_grown_after_its_check_is_archived_on_another_disk_at_most_max_input_bytes(
        place, folder: bool, grown: str) -> None:
    """Issue 22: an uploader who kept a second write handle grows a claimed input after the job
    read it, with data (8 MiB written) or sparse (8 TiB); the archive on another filesystem copies
    at most limits.max_input_bytes of it (before: every byte written, onto the archive's disk)."""
    import tempfile

    _root, spool = place
    claim = claimed(place, folder=folder)
    path = next(p for p in claim.inputs.rglob("*") if p.is_file())
    with open(path, "r+b") as handle:  # the uploader's handle, after the check
        if grown == "data":
            handle.seek(0, os.SEEK_END)
            handle.write(os.urandom(8 << 20))
        else:
            handle.truncate(8 << 40)
    limit = 1 << 20
    with tempfile.TemporaryDirectory(dir="/dev/shm") as archive:
        started = time.monotonic()
        target = archive_inputs(spool, claim, Path(archive), "archive", max_bytes=limit)
        assert time.monotonic() - started < 5
        assert target is not None
        sizes = {p.name: p.stat().st_size for p in target.iterdir()}
        assert sizes[path.name] == limit and max(sizes.values()) == limit
        assert not claim.dir.exists() and not [n for n in os.listdir(archive) if n.startswith(".")]


@other_fs
def test_a_drop_rejected_as_too_large_is_filed_whole_on_another_disk(place) -> None:
    """The cut above is for what passed the check: a drop rejected at intake (input_too_large:
    never within the limit) is the uploader's file, filed whole in failed/ on another disk."""
    import tempfile

    root, spool = place
    data = os.urandom(3 << 20)
    (root / "inbox" / "big.png").write_bytes(data)
    rejection = {"code": "input_too_large", "message": "too large", "details": {}}
    claim = spool.claim_rejected(root / "inbox", "big", ["big.png"], None, 1000.0, rejection)
    error = JobError("input_too_large", "too large", {})
    with tempfile.TemporaryDirectory(dir="/dev/shm") as failed:
        target = records.fail_claim(spool, claim, error, Path(failed), time.time(), max_bytes=1 << 20)
        assert target is not None and (target / "big.png").read_bytes() == data


@other_fs
@pytest.mark.parametrize("folder", [False, True])
@pytest.mark.parametrize("stop_after_bytes", [0, 1, 100_000])
def test_a_kill_mid_copy_to_an_archive_on_another_disk_is_finished_by_the_next_attempt(
        place, monkeypatch, folder: bool, stop_after_bytes: int) -> None:
    import tempfile

    root, spool = place
    claim = claimed(place, folder=folder)
    originals = {p.name: p.read_bytes() for p in claim.inputs.rglob("*") if p.is_file()}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as archive:
        from inpaintd.store import fsutil

        real = fsutil._copy_range

        def interrupted(src, dst, start, end):  # the copy loop since holes are kept (fsutil._copy_data)
            os.pwrite(dst, os.pread(src, stop_after_bytes, start), start)
            raise Stop

        monkeypatch.setattr(fsutil, "_copy_range", interrupted)
        with pytest.raises(Stop):
            archive_inputs(spool, claim, Path(archive), "archive")
        monkeypatch.setattr(fsutil, "_copy_range", real)
        again = spool.load(claim.dir)
        target = archive_inputs(spool, again, Path(archive), "archive")
        assert target == Path(archive) / "cat"
        assert {p.name: p.read_bytes() for p in target.iterdir()} == originals
        assert os.listdir(archive) == ["cat"] and not claim.dir.exists()


def test_a_stop_after_a_copy_landed_but_before_its_source_was_removed_keeps_the_copy(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"data")
    (tmp_path / "dst").write_bytes(b"data")  # renamed into place whole, so complete
    assert move_entry(tmp_path / "src", tmp_path / "dst") == "kept"
    assert not (tmp_path / "src").exists() and (tmp_path / "dst").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        move_entry(tmp_path / "gone", tmp_path / "dst")


@pytest.mark.parametrize("after_success", ["delete", "archive"])
def test_a_stop_before_the_claim_is_dropped_is_finished_not_held(place, monkeypatch, after_success: str) -> None:
    root, spool = place
    claim = claimed(place)
    with monkeypatch.context() as patch:
        patch.setattr(spool, "drop", lambda _claim: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            archive_inputs(spool, claim, root / "archive", after_success)
    again = spool.load(claim.dir)
    archive_inputs(spool, again, root / "archive", after_success)  # no ENOENT, no hold
    assert not claim.dir.exists()
    assert os.listdir(root / "archive") == ([] if after_success == "delete" else ["cat"])


def test_a_failure_record_appears_whole_or_not_at_all(place, monkeypatch) -> None:
    root, spool = place
    claim = claimed(place)
    error = JobError("mask_empty", "nothing to repaint")
    real = rename_distinct
    with monkeypatch.context() as patch:
        patch.setattr(records, "rename_distinct", lambda *a: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            fail_claim(spool, claim, error, root / "failed", 1.0)
    assert [n for n in os.listdir(root / "failed") if not n.startswith(".")] == []  # nothing visible yet
    outbox.rename_distinct = real
    folder = fail_claim(spool, spool.load(claim.dir), error, root / "failed", 2.0)
    assert os.listdir(root / "failed") == ["cat"] and sorted(os.listdir(folder)) == ["cat.mask.png", "cat.png",
                                                                                      "error.json"]


# ---------------------------------------------------------------------------- the boundary


@settings(max_examples=200, deadline=None)
@given(errno_=st.sampled_from(sorted(errno.errorcode)),
       where=st.sampled_from(["outbox", "failed", "archive", "state", "input", "elsewhere"]))
def test_every_os_error_becomes_a_fail_or_a_hold_of_that_job(errno_: int, where: str) -> None:
    folders = {k: Path(f"/srv/{k}") for k in ("outbox", "failed", "archive", "state", "inbox")}
    inputs = Path("/srv/state/claimed/j/inputs")
    path = {"input": inputs / "a.png", "elsewhere": Path("/x/y")}.get(where, folders.get(where, Path("/")) / "f")
    verdict = classify(OSError(errno_, os.strerror(errno_), str(path)), folders, inputs)
    assert verdict.action in ("fail", "hold") and verdict.code and len(verdict.message) <= MESSAGE_CHARS
    if where == "input" and verdict.action == "fail" and verdict.code != "name_too_long":
        assert verdict.code in ("input_unreadable", "internal_error")
    if errno_ == 28 and where != "input":
        assert (verdict.action, verdict.code) == ("hold", "disk_full")


def test_any_exception_type_is_a_verdict_and_only_keyboard_interrupt_escapes() -> None:
    for exc in (RuntimeError("x"), MemoryError(), RecursionError(), SystemExit(3), ValueError("v" * 10**6),
                GeneratorExit()):
        verdict = classify(exc)
        assert verdict.action == "fail" and verdict.code == "internal_error"
        assert len(verdict.message) <= MESSAGE_CHARS
    with pytest.raises(KeyboardInterrupt):
        classify(KeyboardInterrupt())


# ---------------------------------------------------------------------------- live: (1), (2), (8)


SETTINGS = {"watch": {"settle_seconds": 0.3, "rescan_interval": 2, "incomplete_timeout": 3}}


@pytest.fixture
def two_daemons(tiny_model: Path, tmp_path: Path):
    """Two daemons on one inbox (their own state folders), without CAP_DAC_OVERRIDE where root."""
    from chaos import namespace_unavailable

    wrapper = [] if namespace_unavailable() else ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    first = Dirs.make(tmp_path / "a", tiny_model, SETTINGS)
    second = Dirs.make(tmp_path / "b", tiny_model, SETTINGS)
    second.rewrite_config({"paths": {"inbox": str(first.inbox), "outbox": str(first.outbox),
                                     "failed": str(first.failed), "archive": str(first.archive)}})
    daemons = [Daemon(first, wrapper=wrapper), Daemon(second, wrapper=wrapper)]
    for daemon in daemons:
        daemon.start()
    yield first, daemons, bool(wrapper)
    for daemon in daemons:
        if daemon.alive():
            daemon.stop()


def test_live_hostile_names_and_unreadable_files_never_block_good_jobs_and_are_recorded_once(two_daemons) -> None:
    dirs, daemons, can_chmod = two_daemons
    inbox = dirs.inbox
    put(inbox / "evil.png", DDS_HEADER)  # (1) no mask: probed for alpha
    if can_chmod:
        put(inbox / "locked.png", png(mode="RGBA"))
        os.chmod(inbox / "locked.png", 0)
    long_alpha = "a" * 251  # (2) NAME.png fits, NAME.json would not
    put(inbox / f"{long_alpha}.png", png(mode="RGBA"))
    put(inbox / f"{long_alpha}.txt", b"x")
    long_folder = "f" * 254
    for round_ in range(2):  # (2) dropped twice: two distinct failure records
        folder = inbox / f".up{round_}"
        folder.mkdir()
        (folder / "image.png").write_bytes(png())
        os.rename(folder, inbox / long_folder)
        deadline = time.monotonic() + 30
        while (inbox / long_folder).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    incomplete = [f"inc{i}" for i in range(8)]  # (8) rejected with two daemons racing for them
    for name in incomplete:
        put(inbox / f"{name}.png", png())
    good = [f"good{i}" for i in range(4)]
    for name in good:
        drop_job(inbox, name)
    names = good + incomplete + ["evil", long_alpha] + (["locked"] if can_chmod else [])
    found = wait_for(dirs, names, 60)
    assert all(d.alive() for d in daemons), daemons[0].log_tail()
    for name in good:
        assert [o.kind for o in found.get(name, [])] == ["done"], (name, found.get(name))
    for name in incomplete + ["evil"] + (["locked"] if can_chmod else []):
        assert [o.code for o in found.get(name, [])] == ["job_incomplete"], (name, found.get(name))
    assert [o.code for o in found[long_alpha]] == ["name_too_long"]
    assert [o.code for o in found[long_folder]] == ["name_too_long", "name_too_long"]
    for folder in dirs.failed.iterdir():
        assert not folder.name.startswith(".") and "error.json" in os.listdir(folder)
    assert not any(e.get("event") == "job.crashed" for d in daemons for e in d.events())


def test_inpaintd_status_names_the_held_jobs() -> None:
    from inpaintd.store.status import format_status

    text = format_status({"running": True, "pid": 1, "uptime_seconds": 5, "state": "retrying", "held": ["a", "b"],
                          "health": "outbox folder /o is not usable (Read-only file system), retrying"})
    assert "held:       2 waiting out an error" in text and "(a, b)" in text and "Read-only" in text


# ---------------------------------------------------------------------------- found by an adversarial review


@pytest.mark.parametrize("options,code", [
    ({"guidance": 10 ** 400}, "options_invalid"),  # float() of it overflows
    ({"strength": -(10 ** 400)}, "options_invalid"),
    ({"prompt": "a \ud800 house"}, "options_invalid"),  # a lone surrogate from a YAML/JSON escape
    ({"negative_prompt": "\ud83d"}, "options_invalid"),
    ({"strength": 0.01}, "options_invalid"),  # int(20 x 0.01) = 0 denoising steps
    ({"steps": 3, "strength": 0.3, "scheduler": "lcm"}, "options_invalid"),
])
def test_option_values_that_crashed_deep_inside_are_refused_up_front(options: dict, code: str) -> None:
    with pytest.raises(JobError) as caught:
        build_request("n", Path("n.png"), None, options, config_from_dict({}))
    assert caught.value.code == code


def test_a_config_whose_defaults_make_no_denoising_step_is_refused() -> None:
    from inpaintd.core.errors import ConfigError

    with pytest.raises(ConfigError, match="inference.strength"):
        config_from_dict({"inference": {"steps": 1, "strength": 0.5}})


def loaded(tmp_path: Path, data: bytes, name: str = "i.png"):
    path = tmp_path / name
    path.write_bytes(data)
    return load_image(path, 100_000_000)


def test_results_a_format_cannot_hold_fail_the_job_or_drop_the_metadata_that_does_not_fit(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010E] = "A" * 100_000  # over JPEG's 64 KiB APP1 segment
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG", exif=exif.tobytes())
    source = loaded(tmp_path, buffer.getvalue())
    data, ext = encode_image(source.pixels, None, source, "jpg", 90)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (64, 64)
    wide = loaded(tmp_path, image_bytes((17000, 8), "PNG"), "w.png")
    with pytest.raises(JobError) as caught:
        encode_image(wide.pixels, None, wide, "webp", 90)
    assert caught.value.code == "image_unsupported" and "output_format" in caught.value.message


def test_broken_frames_and_unconvertible_mask_modes_are_the_inputs_fault(tmp_path: Path) -> None:
    gif = io.BytesIO()
    Image.new("P", (64, 64)).save(gif, format="GIF")
    broken = gif.getvalue()[:-1] + b"," + bytes(9)  # the trailer replaced by a truncated frame
    with pytest.raises(JobError) as caught:
        loaded(tmp_path, broken)
    assert caught.value.code in ("image_unreadable", "image_unsupported")
    lab = tmp_path / "m.tif"
    Image.new("LAB", (64, 64)).save(lab, format="TIFF")
    with pytest.raises(JobError) as caught:
        load_mask(lab, (64, 64), 100_000_000)
    assert caught.value.code == "mask_unreadable"


def test_a_job_folder_nested_a_thousand_deep_is_unsafe_not_a_crash(place) -> None:
    root, spool = place
    job = root / "inbox" / "deep"
    job.mkdir()
    (job / "image.png").write_bytes(png())
    (job / "mask.png").write_bytes(mask_bytes())
    fd = os.open(job, os.O_RDONLY)
    try:
        for _ in range(1100):  # relative mkdirs: the full path would pass PATH_MAX
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    claim = spool.claim(root / "inbox", JobGroup("deep", "deep/image.png", "deep/mask.png", None, ("deep",), "deep", 0),
                        arrived=1.0)
    assert spool.oversized_inputs(claim, 10) == {"deep/image.png": len(png()), "deep/mask.png": len(mask_bytes())}
    assert "nests folders more than" in spool.unsafe_inputs(claim)["deep"]
    folder = fail_claim(spool, claim, JobError("job_unsafe", "deep"), root / "failed", 1.0)
    assert sorted(os.listdir(folder)) == ["d", "error.json", "image.png", "mask.png"]
    # pytest's own clean-up of old temp folders recurses: remove the tree here (rm is iterative).
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_an_input_named_error_json_is_kept_beside_the_record(place) -> None:
    root, spool = place
    job = root / "inbox" / "notes"
    job.mkdir()
    (job / "image.png").write_bytes(png())
    (job / "error.json").write_text('{"my": "own notes"}')
    claim = spool.claim(root / "inbox", JobGroup("notes", "notes/image.png", None, None, ("notes",), "notes", 0), 1.0)
    folder = fail_claim(spool, claim, JobError("mask_missing", "no mask"), root / "failed", 1.0)
    record = json.loads((folder / "error.json").read_text())
    assert record["code"] == "mask_missing" and record["renamed_inputs"] == {"error.json": "error.json.input"}
    assert (folder / "error.json.input").read_text() == '{"my": "own notes"}'


@pytest.fixture
def unprivileged_daemon(tiny_model: Path, tmp_path: Path):
    """One daemon without CAP_DAC_OVERRIDE (as the service runs), so permissions bind it."""
    from chaos import namespace_unavailable

    reason = namespace_unavailable()
    if reason:
        pytest.skip(reason)
    dirs = Dirs.make(tmp_path / "u", tiny_model, SETTINGS)
    daemon = Daemon(dirs, wrapper=["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]).start()
    yield dirs, daemon
    daemon.stop()


def test_live_read_only_folders_never_hold_anything_and_are_recorded(unprivileged_daemon) -> None:
    dirs, daemon = unprivileged_daemon

    def folder(name: str, mode: int | None = None, sub_mode: int | None = None) -> None:
        staging = dirs.root / f"up-{name}"
        staging.mkdir()
        (staging / "image.png").write_bytes(png())
        (staging / "mask.png").write_bytes(mask_bytes())
        (staging / "prompt.txt").write_text("x")
        if sub_mode is not None:
            (staging / "sub").mkdir()
            (staging / "sub" / "notes.txt").write_text("kept")
            os.chmod(staging / "sub", sub_mode)
        if mode is not None:
            os.chmod(staging, mode)
        os.rename(staging, dirs.inbox / name)

    folder("ro", mode=0o555)  # scp -rp of a read-only folder: cannot be renamed out of the inbox
    folder("rosub", sub_mode=0o555)  # a read-only subfolder: the job folder moves whole
    drop_job(dirs.inbox, "good")
    found = wait_for(dirs, ["ro", "rosub", "good"], 90)
    assert [o.kind for o in found.get("good", [])] == ["done"]
    assert [o.kind for o in found.get("rosub", [])] == ["done"]
    assert [o.code for o in found.get("ro", [])] == ["input_unmovable"]
    assert (dirs.inbox / "ro" / "image.png").exists()  # left where it was, untouched
    archived = [p for p in dirs.archive.iterdir() if p.name.startswith("rosub")]
    assert archived and (archived[0] / "sub" / "notes.txt").read_text() == "kept"
    held = read_status(dirs.state).get("held") or []
    assert held == [] and daemon.alive()


def inotify_watches(pid: int) -> int:
    """How many inotify watches a process holds (the `inotify wd:` lines of its fds' fdinfo)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        count += text.count("inotify wd:")
    return count


def test_live_watches_of_job_folders_that_left_the_inbox_are_released(tiny_model: Path, tmp_path: Path) -> None:
    dirs = Dirs.make(tmp_path / "w", tiny_model, SETTINGS)
    daemon = Daemon(dirs).start()
    try:
        staging = dirs.root / "up"
        staging.mkdir()
        (staging / "image.png").write_bytes(png())
        (staging / "mask.png").write_bytes(mask_bytes())
        (staging / "prompt.txt").write_text("x")
        for index in range(300):
            (staging / f"sub{index}").mkdir()
        os.rename(staging, dirs.inbox / "many")
        found = wait_for(dirs, ["many"], 60)
        assert [o.kind for o in found["many"]] == ["done"]
        deadline = time.monotonic() + 20
        while inotify_watches(daemon.pid) > 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert inotify_watches(daemon.pid) <= 20  # not the 300 subfolders now in archive/
        drop_job(dirs.inbox, "after")
        assert [o.kind for o in wait_for(dirs, ["after"], 60)["after"]] == ["done"]
    finally:
        daemon.stop()
