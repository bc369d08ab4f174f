"""Every hostile or broken input of issue 5, dropped into one real running daemon's inbox.

One `inpaintd run` serves the whole module: a good job first, then every case of
tests/hostile_corpus.py at once, then good jobs again. Each case must end as its recipe says
(normally failed/NAME/error.json with the expected code and a human sentence), the daemon must
keep running and still process the good jobs after, links and special files must never be
followed or read (inotify on the targets says so), and nothing may be written outside the
daemon's folders.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hostile_corpus as hc
import pytest
from daemon_harness import (
    AccessWatch,
    Daemon,
    Dirs,
    drop_job,
    missing_report,
    outcomes,
    stray_files,
    tree_snapshot,
    wait_for,
)

pytestmark = pytest.mark.slow

IS_ROOT = os.geteuid() == 0
CASES = hc.cases(IS_ROOT)
INCOMPLETE_TIMEOUT = 4.0
SETTINGS = {
    "watch": {"settle_seconds": 0.3, "incomplete_timeout": INCOMPLETE_TIMEOUT, "rescan_interval": 2},
    "limits": {"max_pixels": 4_000_000, "max_prompt_bytes": 4096, "max_input_bytes": 8 * 1024 * 1024},
}


class Run:
    def __init__(self, daemon: Daemon, outside: Path) -> None:
        self.daemon = daemon
        self.dirs = daemon.dirs
        self.outside = outside
        self.found: dict[str, list] = {}
        self.access: dict[str, set[str]] = {}
        self.before_outside: set[str] = set()
        self.after_outside: set[str] = set()
        self.rss_before = 0
        self.rss_after = 0
        self.good_after: dict[str, list] = {}
        self.seconds = 0.0


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    outside.mkdir()
    dirs = Dirs.make(root / "daemon", tiny_model, SETTINGS)
    daemon = Daemon(dirs).start()
    result = Run(daemon, outside)
    try:
        drop_job(dirs.inbox, "good-before")
        found = wait_for(dirs, ["good-before"], 60, daemon)
        assert "good-before" in found, missing_report(dirs, ["good-before"], found, daemon)
        result.rss_before = daemon.rss_bytes()

        watch = AccessWatch()
        started = time.monotonic()
        for case in CASES:
            case.build(dirs.inbox, outside)
            for rel in case.never_opened + case.never_read:
                path = dirs.inbox / rel[len("INBOX:") :] if rel.startswith("INBOX:") else outside / rel
                watch.add(path)
        # Directories outside must not even be listed through a link. (Snapshot first: os.walk lists them.)
        result.before_outside = tree_snapshot(root, skip=[dirs.root])
        for folder in outside.iterdir():
            if folder.is_dir():
                watch.add(folder)

        expected = [c.name for c in CASES if hc.IGNORED not in c.expect]
        found = wait_for(dirs, expected, 60 + 2 * INCOMPLETE_TIMEOUT, daemon)
        if hc.IGNORED in {e for c in CASES for e in c.expect}:
            time.sleep(INCOMPLETE_TIMEOUT + 1)  # give an ignored entry time to be (wrongly) acted on
        result.seconds = time.monotonic() - started
        result.found = outcomes(dirs)
        result.access = {path: set(hits) for path, hits in watch.poll().items()}
        watch.close()
        result.rss_after = daemon.rss_bytes()

        for i in range(2):
            drop_job(dirs.inbox, f"good-after-{i}", seed=100 + i)
        result.good_after = wait_for(dirs, ["good-after-0", "good-after-1"], 60, daemon)
        result.after_outside = tree_snapshot(root, skip=[dirs.root])
        yield result
    finally:
        daemon.stop()


def _case_ids() -> list[str]:
    return [c.key for c in CASES]


@pytest.mark.parametrize("key", _case_ids())
def test_hostile_input_ends_as_expected(run: Run, key: str):
    case = next(c for c in CASES if c.key == key)
    outs = run.found.get(case.name, [])
    if not outs:
        if hc.IGNORED in case.expect:
            # Left alone: still in the inbox, never entered (the access check below covers reads).
            left = [p.name for p in run.dirs.inbox.iterdir() if p.name == case.name or p.name.startswith(case.name + ".")]
            assert left, f"{case.name!r} vanished without an outcome"
            return
        pytest.fail(f"{case.key}: no outcome for {case.name!r}\n" + missing_report(run.dirs, [case.name], run.found, run.daemon))
    assert len(outs) == 1, f"{case.key}: {len(outs)} outcomes: {[str(o.path) for o in outs]}"
    out = outs[0]
    got = hc.DONE if out.kind == "done" else out.code
    assert got in case.expect, f"{case.key}: got {got!r}, expected one of {sorted(case.expect)}; {out.data}"
    if out.kind == "failed":
        message = out.data.get("message")
        assert isinstance(message, str) and 10 <= len(message) <= 2000, f"{case.key}: message {message!r}"
        assert "Traceback" not in message
        assert isinstance(out.data.get("details", {}), dict)
        # The inputs are kept beside the error record (nothing is deleted).
        kept = [p for p in out.path.parent.iterdir() if p.name != "error.json"]
        if case.key not in ("empty-job-folder",):
            assert kept, f"{case.key}: failed/{out.path.parent.name}/ holds no input"


@pytest.mark.parametrize("key", [c.key for c in CASES if c.never_opened or c.never_read])
def test_links_and_special_files_are_never_followed_or_read(run: Run, key: str):
    case = next(c for c in CASES if c.key == key)
    touched = {}
    for rel in case.never_opened:
        path = str(run.outside / rel)
        if run.access.get(path):
            touched[rel] = run.access[path]
    for rel in case.never_read:
        path = str(run.dirs.inbox / rel[len("INBOX:") :]) if rel.startswith("INBOX:") else str(run.outside / rel)
        if "read" in run.access.get(path, set()):
            touched[rel] = run.access[path]
    folders = {p: hits for p, hits in run.access.items() if Path(p).parent == run.outside and Path(p).is_dir() and hits}
    assert touched == {}, f"{case.key}: the daemon opened/read {touched}"
    assert folders == {}, f"folders outside the inbox were listed through a link: {folders}"


def test_the_yaml_python_tag_constructed_nothing(run: Run):
    assert not (run.outside / "pwned").exists()
    assert not list(run.dirs.root.rglob("pwned"))


def test_nothing_was_written_outside_the_daemon_folders(run: Run):
    assert run.after_outside == run.before_outside


def test_daemon_survived_and_still_processes_good_jobs(run: Run):
    assert run.daemon.alive(), run.daemon.log_tail()
    for name in ("good-after-0", "good-after-1"):
        outs = run.good_after.get(name, [])
        assert [o.kind for o in outs] == ["done"], missing_report(run.dirs, [name], run.good_after, run.daemon)
    assert stray_files(run.dirs) == []


def test_bombs_did_not_blow_up_memory(run: Run):
    # Decoding any of the bombs would cost gigabytes; refusing them costs nothing measurable.
    grown = run.rss_after - run.rss_before
    assert grown < 300 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB over the hostile batch"


def test_no_outcome_for_a_name_nobody_sent(run: Run):
    sent = {c.name for c in CASES} | {"good-before", "good-after-0", "good-after-1"}
    unused = {name for c in CASES for name in c.also_not_a_job}
    unexpected = sorted(set(run.found) - sent - unused)
    assert unexpected == [], unexpected
    for name in unused:  # an unknown file beside a job is recorded on its own, not left in the inbox
        assert [o.data.get("code") for o in run.found.get(name, [])] == ["not_a_job"], name


def _listening_socket_inodes() -> set[str]:
    """Inodes of every listening TCP/UNIX socket and every bound UDP/raw socket in this netns."""
    inodes: set[str] = set()
    for proto in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if proto.startswith("tcp") and fields[3] != "0A":  # 0A = LISTEN
                continue
            inodes.add(fields[9])
    try:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                inodes.add(fields[6])
    except OSError:
        pass
    return inodes


def test_daemon_listens_on_no_socket_and_holds_only_its_own_files_open(run: Run, tiny_model: Path):
    import sys

    pid = run.daemon.pid
    listening = _listening_socket_inodes()
    allowed = [str(run.dirs.root), str(tiny_model.resolve()), sys.prefix, sys.base_prefix, "/dev/null", "/dev/urandom"]
    sockets, outside = [], []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.append(target)
            assert target[8:-1] not in listening, f"fd {fd} is a listening socket ({target})"
        elif target.startswith("/") and not any(target == a or target.startswith(a.rstrip("/") + "/") for a in allowed):
            outside.append(target)
    assert outside == [], f"files open outside the daemon's folders, model and Python: {outside}"


def test_entries_no_job_uses_are_recorded_not_left_for_ever(tiny_model: Path, tmp_path: Path):
    """Issue 22: client debris and unknown files end in failed/ with not_a_job (debris after
    watch.abandoned_timeout, unknown types after incomplete_timeout), each record visible (no
    leading dot) and holding the entry byte for byte; a name too long for a suffix still gets
    a record; inpaintd's own `.inpaintd-*` names stay; jobs keep flowing."""
    settings = {"watch": {"settle_seconds": 0.3, "incomplete_timeout": 2, "abandoned_timeout": 4,
                          "rescan_interval": 1}}
    dirs = Dirs.make(tmp_path / "d", tiny_model, settings)
    daemon = Daemon(dirs).start()
    try:
        drops = {".DS_Store": "DS_Store", "photo.png.part": "photo.png.part", "._photo.png": "_photo.png",
                 "...": "unnamed", "~$report.docx": "~$report.docx", "L" * 250 + ".docx": None,
                 "clip.mov": "clip.mov"}
        for entry in drops:
            hc.write(dirs.inbox / entry, entry.encode() * 3)
        (dirs.inbox / ".inpaintd-share").write_text("inpaintd's own\n")
        drop_job(dirs.inbox, "good")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and {p.name for p in dirs.inbox.iterdir()} != {".inpaintd-share"}:
            time.sleep(0.2)
        assert {p.name for p in dirs.inbox.iterdir()} == {".inpaintd-share"}, daemon.log_tail()
        records = {}
        for error in dirs.failed.glob("*/error.json"):
            data = json.loads(error.read_text())
            records[data["details"]["entry"]] = (error.parent.name, data)
        assert set(records) == set(drops), sorted(records)
        for entry, record_name in drops.items():
            folder, data = records[entry]
            assert data["code"] == "not_a_job" and entry[:20] in data["message"], data
            assert not folder.startswith(".")
            if record_name is not None:
                assert folder == record_name
            assert (dirs.failed / folder / entry).read_bytes() == entry.encode() * 3
        assert outcomes(dirs)["good"][0].kind == "done"
        assert daemon.alive()
    finally:
        daemon.stop()


def test_live_a_claimed_input_grown_to_8_tib_and_every_distinct_name_taken(tiny_model: Path, tmp_path: Path):
    """Issue 22 items 1 and 3 against a running daemon. An uploader keeps a second write handle
    on a file it dropped and, once the daemon has claimed it, grows it to 8 TiB (sparse): the job
    fails input_too_large and the daemon's memory stays small. With NAME .. NAME-9999 taken in
    outbox/, archive/ and failed/, the next job of each name still gets one record, under
    NAME-<job token>, and nothing is left anywhere else."""
    from inpaintd.core.jobs import distinct_names

    limit = 4 * 2**20
    settings = {"watch": {"settle_seconds": 0.3, "incomplete_timeout": 30, "rescan_interval": 2},
                "limits": {"max_input_bytes": limit}}
    dirs = Dirs.make(tmp_path / "d", tiny_model, settings)
    taken = list(distinct_names("scan", "20261204T000000Z-00000000"))[:-1]  # scan .. scan-9999
    assert len(taken) == 10_000
    for stem in taken:
        (dirs.outbox / f"{stem}.png").write_bytes(b"")
        (dirs.archive / stem).mkdir()
        (dirs.failed / stem.replace("scan", "bad")).mkdir()
    daemon = Daemon(dirs).start()
    claimed = dirs.state / "claimed"
    try:
        busy = [f"busy{i}" for i in range(4)]
        for name in busy:  # keeps the worker busy while the uploader acts on its claimed file
            drop_job(dirs.inbox, name, prompt=None, size=(768, 768))
            (dirs.inbox / f"{name}.yaml").write_bytes(b"prompt: slow\nsteps: 150\n")
        drop_job(dirs.inbox, "grow")
        with open(dirs.inbox / "grow.png", "r+b") as writer:  # the second handle
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(claimed.glob("*/inputs/grow.png")):
                time.sleep(0.05)
            assert any(claimed.glob("*/inputs/grow.png")), daemon.log_tail()
            writer.truncate(8 * 2**40)
        drop_job(dirs.inbox, "scan")
        hc.write(dirs.inbox / "bad.png", os.urandom(3000))
        hc.write(dirs.inbox / "bad.mask.png", hc.GOOD_MASK)
        hc.write(dirs.inbox / "bad.txt", b"a prompt")
        found = wait_for(dirs, [*busy, "grow", "scan", "bad"], 120, daemon)
        assert {"grow", "scan", "bad"} <= set(found), missing_report(dirs, ["grow", "scan", "bad"], found, daemon)

        (grow,) = found["grow"]
        assert grow.kind == "failed" and grow.data["code"] == "input_too_large", grow.data
        assert daemon.rss_bytes() < 2 * 2**30
        (scan,) = found["scan"]
        token = scan.data["job_id"].rsplit("-", 1)[1]
        assert scan.kind == "done" and scan.data["output_file"] == f"scan-{token}.png", scan.data
        assert scan.path.name == f"scan-{token}.json"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (dirs.archive / f"scan-{token}").is_dir():
            time.sleep(0.1)
        assert sorted(os.listdir(dirs.archive / f"scan-{token}")) == ["scan.mask.png", "scan.png", "scan.txt"]
        (bad,) = found["bad"]
        bad_token = bad.data["job_id"].rsplit("-", 1)[1]
        assert bad.kind == "failed" and bad.path.parent.name == f"bad-{bad_token}", bad.path
        # Nothing anywhere but where the contract says: no temp or hidden folder left behind.
        for folder in (dirs.outbox, dirs.archive, dirs.failed, dirs.inbox):
            assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [], folder
        assert not list(claimed.iterdir())
        assert daemon.alive()
    finally:
        daemon.stop()
