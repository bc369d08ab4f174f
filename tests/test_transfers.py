"""Jobs uploaded by real clients into a real daemon's inbox: scp, scp -l, rsync over ssh, smbclient.

The servers are the real ones (an sshd and an smbd started by the test on 127.0.0.1, high port,
config and keys in a temp folder); the daemon is the real `inpaintd run`. Each job must produce
exactly one result, from the complete file (the sidecar's input sha256 is the uploaded file's),
never from a partly written one, and client debris (rsync's temp names, AppleDouble files) is
ignored. Skips, with the reason, where sshd/smbd cannot be installed or started.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import (
    Daemon,
    Dirs,
    image_bytes,
    job_bytes,
    mask_bytes,
    missing_report,
    outcomes,
    stray_files,
    wait_for,
)
from transfer_servers import SmbServer, SshServer

pytestmark = pytest.mark.slow

SETTINGS = {
    "watch": {"observer": "inotify", "settle_seconds": 0.4, "incomplete_timeout": 120},
    "limits": {"max_pixels": 50_000_000},
}


@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    dirs = Dirs.make(tmp_path_factory.mktemp("transfers"), tiny_model, SETTINGS)
    d = Daemon(dirs).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    reason = SshServer.unavailable()
    if reason:
        pytest.skip(reason)
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip, stated
        pytest.skip(f"sshd could not start here: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smbd(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory):
    reason = SmbServer.unavailable()
    if reason:
        pytest.skip(reason)
    server = SmbServer(tmp_path_factory.mktemp("smbd"), daemon.dirs.inbox)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"smbd could not start here: {exc}")
    yield server
    server.stop()


def stage(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_one_result_each(daemon: Daemon, images: dict[str, bytes], timeout: float = 30) -> None:
    """Every job has exactly one outcome, it is a success, and it read the complete uploaded image."""
    found = wait_for(daemon.dirs, images, timeout, daemon)
    assert set(images) <= set(found), missing_report(daemon.dirs, images, found, daemon)
    for name, data in images.items():
        results = found[name]
        assert len(results) == 1, f"{name}: {len(results)} outcomes: {[r.path for r in results]}"
        result = results[0]
        assert result.kind == "done", f"{name} failed: {result.data}"
        image = result.data["inputs"]["image"]
        assert image["sha256"] == sha(data), f"{name}: the daemon read a different (partial?) image"
        assert image["bytes"] == len(data)
        published = daemon.dirs.outbox / result.data.get("output_file", f"{name}.png")
        assert published.is_file() and published.stat().st_size == result.data["output"]["bytes"]
    assert stray_files(daemon.dirs) == []
    assert daemon.alive()


class Sizes:
    """Samples one inbox file's size while an upload runs: proof it was visibly incomplete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - start, self.path.stat().st_size))
            except OSError:
                pass
            time.sleep(0.05)

    def __enter__(self) -> "Sizes":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def incomplete_for(self, final: int) -> float:
        """Seconds during which the file existed under its final name with fewer bytes than final."""
        partial = [t for t, size in self.samples if size < final]
        return (max(partial) - min(partial)) if partial else 0.0


def finish(proc, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"client failed ({proc.returncode}): {text}"
    return text


# ---------------------------------------------------------------------------- no server needed


def test_a_file_whose_times_are_set_after_it_is_closed_is_taken_promptly(daemon: Daemon, tmp_path: Path):
    """What scp -p, rsync --inplace and smbd do: write, close, then set the mtime (an ATTRIB event
    right after the close). The job must not wait for watch.incomplete_timeout."""
    # Several jobs, so that some close+attrib pairs reach the daemon between two of its looks.
    images = {}
    for i in range(4):
        name = f"times-after-close-{i}"
        files = job_bytes(name, seed=30 + i)
        images[name] = files[f"{name}.png"]
        for filename, data in files.items():
            path = daemon.dirs.inbox / filename
            with open(path, "wb") as handle:
                handle.write(data)
            os.utime(path, (1_700_000_000, 1_700_000_000))
    assert_one_result_each(daemon, images, timeout=20)


def test_complete_files_moved_in_from_outside_the_inbox_are_taken_promptly(daemon: Daemon, tmp_path: Path):
    """`mv` from another folder of the same filesystem (what upload scripts and some SFTP servers
    with a staging folder do): the files arrive complete, in one rename each. The inbox sees a
    bare IN_MOVED_TO (watchdog reports it as "created") and no close will ever follow."""
    name = "moved-in"
    staging = daemon.dirs.root / "staging-moved-in"
    staging.mkdir()
    files = job_bytes(name, seed=4)
    for filename, data in files.items():
        (staging / filename).write_bytes(data)
    for filename in files:
        os.rename(staging / filename, daemon.dirs.inbox / filename)
    assert_one_result_each(daemon, {name: files[f"{name}.png"]}, timeout=20)


# ---------------------------------------------------------------------------- ssh


def test_scp_uploads_of_several_jobs_each_give_exactly_one_result(daemon: Daemon, sshd: SshServer, tmp_path: Path):
    files: dict[str, bytes] = {}
    for i in range(3):
        files.update(job_bytes(f"scp-{i}", seed=i))
    paths = stage(tmp_path / "up", files)
    finish(sshd.scp(paths, daemon.dirs.inbox))
    assert_one_result_each(daemon, {f"scp-{i}": files[f"scp-{i}.png"] for i in range(3)})


def test_legacy_scp_protocol_uploads_give_exactly_one_result(daemon: Daemon, sshd: SshServer, tmp_path: Path):
    files = job_bytes("scp-legacy", seed=7)
    paths = stage(tmp_path / "up", files)
    finish(sshd.scp(paths, daemon.dirs.inbox, legacy=True))
    assert_one_result_each(daemon, {"scp-legacy": files["scp-legacy.png"]})


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp", "scp-protocol"])
def test_scp_p_preserving_times_gives_exactly_one_result_promptly(daemon: Daemon, sshd: SshServer, tmp_path: Path, legacy: bool):
    name = f"scp-p-{'legacy' if legacy else 'sftp'}"
    files = job_bytes(name, seed=9)
    paths = stage(tmp_path / "up", files)
    for path in paths:
        os.utime(path, (1_600_000_000, 1_600_000_000))
    finish(sshd.scp(paths, daemon.dirs.inbox, legacy=legacy, preserve=True))
    assert_one_result_each(daemon, {name: files[f"{name}.png"]}, timeout=20)


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp", "scp-protocol"])
def test_bandwidth_limited_scp_upload_is_taken_only_once_complete(daemon: Daemon, sshd: SshServer, tmp_path: Path, legacy: bool):
    name = f"scp-slow-{'legacy' if legacy else 'sftp'}"
    # ~1.5 MB of noise: ~4 s at 3000 kbit/s. (SFTP-mode scp sends its first ~1 MB in a burst
    # before the limit bites, so a small file would arrive at once.)
    big = image_bytes((700, 700), "PNG", seed=11)
    files = {f"{name}.png": big, f"{name}.mask.png": mask_bytes((700, 700), (300, 300, 400, 400)), f"{name}.txt": b"slow"}
    paths = stage(tmp_path / "up", files)
    with Sizes(daemon.dirs.inbox / f"{name}.png") as sizes:
        started = time.monotonic()
        finish(sshd.scp(paths, daemon.dirs.inbox, limit_kbit=3000, legacy=legacy))
        took = time.monotonic() - started
    assert took > 2, f"the upload took only {took:.1f} s; the limit did not bite"
    assert sizes.incomplete_for(len(big)) > 1.0, "the image was never seen incomplete under its final name"
    assert_one_result_each(daemon, {name: big})


def test_rsync_over_ssh_temp_name_then_rename_gives_exactly_one_result(daemon: Daemon, sshd: SshServer, tmp_path: Path):
    names = [f"rsync-{i}" for i in range(2)]
    files: dict[str, bytes] = {}
    for i, name in enumerate(names):
        files.update(job_bytes(name, size=(160, 160), seed=20 + i))
    paths = stage(tmp_path / "up", files)
    seen_temp: list[str] = []
    stop = threading.Event()

    def watch_temp() -> None:  # rsync writes .NAME.XXXXXX and renames it at the end
        while not stop.is_set():
            seen_temp.extend(p.name for p in daemon.dirs.inbox.iterdir() if p.name.startswith(".rsync-"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_temp, daemon=True)
    watcher.start()
    try:
        finish(sshd.rsync(paths, daemon.dirs.inbox, bwlimit_kbyte=60))
    finally:
        stop.set()
        watcher.join()
    assert seen_temp, "rsync's temporary file was never seen (the upload was too fast to show it)"
    assert_one_result_each(daemon, {name: files[f"{name}.png"] for name in names})
    assert not [p for p in daemon.dirs.inbox.iterdir() if p.name.startswith(".rsync-")]


def test_rsync_inplace_slow_upload_is_taken_only_once_complete(daemon: Daemon, sshd: SshServer, tmp_path: Path):
    name = "rsync-inplace"
    big = image_bytes((200, 200), "PNG", seed=31)
    files = {f"{name}.png": big, f"{name}.mask.png": mask_bytes((200, 200)), f"{name}.txt": b"inplace"}
    paths = stage(tmp_path / "up", files)
    with Sizes(daemon.dirs.inbox / f"{name}.png") as sizes:
        finish(sshd.rsync(paths, daemon.dirs.inbox, bwlimit_kbyte=40, extra=["--inplace"]))
    assert sizes.incomplete_for(len(big)) > 1.0
    assert_one_result_each(daemon, {name: big})


# ---------------------------------------------------------------------------- smb


def test_smbclient_puts_give_exactly_one_result_and_client_debris_is_ignored(daemon: Daemon, smbd: SmbServer, tmp_path: Path):
    files: dict[str, bytes] = {}
    for i in range(2):
        files.update(job_bytes(f"smb-{i}", seed=40 + i))
    up = tmp_path / "up"
    stage(up, files)
    stage(up, {"._smb-0.png": b"\0\5\26\7AppleDouble", ".DS_Store": b"\0\0\0\1Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0"})
    commands = ["put smb-0.png", "put smb-0.mask.png", "put smb-0.txt", "put ._smb-0.png", "put .DS_Store", "put Thumbs.db"]
    # A Windows-style careful copy: temporary name, then rename.
    commands += [
        "put smb-1.png smb-1.png.tmp",
        "put smb-1.mask.png ~$smb-1.mask.png",
        "put smb-1.txt",
        "rename smb-1.png.tmp smb-1.png",
        "rename ~$smb-1.mask.png smb-1.mask.png",
    ]
    finish(smbd.client("; ".join(commands), cwd=up))
    assert_one_result_each(daemon, {f"smb-{i}": files[f"smb-{i}.png"] for i in range(2)})
    time.sleep(1.0)
    leftover = sorted(p.name for p in daemon.dirs.inbox.iterdir())
    assert {"._smb-0.png", ".DS_Store", "Thumbs.db"} <= set(leftover), leftover
    assert not any(o for name, o in outcomes(daemon.dirs).items() if "DS_Store" in name or "Thumbs" in name)


def test_smbclient_put_of_a_large_image_gives_exactly_one_result(daemon: Daemon, smbd: SmbServer, tmp_path: Path):
    name = "smb-large"
    size = (2600, 2000)  # 5.2 Mpx, a 15.6 MB BMP
    big = image_bytes(size, "BMP", seed=50)
    files = {f"{name}.bmp": big, f"{name}.mask.png": mask_bytes(size, (1200, 900, 1300, 1000)), f"{name}.txt": b"large"}
    up = tmp_path / "up"
    stage(up, files)
    finish(smbd.client(f"put {name}.txt; put {name}.mask.png; put {name}.bmp", cwd=up))
    assert_one_result_each(daemon, {name: big}, timeout=120)


def test_slow_smb_upload_seen_empty_under_its_final_name_is_not_taken_early(daemon: Daemon, smbd: SmbServer, tmp_path: Path):
    name = "smb-slow"
    big = image_bytes((300, 300), "PNG", seed=60)
    up = tmp_path / "up"
    stage(up, {f"{name}.mask.png": mask_bytes((300, 300)), f"{name}.txt": b"slow smb"})
    fifo = up / "feed"
    os.mkfifo(fifo)

    def feed() -> None:  # smbclient reads the FIFO as its local file: the upload lasts ~3 s
        deadline = time.monotonic() + 30
        while True:  # non-blocking open: never hang if smbclient gives up before opening it
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as handle:
            for start in range(0, len(big), len(big) // 4 + 1):
                handle.write(big[start : start + len(big) // 4 + 1])
                handle.flush()
                time.sleep(0.8)

    feeder = threading.Thread(target=feed, daemon=True)
    with Sizes(daemon.dirs.inbox / f"{name}.png") as sizes:
        client = smbd.client(f"put {name}.mask.png; put {name}.txt; put feed {name}.png", cwd=up)
        feeder.start()
        finish(client)
        feeder.join(timeout=30)
    assert sizes.incomplete_for(len(big)) > 1.5, sizes.samples[:5]
    assert_one_result_each(daemon, {name: big})


def test_every_transfer_job_has_exactly_one_outcome_overall(daemon: Daemon):
    """Across the module: no job name has two outcomes and nothing failed."""
    found = outcomes(daemon.dirs)
    doubles = {name: [o.path.name for o in outs] for name, outs in found.items() if len(outs) != 1}
    failures = {name: outs[0].data for name, outs in found.items() if outs[0].kind != "done"}
    assert doubles == {}
    assert failures == {}
    assert daemon.alive()
