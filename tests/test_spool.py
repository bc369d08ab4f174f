"""spool: scanning without following links, claiming by rename, recovery, attempts and poison."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.core.errors import ConfigError, JobError
from inpaintd.intake.grouping import JobGroup, Kind
from inpaintd.intake.scan import scan_inbox
from inpaintd.paint.images import probe_alpha
from inpaintd.store.fsutil import move_entry
from inpaintd.store.spool import Spool


@pytest.fixture
def dirs(tmp_path: Path):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    spool = Spool(state)
    spool.open(inbox)
    yield inbox, spool
    spool.close()


def group(name: str, *files: str, folder: str | None = None, mask: bool = True) -> JobGroup:
    if folder:
        return JobGroup(name, f"{folder}/image.png", f"{folder}/mask.png" if mask else None, None, (folder,), folder, 0.0)
    return JobGroup(name, f"{name}.png", f"{name}.mask.png" if mask else None, None, tuple(sorted(files)), None, 0.0)


def test_scan_reports_links_fifos_and_hardlinks_without_following_them(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").symlink_to(secret)
    os.mkfifo(inbox / "b.png")
    os.link(secret, inbox / "c.png")
    (inbox / "job").mkdir()
    (inbox / "job" / "image.png").write_bytes(b"12345")
    (inbox / "dirlink").symlink_to(tmp_path)
    by_path = {s.path: s for s in scan_inbox(inbox)}
    assert by_path["a.png"].kind is Kind.SYMLINK
    assert by_path["b.png"].kind is Kind.SPECIAL
    assert by_path["c.png"].kind is Kind.FILE and by_path["c.png"].nlink == 2
    assert by_path["job"].kind is Kind.DIR and by_path["job/image.png"].size == 5
    assert by_path["dirlink"].kind is Kind.SYMLINK and not any(p.startswith("dirlink/") for p in by_path)


def test_alpha_probe_reads_the_header_and_never_opens_a_fifo(tmp_path: Path):
    from PIL import Image

    Image.new("RGBA", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    os.mkfifo(tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"not an image")
    assert probe_alpha(tmp_path / "a.png") is True
    assert probe_alpha(tmp_path / "b.png") is False
    assert probe_alpha(tmp_path / "c.png") is False  # O_NONBLOCK + fstat: returns at once
    assert probe_alpha(tmp_path / "d.png") is False


def test_a_claim_moves_every_entry_out_of_the_inbox_and_records_the_job(dirs):
    inbox, spool = dirs
    for n in ("cat.png", "cat.mask.png"):
        (inbox / n).write_bytes(n.encode())
    claim = spool.claim(inbox, group("cat", "cat.png", "cat.mask.png"), arrived=123.0)
    assert claim is not None and list(inbox.iterdir()) == []
    assert claim.input_path("image").read_bytes() == b"cat.png"
    record = json.loads((claim.dir / "job.json").read_text())
    assert record["name"] == "cat" and record["state"] == "claimed" and record["attempts"] == 0
    assert record["entries"] == ["cat.mask.png", "cat.png"] and record["arrived"] == 123.0


def test_a_job_folder_is_claimed_in_one_rename(dirs):
    inbox, spool = dirs
    (inbox / "j").mkdir()
    (inbox / "j" / "image.png").write_bytes(b"i")
    (inbox / "j" / "mask.png").write_bytes(b"m")
    claim = spool.claim(inbox, group("j", folder="j"), arrived=1.0)
    assert claim.input_path("mask").read_bytes() == b"m" and not (inbox / "j").exists()
    assert spool.unsafe_inputs(claim) == {}


def test_claimed_files_over_a_size_limit_are_found_from_lstat_alone(dirs, tmp_path: Path):
    inbox, spool = dirs
    (inbox / "j").mkdir()
    (inbox / "j" / "image.png").write_bytes(b"i" * 100)
    (inbox / "j" / "mask.png").write_bytes(b"m")
    claim = spool.claim(inbox, group("j", folder="j"), arrived=1.0)
    assert spool.oversized_inputs(claim, 100) == {}
    assert spool.oversized_inputs(claim, 99) == {"j/image.png": 100}


def test_a_claim_that_loses_a_race_rolls_back_and_leaves_the_inbox_as_it_was(dirs):
    inbox, spool = dirs
    (inbox / "a.png").write_bytes(b"i")  # a.mask.png was taken by someone else
    assert spool.claim(inbox, group("a", "a.png", "a.mask.png"), arrived=1.0) is None
    assert sorted(os.listdir(inbox)) == ["a.png"] and list(spool.claimed.iterdir()) == []


def test_an_entry_swapped_for_a_link_after_the_scan_is_found_unsafe_once_claimed(dirs, tmp_path: Path):
    inbox, spool = dirs
    (inbox / "a.png").symlink_to(tmp_path / "elsewhere.png")
    (inbox / "a.mask.png").write_bytes(b"m")
    claim = spool.claim(inbox, group("a", "a.png", "a.mask.png"), arrived=1.0)
    assert spool.unsafe_inputs(claim) == {"a.png": "is not a regular file"}


def test_restart_recovers_claims_in_arrival_order_and_finishes_half_made_ones(dirs):
    inbox, spool = dirs
    for n in ("b.png", "b.mask.png", "a.png", "a.mask.png"):
        (inbox / n).write_bytes(b"x")
    spool.claim(inbox, group("b", "b.png", "b.mask.png"), arrived=20.0)
    half = spool.claim(inbox, group("a", "a.png", "a.mask.png"), arrived=10.0)
    # As if the daemon died after moving one file of "a": one entry still in the inbox.
    os.rename(half.inputs / "a.png", inbox / "a.png")
    spool.mark(half, "claiming")
    spool.close()

    again = Spool(spool.state_dir)
    again.open(inbox)
    try:
        claims = again.recover(inbox)
        assert [c.name for c in claims] == ["a", "b"]
        assert claims[0].state == "claimed" and claims[0].input_path("image").exists()
        assert list(inbox.iterdir()) == []
    finally:
        again.close()


def test_attempts_are_counted_on_disk_and_a_job_that_keeps_crashing_is_poison(dirs):
    inbox, spool = dirs
    for n in ("p.png", "p.mask.png"):
        (inbox / n).write_bytes(b"x")
    claim = spool.claim(inbox, group("p", "p.png", "p.mask.png"), arrived=1.0)
    spool.begin_attempt(claim, poison_after=2)
    spool.undo_attempt(claim)  # a clean interruption is not a crash
    assert spool.load(claim.dir).attempts == 0
    spool.begin_attempt(claim, poison_after=2)
    spool.begin_attempt(spool.load(claim.dir), poison_after=2)  # "crashed" once before
    with pytest.raises(JobError) as info:
        spool.begin_attempt(spool.load(claim.dir), poison_after=2)
    assert info.value.code == "poison_job" and info.value.details["attempts"] == 2


def test_a_second_daemon_on_the_same_state_directory_is_refused(dirs):
    inbox, spool = dirs
    other = Spool(spool.state_dir)
    with pytest.raises(ConfigError, match="already running"):
        other.open(inbox)


@pytest.mark.skipif(os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev if os.path.isdir("/dev/shm") else True,
                    reason="needs two filesystems (/dev/shm and /tmp)")
def test_state_on_another_filesystem_is_a_config_error_and_moves_across_filesystems_never_follow_links(tmp_path):
    import tempfile

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        with pytest.raises(ConfigError, match="paths.state"):
            Spool(Path(other) / "state").open(inbox)
        (inbox / "f.png").write_bytes(b"data")
        (inbox / "l.png").symlink_to("/etc/passwd")
        os.mkfifo(inbox / "q.png")
        assert move_entry(inbox / "f.png", Path(other) / "f.png") == "copied"
        # Links and FIFOs are recreated as what they are, never opened or followed.
        assert move_entry(inbox / "l.png", Path(other) / "l.png") == "copied"
        assert move_entry(inbox / "q.png", Path(other) / "q.png") == "copied"
        assert os.readlink(Path(other) / "l.png") == "/etc/passwd"
        assert stat.S_ISFIFO(os.lstat(Path(other) / "q.png").st_mode)
        assert (Path(other) / "f.png").read_bytes() == b"data" and list(inbox.iterdir()) == []
        assert not [n for n in os.listdir(other) if n.startswith(".")]  # no temp copy left


def test_recovering_interrupted_claims_never_touches_a_claim_still_being_made(tmp_path: Path):
    """The fleet keeper recovers half-made claims when the share comes back, in its own thread,
    while intake may be making a claim. Found by the sshfs fleet test: recovery rolled a claim
    in progress back to the inbox and the job failed as 'missing'. Here recovery runs at the
    worst moment, from inside the claim: its record says `claiming` and no entry has moved."""
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    recovered: list = []

    class Racing(Spool):
        def save(self, claim) -> None:  # type: ignore[no-untyped-def]
            super().save(claim)
            if claim.record["state"] == "claiming":
                recovered.extend(self.recover_claiming(inbox))

    spool = Racing(state)
    spool.open(inbox)
    try:
        for f in ("a.png", "a.mask.png", "a.txt"):
            (inbox / f).write_bytes(f.encode())
        claim = spool.claim(inbox, group("a", "a.png", "a.mask.png", "a.txt"), arrived=1.0)
        assert claim is not None and recovered == []
        assert sorted(os.listdir(claim.inputs)) == ["a.mask.png", "a.png", "a.txt"]
        assert spool.unsafe_inputs(claim) == {} and os.listdir(inbox) == []
        # An interrupted claim (its making over) is still recovered.
        claim.record["state"] = "claiming"
        Spool.save(spool, claim)
        assert [c.job_id for c in spool.recover_claiming(inbox)] == [claim.job_id]
    finally:
        spool.close()


# A claim read back from disk (after a restart, or taken over from another device on a shared
# state folder) is as untrusted as the inbox: a forged job.json must never make a path leave its
# claim or the share.
HOSTILE_TEXT = ["../../pwned", "/etc/passwd", "a/../../b", "..", ".", "", "x\x1b[2J", "ok.png", "x\0y", "\udcff",
                "C:\\\\evil", "inputs/../../../x", 7, None, [], {}, 1e309, -1, True]


def _claim_paths_stay_inside(claim) -> bool:
    inputs = claim.inputs.resolve()
    paths = [claim.inputs / e for e in claim.entries()] + [claim.input_path(r) for r in ("image", "mask", "prompt")]
    return all(p is None or os.path.normpath(p).startswith(str(inputs) + os.sep) for p in paths)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["job_id", "name", "entries", "folder", "files", "state", "arrived", "attempts", "schema"]),
       value=st.one_of(st.sampled_from(HOSTILE_TEXT), st.lists(st.sampled_from(HOSTILE_TEXT), max_size=3),
                       st.dictionaries(st.sampled_from(["image", "mask", "prompt", "../x"]),
                                       st.sampled_from(HOSTILE_TEXT), max_size=3)))
def test_a_forged_claim_record_is_refused_or_keeps_every_path_inside_its_claim(key: str, value) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        _forge_and_load(Path(root), key, value)


def _forge_and_load(root: Path, key: str, value) -> None:
    inbox = root / "inbox"
    inbox.mkdir()
    spool = Spool(root / "state")
    spool.open(inbox)
    (inbox / "cat.png").write_bytes(b"png")
    (inbox / "cat.mask.png").write_bytes(b"png")
    claim = spool.claim(inbox, group("cat", "cat.png", "cat.mask.png"), arrived=1.0)
    assert claim is not None
    record = json.loads((claim.dir / "job.json").read_text())
    record[key] = value
    (claim.dir / "job.json").write_text(json.dumps(record))
    loaded = spool.load(claim.dir)
    assert loaded is None or _claim_paths_stay_inside(loaded)
    if key == "name" and value != "ok.png":
        assert loaded is None  # every hostile NAME is refused (it becomes outbox and record names)
    spool.close()


def test_a_forged_claim_named_to_escape_the_share_is_not_adopted(dirs) -> None:
    inbox, spool = dirs
    ghost = spool.claimed / "20261204T000000Z-deadbeef"
    (ghost / "inputs").mkdir(parents=True)
    (ghost / "inputs" / "secret.txt").write_text("the prompt of someone else")
    (ghost / "job.json").write_text(json.dumps({
        "schema": "inpaintd.claim/1", "job_id": "20261204T000000Z-deadbeef", "name": "../../pwned",
        "folder": None, "entries": ["secret.txt"], "files": {"image": "../../../etc/hostname", "prompt": "secret.txt"},
        "arrived": 1.0, "claimed": 1.0, "attempts": 0, "state": "claimed"}))
    assert spool.load(ghost) is None and spool.adopt(ghost, inbox) is None
    assert spool.recover(inbox) == []


# ---------------------------------------------------------------------------- copies across filesystems


def _other_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) beside the test folder")
    folder = shm / f"inpaintd-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    return folder


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 48 << 20), st.binary(min_size=1, max_size=70_000)), max_size=6),
       st.integers(0, 64 << 20))
def test_a_copy_across_filesystems_keeps_every_byte_and_every_hole(tmp_path_factory, segments, length):
    """Archive on another disk: move_entry copies. Whatever the layout of data and holes, the
    copy reads back equal and holds no more on disk than the source (plus a block per segment)."""
    tmp_path = tmp_path_factory.mktemp("copy")
    other = _other_filesystem(tmp_path)
    try:
        src = tmp_path / "input.png"
        with open(src, "wb") as handle:
            for offset, data in segments:
                handle.seek(offset)
                handle.write(data)
            handle.truncate(max(length, handle.tell()))
        expected = src.read_bytes()
        src_blocks = os.stat(src).st_blocks
        dst = other / "input.png"
        assert move_entry(src, dst) == "copied"
        assert not src.exists()
        assert dst.read_bytes() == expected
        assert os.stat(dst).st_blocks <= src_blocks + 8 * (len(segments) + 1)
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_an_input_grown_sparse_to_8_tib_is_archived_across_filesystems_in_what_it_holds(tmp_path):
    """A drop user's second handle seeks a claimed input out to 8 TiB: the archive on another disk
    receives a file of the same length holding the same few bytes, not 8 TiB of zeros."""
    other = _other_filesystem(tmp_path)
    try:
        src = tmp_path / "scan.png"
        with open(src, "wb") as handle:
            handle.write(b"\x89PNG head")
            handle.seek((8 << 40) - 4)
            handle.write(b"tail")
        dst = other / "scan.png"
        assert move_entry(src, dst) == "copied"
        st_dst = os.stat(dst)
        assert st_dst.st_size == 8 << 40 and st_dst.st_blocks * 512 < 1 << 20
        with open(dst, "rb") as handle:
            assert handle.read(9) == b"\x89PNG head"
            handle.seek((8 << 40) - 4)
            assert handle.read() == b"tail"
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.parametrize("link", ["inputs", "claim"])
def test_a_claim_whose_folder_or_inputs_is_a_link_outside_is_refused(dirs, tmp_path: Path, link: str) -> None:
    """Found by the forgery run (issue 22): a forged claim whose inputs/ was a link to a folder
    outside the share passed record_problem (its names are plain) and its files were read from
    there (a secret as the prompt). The claim folder and its inputs/ must be real folders."""
    inbox, spool = dirs
    outside = tmp_path / "outside"
    (outside / "inputs").mkdir(parents=True)
    (outside / "inputs" / "secret.txt").write_text("someone else's secret")
    job_id = "20261204T000000Z-deadbeef"
    record = {"schema": "inpaintd.claim/1", "job_id": job_id, "name": "cat", "folder": None,
              "entries": ["secret.txt"], "files": {"image": "secret.txt", "prompt": "secret.txt"},
              "arrived": 1.0, "claimed": 1.0, "attempts": 0, "state": "claimed"}
    (outside / "job.json").write_text(json.dumps(record))
    ghost = spool.claimed / job_id
    if link == "claim":
        ghost.symlink_to(outside)
    else:
        ghost.mkdir()
        (ghost / "inputs").symlink_to(outside / "inputs")
        (ghost / "job.json").write_text(json.dumps(record))
    assert Spool.claim_problem(ghost) is not None
    assert spool.load(ghost) is None and spool.adopt(ghost, inbox) is None and spool.recover(inbox) == []
    assert os.listdir(outside / "inputs") == ["secret.txt"]


def test_a_claim_record_nested_too_deep_or_a_fifo_is_refused_without_blocking(dirs) -> None:
    _inbox, spool = dirs
    deep = spool.claimed / "20261204T000000Z-00000001"
    deep.mkdir()
    (deep / "job.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    fifo = spool.claimed / "20261204T000000Z-00000002"
    fifo.mkdir()
    os.mkfifo(fifo / "job.json")
    assert "too deep" in (Spool.claim_problem(deep) or "")
    assert "not a regular file" in (Spool.claim_problem(fifo) or "")
    assert spool.load(deep) is None and spool.load(fifo) is None
