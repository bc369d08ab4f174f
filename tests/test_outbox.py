"""outbox: atomic publication, distinct names, archive/failed moves, transient trouble."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
from inpaintd.core.errors import JobError, TransientError
from inpaintd.core.jobs import JobResult
from inpaintd.intake.grouping import JobGroup
from inpaintd.store import outbox
from inpaintd.store.outbox import publish, remove_temp_files, settle_publication
from inpaintd.store.records import archive_inputs, fail_claim


def result(name: str = "cat", data: bytes = b"PNGDATA") -> JobResult:
    return JobResult(name=name, image_bytes=data, extension="png", sidecar={"schema": "x", "seed": 7})


def claimed(place, name="cat"):
    root, spool = place
    for n in (f"{name}.png", f"{name}.mask.png"):
        (root / "inbox" / n).write_bytes(n.encode())
    group = JobGroup(name, f"{name}.png", f"{name}.mask.png", None, (f"{name}.mask.png", f"{name}.png"), None, 0)
    return spool.claim(root / "inbox", group, arrived=1000.0)


def test_the_image_and_its_sidecar_are_published_with_the_daemons_fields(tmp_path: Path):
    image, sidecar = publish(tmp_path, result(), {"job_id": "J1", "queue_wait_seconds": 1.5})
    assert image.name == "cat.png" and image.read_bytes() == b"PNGDATA"
    data = json.loads(sidecar.read_text())
    assert data["status"] == "done" and data["job_id"] == "J1" and data["seed"] == 7
    assert data["output_file"] == "cat.png" and data["sidecar_file"] == "cat.json"
    assert sorted(os.listdir(tmp_path)) == ["cat.json", "cat.png"]  # no temp file left behind


def test_an_existing_output_is_never_overwritten_a_distinct_name_is_recorded(tmp_path: Path):
    (tmp_path / "cat.png").write_bytes(b"theirs")
    (tmp_path / "cat-1.json").write_text("{}")
    image, sidecar = publish(tmp_path, result(), {})
    assert (image.name, sidecar.name) == ("cat-2.png", "cat-2.json")
    assert (tmp_path / "cat.png").read_bytes() == b"theirs"
    data = json.loads(sidecar.read_text())
    assert data["output_file"] == "cat-2.png" and data["renamed_from"] == "cat.png"


def test_a_missing_outbox_or_a_full_disk_is_transient_and_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    with pytest.raises(TransientError, match="missing"):
        publish(tmp_path / "nope", result(), {})
    real = outbox.OsFs.link

    def full_on_sidecar(self, src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, src, dst)

    monkeypatch.setattr(outbox.OsFs, "link", full_on_sidecar)
    with pytest.raises(TransientError) as info:
        publish(tmp_path, result(), {})
    assert info.value.code == "disk_full"
    assert os.listdir(tmp_path) == []  # the image linked before the sidecar failed was taken back


def test_a_concurrent_reader_never_sees_a_partial_output(tmp_path: Path):
    payload = os.urandom(3 << 20)
    stop = threading.Event()
    problems: list[str] = []
    seen = set()

    def reader() -> None:
        while not stop.is_set():
            for name in os.listdir(tmp_path):
                if name.startswith("."):
                    continue  # the writer's temp file, invisible by the contract
                try:
                    data = (tmp_path / name).read_bytes()
                except FileNotFoundError:
                    continue
                seen.add(name)
                if name.endswith(".png") and data != payload:
                    problems.append(f"{name}: {len(data)} bytes")
                if name.endswith(".json"):
                    json.loads(data)
                    if not (tmp_path / json.loads(data)["output_file"]).exists():
                        problems.append(f"{name} visible before its image")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(8):
            publish(tmp_path, result(data=payload), {})
    finally:
        stop.set()
        thread.join()
    assert not problems
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".png")]) == 8 and seen


def reject(place, name, entries, folder, error):
    """What the intake does with a rejected job: claim it as failing, then file it in failed/."""
    root, spool = place
    rejection = {"code": error.code, "message": error.message, "details": error.details}
    claim = spool.claim_rejected(root / "inbox", name, entries, folder, 1.0, rejection)
    assert claim is not None and claim.state == "failing"
    return fail_claim(spool, claim, error, root / "failed", 1.0) / "error.json"


def test_after_success_inputs_are_archived_or_deleted_and_the_claim_is_gone(place):
    root, spool = place
    claim = claimed(place)
    target = archive_inputs(spool, claim, root / "archive", "archive")
    assert target == root / "archive" / "cat" and sorted(os.listdir(target)) == ["cat.mask.png", "cat.png"]
    assert not claim.dir.exists()
    claim = claimed(place)
    assert archive_inputs(spool, claim, root / "archive", "archive") == root / "archive" / "cat-1"
    claim = claimed(place)
    assert archive_inputs(spool, claim, root / "archive", "delete") is None
    assert not claim.dir.exists() and sorted(os.listdir(root / "archive")) == ["cat", "cat-1"]


def test_a_failed_job_lands_in_failed_name_with_its_inputs_and_error_json(place):
    root, spool = place
    claim = claimed(place)
    spool.begin_attempt(claim, 3)
    error = JobError("mask_empty", "the mask selects no pixel", {"threshold": 127})
    folder = fail_claim(spool, claim, error, root / "failed", now=2000.0)
    assert folder == root / "failed" / "cat"
    path = folder / "error.json"
    record = json.loads(path.read_text())
    assert (record["code"], record["message"], record["details"]) == ("mask_empty", "the mask selects no pixel",
                                                                       {"threshold": 127})
    assert record["job"] == "cat" and record["attempts"] == 1 and record["job_id"] == claim.job_id
    assert sorted(os.listdir(path.parent)) == ["cat.mask.png", "cat.png", "error.json"]
    assert not claim.dir.exists()
    second = fail_claim(spool, claimed(place), error, root / "failed", now=2001.0)
    assert second.name == "cat-1"
    assert sorted(os.listdir(root / "failed")) == ["cat", "cat-1"]  # no staging folder left behind


def test_a_rejected_unsafe_entry_is_moved_itself_never_read_through(place, tmp_path: Path):
    root, _ = place
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (root / "inbox" / "s.png").symlink_to(secret)
    os.mkfifo(root / "inbox" / "s.mask.png")
    error = JobError("job_unsafe", "unsafe inbox entry")
    path = reject(place, "s", ("s.mask.png", "s.png"), None, error)
    moved = path.parent
    assert (moved / "s.png").is_symlink() and os.readlink(moved / "s.png") == str(secret)
    assert secret.read_text() == "private" and list((root / "inbox").iterdir()) == []
    assert json.loads(path.read_text())["inputs"] == ["s.mask.png", "s.png"]


def test_a_rejected_job_folder_keeps_its_contents_together(place):
    root, _ = place
    (root / "inbox" / "f").mkdir()
    (root / "inbox" / "f" / "image.png").write_bytes(b"x")
    error = JobError("job_incomplete", "missing mask")
    path = reject(place, "f", ("f",), "f", error)
    assert sorted(os.listdir(path.parent)) == ["error.json", "image.png"]
    assert not (root / "inbox" / "f").exists()


# ---------------------------------------------------------------- a stop in the middle of publication


class Stop(BaseException):
    """Stands in for kill -9 at a chosen point (nothing after it runs)."""


def staged_claim(place, stop_at: str | None = None):
    """A claim painted and staged, its publication stopped at `stop_at` ("image": before the
    image's link, "linked": after it, before the claim recorded it, "sidecar": before the
    sidecar's link); the claim as the next start loads it."""
    root, spool = place
    claim = claimed(place)
    progress = outbox.stage(claim.dir, result(), {"job_id": claim.job_id})
    spool.mark(claim, "publishing", publishing=progress)
    real = outbox.OsFs.link

    def link(self, src, dst):
        if stop_at == "image" and str(dst).endswith(".png"):
            raise Stop
        if stop_at == "sidecar" and str(dst).endswith(".json"):
            raise Stop
        return real(self, src, dst)

    def record(step):
        if stop_at == "linked" and step.get("linked"):
            raise Stop
        spool.mark(claim, "publishing", publishing=step)

    outbox.OsFs.link = link
    try:
        outbox.publish_staged(root / "outbox", claim.dir, progress, record)
    except Stop:
        pass
    finally:
        outbox.OsFs.link = real
    return spool.load(claim.dir)


@pytest.mark.parametrize("stop_at", ["image", "linked", "sidecar"])
def test_a_publication_stopped_anywhere_goes_on_from_the_claim_to_one_complete_result(place, stop_at):
    root, spool = place
    claim = staged_claim(place, stop_at)
    assert claim.state == "publishing" and claim.record["publishing"]["image"] == "cat.png"
    if stop_at == "image":
        assert os.listdir(root / "outbox") == []  # names recorded before anything is out
    image, sidecar = outbox.publish_staged(root / "outbox", claim.dir, claim.record["publishing"],
                                           lambda step: spool.mark(claim, "publishing", publishing=step))
    assert (image, sidecar) == ("cat.png", "cat.json")
    assert sorted(os.listdir(root / "outbox")) == ["cat.json", "cat.png"]
    assert json.loads((root / "outbox" / "cat.json").read_text())["job_id"] == claim.job_id
    assert (root / "outbox" / "cat.png").read_bytes() == b"PNGDATA"


def test_a_taken_over_claim_can_publish_nothing(place):
    from inpaintd.core.errors import TakenOver

    root, spool = place
    claim = staged_claim(place, "sidecar")  # the image is out, the sidecar not yet
    moved = root / "state" / "other-device" / claim.dir.name
    moved.parent.mkdir()
    os.rename(claim.dir, moved)  # what a take-over does (the claim keeps its job id as its name)
    with pytest.raises(TakenOver):
        outbox.publish_staged(root / "outbox", claim.dir, claim.record["publishing"],
                              lambda step: spool.mark(claim, "publishing", publishing=step))
    assert os.listdir(root / "outbox") == ["cat.png"]  # nothing removed, nothing added
    new_owner = spool.load(moved)
    outbox.publish_staged(root / "outbox", moved, new_owner.record["publishing"],
                          lambda step: spool.mark(new_owner, "publishing", publishing=step))
    assert sorted(os.listdir(root / "outbox")) == ["cat.json", "cat.png"]


def test_an_identical_image_of_another_job_is_never_taken_for_ours(place):
    root, spool = place
    (root / "outbox" / "cat.png").write_bytes(b"PNGDATA")  # same bytes, another job's file
    claim = staged_claim(place, "image")
    assert os.listdir(root / "outbox") == ["cat.png"]
    image, sidecar = outbox.publish_staged(root / "outbox", claim.dir, claim.record["publishing"],
                                           lambda step: spool.mark(claim, "publishing", publishing=step))
    assert (image, sidecar) == ("cat-1.png", "cat-1.json")


def legacy_claim(place):
    """A claim an older version left publishing: names recorded, nothing staged."""
    import hashlib

    root, spool = place
    claim = claimed(place)
    names = {"image": "cat.png", "sidecar": "cat.json", "sha256": hashlib.sha256(b"PNGDATA").hexdigest()}
    spool.mark(claim, "publishing", publishing=names)
    return claim, names


def test_an_older_versions_image_left_without_its_sidecar_is_removed_and_the_job_is_not_published(place):
    root, spool = place
    claim, names = legacy_claim(place)
    (root / "outbox" / "cat.png").write_bytes(b"PNGDATA")
    assert settle_publication(root / "outbox", claim.job_id, names) is False
    assert os.listdir(root / "outbox") == []
    (root / "outbox" / "cat.png").write_bytes(b"PNGDATA")  # shared: taken back into the claim instead
    assert settle_publication(root / "outbox", claim.job_id, names, claim.dir, shared=True) is False
    assert os.listdir(root / "outbox") == [] and any(claim.dir.joinpath("out").iterdir())


def test_a_sidecar_of_this_job_means_published_and_another_writers_files_are_never_touched(place):
    root, spool = place
    claim, names = legacy_claim(place)
    (root / "outbox" / "cat.png").write_bytes(b"PNGDATA")
    (root / "outbox" / "cat.json").write_text(json.dumps({"job_id": claim.job_id}))
    assert settle_publication(root / "outbox", claim.job_id, names) is True
    assert sorted(os.listdir(root / "outbox")) == ["cat.json", "cat.png"]
    assert settle_publication(root / "outbox", "another-job", names) is False
    # Someone else's image under the recorded name (different bytes), no sidecar: left alone.
    (root / "outbox" / "cat.json").unlink()
    (root / "outbox" / "cat.png").write_bytes(b"theirs")
    assert settle_publication(root / "outbox", claim.job_id, names) is False
    assert (root / "outbox" / "cat.png").read_bytes() == b"theirs"


def test_temp_files_of_interrupted_writes_are_removed_and_nothing_else(tmp_path: Path):
    from inpaintd.store.fsutil import TEMP_PREFIX

    (tmp_path / f"{TEMP_PREFIX}abc123").write_bytes(b"half")
    (tmp_path / "cat.png").write_bytes(b"done")
    (tmp_path / ".hidden").write_bytes(b"not ours")
    (tmp_path / f"{TEMP_PREFIX}dir").mkdir()  # a folder copy (archive on another disk) a stop interrupted
    (tmp_path / f"{TEMP_PREFIX}dir" / "image.png").write_bytes(b"half")
    assert sorted(remove_temp_files(tmp_path)) == [f"{TEMP_PREFIX}abc123", f"{TEMP_PREFIX}dir"]
    assert sorted(os.listdir(tmp_path)) == sorted([".hidden", "cat.png"])
    assert remove_temp_files(tmp_path / "missing") == []


def test_a_failure_recorded_before_a_stop_is_not_written_twice(place, monkeypatch):
    root, spool = place
    claim = claimed(place)
    error = JobError("mask_empty", "the mask selects no pixel")

    def stop(_claim):
        raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(spool, "drop", stop)  # the stop lands after error.json, before the claim is dropped
        with pytest.raises(Stop):
            fail_claim(spool, claim, error, root / "failed", now=1.0)
    again = spool.load(claim.dir)
    assert again.state == "failing"
    path = fail_claim(spool, again, error, root / "failed", now=2.0)
    assert path is None  # the record was in place before the stop: only the drop was left
    assert sorted(os.listdir(root / "failed" / "cat")) == ["cat.mask.png", "cat.png", "error.json"]
    assert sorted(os.listdir(root / "failed")) == ["cat"] and not claim.dir.exists()


def test_distinct_names_never_run_out_in_the_outbox_or_failed(tmp_path: Path) -> None:
    # A client that always uploads scan.jpg takes scan-9999 in about a week at one job a minute:
    # the next result and the next record still get a name of their own (with the job's token),
    # and nothing is left outside the folder the contract promises.
    from inpaintd.core.jobs import JobResult, distinct_names
    from inpaintd.store.fsutil import rename_distinct
    from inpaintd.store.outbox import publish

    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    outbox.mkdir()
    failed.mkdir()
    for stem in list(distinct_names("scan", "20261204T000000Z-00000000"))[:-1]:  # scan .. scan-9999
        (outbox / f"{stem}.png").write_bytes(b"")
        (failed / stem).mkdir()
    result = JobResult(name="scan", image_bytes=b"png", extension="png", sidecar={})
    image, sidecar = publish(outbox, result, {"job_id": "20261204T120000Z-1234abcd"})
    assert (image.name, sidecar.name) == ("scan-1234abcd.png", "scan-1234abcd.json")
    record = tmp_path / "staging"
    record.mkdir()
    assert rename_distinct(record, failed, "scan", "20261204T120000Z-1234abcd") == failed / "scan-1234abcd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed", "outbox"]
