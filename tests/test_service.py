"""The daemon as a real subprocess (`python -m inpaintd run`) on real folders with the tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from inpaintd.core.boundary import retry_delay
from inpaintd.core.config import RoiConfig, config_from_dict
from inpaintd.intake.grouping import JobGroup
from inpaintd.service.daemon import Service, warm_shapes, work_shapes
from inpaintd.service.queues import ArrivalQueue
from inpaintd.store.spool import Spool
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow


def png_bytes(path: Path, size: int = 64, rgba: bool = False) -> bytes:
    Image.new("RGBA" if rgba else "RGB", (size, size), (200, 100, 50, 255)).save(path)
    return path.read_bytes()


def mask_bytes(path: Path, size: int = 64) -> bytes:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle([size // 3, size // 3, size // 2, size // 2], fill=255)
    m.save(path)
    return path.read_bytes()


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Daemon:
    """Folders, a config file and the daemon process; logs are JSON lines in a file."""

    def __init__(self, root: Path, model: Path, **overrides: Any) -> None:
        self.root = root
        self.dirs = {k: root / k for k in ("inbox", "outbox", "failed", "archive", "state")}
        for d in self.dirs.values():
            d.mkdir(exist_ok=True)
        self.samples = root / "samples"
        self.samples.mkdir(exist_ok=True)
        self.image = png_bytes(self.samples / "image.png")
        self.mask = mask_bytes(self.samples / "mask.png")
        self.config = {
            "model": {"path": str(model), "threads": 1, "dtype": "fp32", "cache_dir": str(root / "cache")},
            "inference": {"steps": 3, "prompt": "a test"},
            "roi": {"min_size": 64, "max_size": 64, "bucket_sides": [64], "padding": 8, "dilate": 2,
                    "feather": 2, "merge_gap": 8},
            "paths": {k: str(v) for k, v in self.dirs.items()},
            "watch": {"observer": "inotify", "settle_seconds": 0.2, "poll_interval": 0.1,
                      "incomplete_timeout": 30, "rescan_interval": 5},
            "limits": {"poison_after": 3},
            "service": {"shutdown_timeout": 20},
            "logging": {"format": "json", "level": "info"},
        }
        for section, values in overrides.items():
            self.config.setdefault(section, {}).update(values)
        self.config_path = root / "config.yaml"
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "daemon.log"
        self.notify_path = root / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.notifications: list[str] = []
        self._reading = True
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()

    def _read_notify(self) -> None:
        """Like systemd, read notifications as they come: a full socket would block the daemon."""
        while self._reading:
            try:
                self.notifications.extend(self.notify.recv(4096).decode().split("\n"))
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")

    def start(self, wait_ready: bool = True) -> "Daemon":
        # A watchdog interval without WATCHDOG_PID, as systemd gives the main process: ping every 0.5 s.
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), WATCHDOG_USEC="2000000")
        env.pop("WATCHDOG_PID", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inpaintd", "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        if wait_ready:
            wait_until(lambda: "READY=1" in self.read_notifications() or self._died(), 120, "READY=1")
            assert self.proc.poll() is None, self.log_text()
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def read_notifications(self) -> list[str]:
        return list(self.notifications)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reading = False
        self._reader.join()
        self.notify.close()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.dirs["state"] / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def drop(self, name: str, *, mask: bool = True, via_temp: bool = True, image: bytes | None = None) -> None:
        """Put a job in the inbox the way scp/rsync clients do: temporary name, then rename."""
        parts = {f"{name}.png": image or self.image}
        if mask:
            parts[f"{name}.mask.png"] = self.mask
        for filename, data in parts.items():
            final = self.dirs["inbox"] / filename
            temp = final.with_name(final.name + ".part") if via_temp else final
            temp.write_bytes(data)
            if via_temp:
                temp.rename(final)

    def wait_done(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        sidecar = self.dirs["outbox"] / f"{name}.json"
        wait_until(lambda: sidecar.exists() or self._died(), timeout, f"{sidecar}")
        assert sidecar.exists(), self.log_text()
        return json.loads(sidecar.read_text())

    def wait_failed(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        error = self.dirs["failed"] / name / "error.json"
        wait_until(lambda: error.exists() or self._died(), timeout, f"{error}")
        assert error.exists(), self.log_text()
        return json.loads(error.read_text())


@pytest.fixture
def make_daemon(tmp_path: Path, tiny_model: Path):
    made: list[Daemon] = []

    def make(**overrides: Any) -> Daemon:
        d = Daemon(tmp_path, tiny_model, **overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_a_job_uploaded_under_a_temp_name_is_painted_published_and_archived(make_daemon, observer):
    d = make_daemon(watch={"observer": observer})
    (d.dirs["inbox"] / "early.png").write_bytes(d.image)  # already there at start-up
    (d.dirs["inbox"] / "early.mask.png").write_bytes(d.mask)
    d.start()
    d.drop("cat")
    for name in ("early", "cat"):
        sidecar = d.wait_done(name)
        assert sidecar["status"] == "done" and sidecar["output_file"] == f"{name}.png"
        assert sidecar["job_id"] and sidecar["host"] and sidecar["daemon_version"]
        assert sidecar["queue_wait_seconds"] >= 0 and sidecar["started"] <= sidecar["finished"]
        assert sidecar["parameters"]["steps"] == 3 and isinstance(sidecar["seed"], int)
        archived = d.dirs["archive"] / name / f"{name}.png"
        wait_until(archived.exists, 10, "the inputs in the archive")  # moved after publication
        assert archived.read_bytes() == d.image
    assert sorted(os.listdir(d.dirs["inbox"])) == []
    assert d.stop() == 0
    notes = d.read_notifications()
    assert notes.index("STATUS=warming up 1/1") < notes.index("READY=1") < notes.index("STOPPING=1")
    assert "WATCHDOG=1" in notes and any(n.startswith("STATUS=idle, 0 queued") for n in notes)
    events = {e["event"] for e in d.events()}
    assert {"job.detected", "job.ready", "job.started", "job.done"} <= events
    done = {e["job"]: e for e in d.events("job.done")}
    assert set(done) == {"early", "cat"} and "total_seconds" in done["early"]["timings"]
    assert json.loads((d.dirs["state"] / "status.json").read_text())["state"] == "stopped"


def test_a_file_written_slowly_in_chunks_is_not_taken_before_it_is_complete(make_daemon):
    d = make_daemon()
    d.start()
    (d.dirs["inbox"] / "slow.mask.png").write_bytes(d.mask)
    with open(d.dirs["inbox"] / "slow.png", "wb") as f:
        for i in range(0, len(d.image), 40):
            f.write(d.image[i:i + 40])
            f.flush()
            time.sleep(0.4)  # twice the settle time: only the missing close-write holds it back
    assert d.wait_done("slow")["inputs"]["image"]["bytes"] == len(d.image)
    assert d.stop() == 0


def test_with_polling_a_slow_writer_is_held_back_by_the_settle_time(make_daemon):
    d = make_daemon(watch={"observer": "polling", "settle_seconds": 0.6})
    d.start()
    (d.dirs["inbox"] / "slow.mask.png").write_bytes(d.mask)
    with open(d.dirs["inbox"] / "slow.png", "wb") as f:
        for i in range(0, len(d.image), 20):
            f.write(d.image[i:i + 20])
            f.flush()
            time.sleep(0.15)
    assert d.wait_done("slow")["inputs"]["image"]["bytes"] == len(d.image)
    assert d.stop() == 0


def test_parts_arriving_apart_wait_and_a_part_that_never_comes_fails_the_job_naming_it(make_daemon):
    d = make_daemon(watch={"incomplete_timeout": 2.5})
    d.start()
    d.drop("late", mask=False)
    d.drop("never", mask=False)
    time.sleep(1.5)
    assert os.listdir(d.dirs["outbox"]) == []
    (d.dirs["inbox"] / "late.mask.png").write_bytes(d.mask)
    d.wait_done("late")
    error = d.wait_failed("never")
    assert error["code"] == "job_incomplete" and "mask" in error["message"] and "never.mask." in error["message"]
    assert sorted(os.listdir(d.dirs["failed"] / "never")) == ["error.json", "never.png"]
    assert [e["code"] for e in d.events("job.failed")] == ["job_incomplete"]
    assert d.stop() == 0


def test_junk_is_ignored_duplicates_fail_clearly_and_outputs_are_never_overwritten(make_daemon):
    d = make_daemon()
    d.start()
    inbox = d.dirs["inbox"]
    junk = [".DS_Store", "._dup.png", "Thumbs.db", "x.png.part", "y.tmp", ".z.png.a1B2c3", "~$lock.docx"]
    for name in junk:
        (inbox / name).write_bytes(b"junk")
    (inbox / "dup.jpg").write_bytes(d.image)
    d.drop("dup")
    (d.dirs["outbox"] / "cat.png").write_bytes(b"someone else's")
    d.drop("cat")
    error = d.wait_failed("dup")
    assert error["code"] == "job_ambiguous" and "dup.jpg, dup.png" in error["message"]
    sidecar = d.wait_done("cat-1")
    assert sidecar["output_file"] == "cat-1.png" and sidecar["renamed_from"] == "cat.png"
    assert (d.dirs["outbox"] / "cat.png").read_bytes() == b"someone else's"
    time.sleep(0.5)
    assert sorted(os.listdir(inbox)) == sorted(junk)
    skipped = {e["file"] for e in d.events("file.skipped")}
    assert skipped == set(junk)
    assert d.stop() == 0


def test_a_job_folder_and_an_image_with_alpha_need_no_separate_mask_file(make_daemon):
    d = make_daemon()
    d.start()
    folder = d.dirs["inbox"] / "tmp-upload"
    folder.mkdir()
    (folder / "image.png").write_bytes(d.image)
    (folder / "mask.png").write_bytes(d.mask)
    (folder / "job.yaml").write_text("prompt: a folder job\nsteps: 2\n")
    folder.rename(d.dirs["inbox"] / "boxed")
    sidecar = d.wait_done("boxed")
    assert sidecar["parameters"]["prompt"] == "a folder job" and sidecar["parameters"]["steps"] == 2
    wait_until((d.dirs["archive"] / "boxed" / "job.yaml").exists, 10, "the archived folder")
    assert sorted(os.listdir(d.dirs["archive"] / "boxed")) == ["image.png", "job.yaml", "mask.png"]
    alpha = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    ImageDraw.Draw(alpha).rectangle([20, 20, 30, 30], fill=(0, 0, 0, 0))
    alpha.save(d.samples / "alpha.png")
    d.drop("alpha", mask=False, image=(d.samples / "alpha.png").read_bytes())
    assert d.wait_done("alpha")["inputs"]["mask"] == {"source": "alpha"}
    assert d.stop() == 0


def test_symlinks_and_fifos_in_the_inbox_are_failed_as_unsafe_without_being_followed(make_daemon, tmp_path):
    d = make_daemon()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private")
    d.start()
    (d.dirs["inbox"] / "link.mask.png").write_bytes(d.mask)
    (d.dirs["inbox"] / "link.png").symlink_to(secret)
    os.mkfifo(d.dirs["inbox"] / "pipe.png")
    assert d.wait_failed("link")["code"] == "job_unsafe"
    assert d.wait_failed("pipe")["code"] == "job_unsafe"
    assert (d.dirs["failed"] / "link" / "link.png").is_symlink() and secret.read_bytes() == b"private"
    assert d.stop() == 0


def test_claimed_jobs_left_by_a_previous_run_are_processed_at_start(make_daemon):
    d = make_daemon()
    inbox = d.dirs["inbox"]
    spool = Spool(d.dirs["state"])
    spool.open(inbox)
    for name in ("first", "second"):
        (inbox / f"{name}.png").write_bytes(d.image)
        (inbox / f"{name}.mask.png").write_bytes(d.mask)
    spool.claim(inbox, JobGroup("second", "second.png", "second.mask.png", None,
                                ("second.mask.png", "second.png"), None, 0), arrived=time.time() - 10)
    spool.claim(inbox, JobGroup("first", "first.png", "first.mask.png", None,
                                ("first.mask.png", "first.png"), None, 0), arrived=time.time() - 20)
    spool.close()
    d.start()
    d.wait_done("first")
    d.wait_done("second")
    assert [e["job"] for e in d.events("job.started")] == ["first", "second"]
    wait_until(lambda: os.listdir(d.dirs["state"] / "claimed") == [], 10, "the claims to be finished")
    assert d.stop() == 0


def test_sigterm_mid_job_exits_cleanly_and_the_job_completes_later_exactly_once(make_daemon):
    d = make_daemon(inference={"steps": 150}, roi={"min_size": 128, "max_size": 128, "bucket_sides": [128]})
    d.image = png_bytes(d.samples / "big.png", 128)
    d.mask = mask_bytes(d.samples / "big.mask.png", 128)
    d.start()
    d.drop("long")
    wait_until(lambda: (d.status().get("current") or {}).get("step", 0) >= 2, 60, "a running job")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 20
    (claim,) = (d.dirs["state"] / "claimed").iterdir()
    record = json.loads((claim / "job.json").read_text())
    assert record["name"] == "long" and record["attempts"] == 0  # an interruption is not a crash
    assert os.listdir(d.dirs["outbox"]) == [] and os.listdir(d.dirs["inbox"]) == []
    assert d.events("job.interrupted")
    d.config["inference"]["steps"] = 3  # the job keeps its own options; only its speed changes
    d.write_config()
    d.start()
    sidecar = d.wait_done("long")
    assert sidecar["job_id"] == record["job_id"]
    wait_until(lambda: os.listdir(d.dirs["archive"]) == ["long"], 10, "the archive")
    time.sleep(0.5)
    assert sorted(os.listdir(d.dirs["outbox"])) == ["long.json", "long.png"]
    assert d.stop() == 0


def test_a_job_that_keeps_killing_the_daemon_goes_to_failed_as_poison(make_daemon):
    d = make_daemon(inference={"steps": 150}, roi={"min_size": 128, "max_size": 128, "bucket_sides": [128]},
                    limits={"poison_after": 1})
    d.image = png_bytes(d.samples / "big.png", 128)
    d.mask = mask_bytes(d.samples / "big.mask.png", 128)
    d.start()
    d.drop("poison")
    wait_until(lambda: (d.status().get("current") or {}).get("step", 0) >= 1, 60, "a running job")
    d.proc.kill()  # as if the job had crashed the daemon (OOM killer, segfault)
    d.proc.wait()
    d.start()
    error = d.wait_failed("poison")
    assert error["code"] == "poison_job" and error["attempts"] == 1
    assert sorted(os.listdir(d.dirs["failed"] / "poison")) == ["error.json", "poison.mask.png", "poison.png"]
    assert d.stop() == 0


def test_an_unwritable_outbox_keeps_the_job_claimed_and_it_completes_once_the_outbox_is_back(make_daemon):
    d = make_daemon()
    d.start()
    away = d.root / "outbox-away"
    d.dirs["outbox"].rename(away)
    d.drop("held")
    wait_until(lambda: "outbox" in (d.status().get("health") or ""), 30, "health to name the outbox")
    assert "retrying" in d.status()["health"]
    (claim,) = (d.dirs["state"] / "claimed").iterdir()
    assert sorted(os.listdir(claim / "inputs")) == ["held.mask.png", "held.png"]
    assert any("outbox" in n and "retrying" in n for n in d.read_notifications() if n.startswith("STATUS="))
    away.rename(d.dirs["outbox"])
    d.wait_done("held")
    wait_until(lambda: d.status().get("health") is None, 10, "health to clear")
    assert d.stop() == 0


def test_sighup_reloads_what_is_safe_and_says_the_model_needs_a_restart(make_daemon):
    d = make_daemon()
    d.start()
    d.config["output"] = {"after_success": "delete"}
    d.config["model"]["threads"] = 2
    d.write_config()
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.events("config.reloaded"), 10, "config.reloaded")
    assert d.events("config.reload_needs_restart")[0]["section"] == "model"
    d.drop("gone")
    d.wait_done("gone")
    wait_until(lambda: not (d.dirs["state"] / "claimed").exists() or not os.listdir(d.dirs["state"] / "claimed"))
    assert os.listdir(d.dirs["archive"]) == []
    assert d.stop() == 0


def test_an_unexpected_error_fails_that_job_as_internal_error_and_the_loop_goes_on(tmp_path, tiny_engine):
    config = config_from_dict({"paths": {k: str(tmp_path / k) for k in ("inbox", "outbox", "failed", "archive",
                                                                        "state")},
                               "roi": {"min_size": 64, "max_size": 64, "bucket_sides": [64]},
                               "inference": {"steps": 2, "prompt": "x"}})
    svc = Service(config, None)
    for key in ("inbox", "outbox", "failed", "archive", "state"):
        getattr(config.paths, key).mkdir()
    svc.spool.open(config.paths.inbox)
    from inpaintd.store.status import StatusFile

    svc.status = StatusFile(config.paths.state)

    class Broken:  # the real engine's attributes, an inpaint that raises
        info = tiny_engine.info
        model_defaults = tiny_engine.model_defaults
        has_draft_decoder = False

        def inpaint(self, *args, **kwargs):
            raise RuntimeError("boom")

    inbox = config.paths.inbox
    for name in ("bad", "good"):
        png_bytes(inbox / f"{name}.png")
        mask_bytes(inbox / f"{name}.mask.png")
    group = lambda n: JobGroup(n, f"{n}.png", f"{n}.mask.png", None, (f"{n}.mask.png", f"{n}.png"), None, 0)  # noqa
    svc.engine = Broken()
    svc.process(svc.spool.claim(inbox, group("bad"), arrived=time.time()))
    error = json.loads((config.paths.failed / "bad" / "error.json").read_text())
    assert error["code"] == "internal_error" and "RuntimeError: boom" in error["message"]
    svc.engine = tiny_engine
    svc.process(svc.spool.claim(inbox, group("good"), arrived=time.time()))
    assert (config.paths.outbox / "good.json").exists()
    assert svc.status.data["jobs_done"] == 1 and svc.status.data["jobs_failed"] == 1
    svc.spool.close()


def test_work_shapes_are_the_aspect_buckets_of_every_side_up_to_the_cap_and_retries_back_off():
    shapes = work_shapes(RoiConfig(min_size=256, max_size=384, bucket_sides=(256, 384, 512)))
    assert shapes[0] == (256, 256) and len(shapes) == 2 * 15 and max(map(max, shapes)) == 384
    assert {w * 8 // max(w, h) for w, h in shapes} == set(range(1, 9))  # aspects k:8 .. 8:k
    assert work_shapes(RoiConfig(min_size=64, max_size=64, bucket_sides=(128,)))[0] == (128, 128)
    assert [retry_delay(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 60.0]


def test_start_up_warms_every_shape_only_for_a_compiled_unet():
    roi = RoiConfig(min_size=256, max_size=384, bucket_sides=(256, 384, 512))
    assert warm_shapes(roi, "inductor") == work_shapes(roi)
    assert warm_shapes(roi, "off") == [(256, 256)]


def test_the_queue_runs_jobs_by_arrival_not_by_when_they_became_ready(tmp_path):
    from inpaintd.store.spool import Claim

    def claim(name: str, arrived: float) -> Claim:
        return Claim(tmp_path / name, {"job_id": name, "name": name, "arrived": arrived})

    jobs = ArrivalQueue()
    # Ready in this order; "late" arrived first but its close was confirmed last.
    for name, arrived in (("b", 20.0), ("c", 30.0), ("tie-1", 40.0), ("tie-2", 40.0), ("late", 10.0)):
        jobs.put(claim(name, arrived))
    assert jobs.names() == ["late", "b", "c", "tie-1", "tie-2"] and jobs.qsize() == 5
    assert [jobs.get().name for _ in range(5)] == ["late", "b", "c", "tie-1", "tie-2"]
    assert jobs.empty()
