"""A device nobody watches, live: the metrics textfile, retention on a running daemon, and the
low-disk guard on a small tmpfs outbox filled by another process."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_retention import make_failed, make_outbox_pair
from test_service import Daemon, wait_until


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Reader(threading.Thread):
    """Reads the metrics file as fast as it can while the daemon rewrites it: every read must parse."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.reads, self.errors, self.running = path, 0, [], True

    def run(self) -> None:
        while self.running:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                continue
            try:
                names = {f.name for f in text_string_to_metric_families(text)}
                assert "inpaintd_jobs_finished" in names and text.endswith("\n")
                self.reads += 1
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"{exc!r}: {text[-200:]!r}")


def test_live_metrics_count_the_jobs_and_retention_prunes_only_what_its_budgets_say(tmp_path, tiny_model):
    prom = tmp_path / "textfile" / "inpaintd.prom"
    prom.parent.mkdir()
    d = Daemon(tmp_path, tiny_model, metrics={"textfile": str(prom), "interval_seconds": 0.5},
               retention={"min_age_days": 1, "outbox_max_days": 30, "failed_max_bytes": 3000, "interval_seconds": 1})
    now = time.time()
    for i in range(5):
        make_outbox_pair(d.dirs["outbox"], f"old{i}", age_days=40 + i, now=now)  # past 30 days
        make_outbox_pair(d.dirs["outbox"], f"kept{i}", age_days=10 + i, now=now)
        make_failed(d.dirs["failed"], f"bad{i}", age_days=5 + i, now=now)  # over 3000 bytes: oldest go
    reader = Reader(prom)
    try:
        d.start()
        reader.start()
        for name in ("one", "two", "three"):
            d.drop(name)
        d.drop("broken", image=b"not an image at all")
        for name in ("one", "two", "three"):
            d.wait_done(name)
        d.wait_failed("broken")
        wait_until(lambda: samples(prom).get(("inpaintd_jobs_finished_total",
                                               (("code", "image_unreadable"), ("outcome", "failed")))), 15, "metrics")
        m = samples(prom)
        assert m[("inpaintd_jobs_finished_total", (("code", ""), ("outcome", "done")))] == 3
        assert m[("inpaintd_job_seconds_count", ())] == 3
        assert m[("inpaintd_denoise_step_seconds_count", ())] == 3 * 2  # steps 2 and 3 of each 3-step job
        assert m[("inpaintd_last_success_time_seconds", ())] >= now
        assert m[("inpaintd_start_time_seconds", ())] >= now - 5
        model = [k for k in m if k[0] == "inpaintd_model_info"]
        assert len(model) == 1 and ("random_weights", "true") in model[0][1]
        assert m[("inpaintd_free_bytes", (("folder", "outbox"),))] > 0
        assert m[("inpaintd_disk_guard_active", ())] == 0
        assert m[("inpaintd_retention_removed_total", (("folder", "outbox"), ("reason", "age")))] == 5
        assert m[("inpaintd_retention_removed_total", (("folder", "failed"), ("reason", "size")))] == 3
        d.stop()
    finally:
        reader.running = False
        d.close()
    reader.join(5)
    assert reader.reads > 3 and not reader.errors, reader.errors[:3]
    outbox = sorted(p.name for p in d.dirs["outbox"].iterdir())
    assert not [n for n in outbox if n.startswith("old")]  # past the age: gone, sidecar and image
    assert {f"kept{i}.{e}" for i in range(5) for e in ("png", "json")} <= set(outbox)
    assert {f"{n}.json" for n in ("one", "two", "three")} <= set(outbox)  # young: never pruned
    failed = sorted(p.name for p in d.dirs["failed"].iterdir())
    assert failed == ["bad0", "bad1", "broken"]  # the 3 oldest went; the young failure stays
    removals = [e for e in d.events("retention.removed")]
    assert len(removals) == 8 and all(e["reason"] in ("age", "size") for e in removals)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_live_low_disk_guard_stops_claiming_nothing_fails_and_claiming_resumes(tmp_path, tiny_model):
    prom = tmp_path / "inpaintd.prom"
    d = Daemon(tmp_path, tiny_model, limits={"poison_after": 3, "min_free_bytes": 2 * 1024 * 1024,
                                             "min_free_fraction": 0.0},
               metrics={"textfile": str(prom), "interval_seconds": 0.5})
    outbox = d.dirs["outbox"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(outbox)], check=True)
    try:
        d.start()
        # Another process fills the outbox's filesystem to below 2 MiB free.
        subprocess.run(["dd", "if=/dev/zero", f"of={outbox}/.filler", "bs=1M", "count=3"], check=True,
                       capture_output=True)
        d.drop("waits")
        wait_until(lambda: d.status().get("disk_guard"), 20, "the guard in status")
        assert "outbox has" in d.status()["disk_guard"] and "min_free_bytes" in d.status()["disk_guard"]
        wait_until(lambda: samples(prom).get(("inpaintd_disk_guard_active", ())) == 1, 10, "the guard in metrics")
        time.sleep(1.5)  # several looks at the inbox: the job stays there
        assert (d.dirs["inbox"] / "waits.png").exists() and not d.events("job.ready")
        assert not list(d.dirs["failed"].iterdir()) and d.events("disk.low")
        (outbox / ".filler").unlink()
        d.wait_done("waits", 30)
        assert d.events("disk.ok") and not d.status().get("disk_guard")
        d.stop()
    finally:
        d.close()
        subprocess.run(["umount", str(outbox)], check=False)


def test_fleet_gauges_say_how_many_devices_beat_and_how_old_each_heartbeat_is(tmp_path: Path) -> None:
    # The daemon's snapshot in fleet mode carries {device: heartbeat age} from Fleet.peers();
    # the file must hold the device count and one age per device (a device that never beat: none).
    from inpaintd.service.metrics import Metrics

    metrics = Metrics(tmp_path / "inpaintd.prom", interval=0.0)
    metrics.write(0.0, lambda: {"held": 0, "peers": {"dev0": 0.4, "dev1": 12.5, "dev2": None}})
    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "inpaintd.prom").read_text())}
    assert families["inpaintd_fleet_devices"].samples[0].value == 3
    ages = {s.labels["device"]: s.value for s in families["inpaintd_fleet_heartbeat_age_seconds"].samples}
    assert ages == {"dev0": 0.4, "dev1": 12.5}
    metrics.write(1.0, lambda: {"held": 0, "peers": {"dev0": 0.2}})  # a device gone from the share
    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "inpaintd.prom").read_text())}
    assert {s.labels["device"] for s in families["inpaintd_fleet_heartbeat_age_seconds"].samples} == {"dev0"}
