"""sd_notify against a real unix datagram socket the test binds, for both backends."""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

import pytest
import structlog
from inpaintd.service.notify import Notifier, socket_address, watchdog_interval

try:  # the optional extra; CI installs it (scripts/setup-systemd-test-deps.sh)
    from systemd import daemon as _sd_daemon  # type: ignore[import-not-found]  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False

needs_systemd_python = pytest.mark.skipif(
    not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed (scripts/setup-systemd-test-deps.sh installs it)"
)


class Listener:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        sock.settimeout(2.0)

    def messages(self, count: int) -> list[str]:
        return [self.sock.recv(65536).decode() for _ in range(count)]

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture
def path_listener(tmp_path: Path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield Listener(sock, str(path))
    sock.close()


@pytest.fixture
def abstract_listener():
    name = f"inpaintd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield Listener(sock, "@" + name)
    sock.close()


def exercise(notifier: Notifier, listener: Listener) -> None:
    notifier.status("warming up 1/3")
    notifier.extend_timeout(90_000_000)
    notifier.ready()
    notifier.status("cat: step 7/20,\n3 queued")  # a newline must not split the assignment
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    notifier.status("\x1b]52;c;aGk=\x07evil\u202egpj.png: step 1/2 \u009b2J")  # a name from a drop
    got = listener.messages(8)
    assert got[0] == "STATUS=warming up 1/3"
    assert got[1] == "EXTEND_TIMEOUT_USEC=90000000"
    assert got[2] == "READY=1"
    assert got[3] == "STATUS=cat: step 7/20, 3 queued"
    assert got[4] == "WATCHDOG=1"
    assert got[5].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert got[6] == "STOPPING=1"
    assert got[7] == "STATUS=\\x1b]52;c;aGk=\\x07evil\\u202egpj.png: step 1/2 \\x9b2J"  # escaped, visible
    assert listener.nothing_pending()


def test_pure_socket_backend_delivers_every_message_to_a_path_socket(path_listener: Listener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    assert notifier.backend == "socket"
    exercise(notifier, path_listener)


def test_pure_socket_backend_speaks_to_the_abstract_namespace(abstract_listener: Listener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract_listener.env_value})
    assert notifier.backend == "socket"
    exercise(notifier, abstract_listener)


@needs_systemd_python
def test_systemd_python_backend_is_preferred_and_delivers(path_listener: Listener, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    notifier = Notifier.from_env()
    assert notifier.backend == "systemd-python"
    exercise(notifier, path_listener)


@needs_systemd_python
def test_systemd_python_backend_reaches_the_abstract_namespace(abstract_listener: Listener, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env_value)
    notifier = Notifier.from_env()
    assert notifier.backend == "systemd-python"
    exercise(notifier, abstract_listener)


def test_prefer_socket_skips_systemd_python_even_from_the_real_environment(path_listener, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    notifier = Notifier.from_env(prefer="socket")
    assert notifier.backend == "socket"
    notifier.ready()
    assert path_listener.messages(1) == ["READY=1"]


def test_without_notify_socket_every_call_is_a_quiet_no_op(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert notifier.backend == "none" and not notifier.enabled
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.status("idle, 0 queued")
        notifier.watchdog()
        notifier.stopping()
        notifier.extend_timeout(1)
    assert logs == []
    assert "NOTIFY_SOCKET not set" in notifier.describe()


def test_an_address_we_cannot_speak_to_gives_the_none_backend_with_a_warning() -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert notifier.backend == "none"
    assert [e["event"] for e in logs] == ["notify_socket_unsupported"]


@pytest.mark.parametrize(
    "backend", ["socket", pytest.param("systemd-python", marks=needs_systemd_python)]
)
def test_a_vanished_socket_never_raises_and_is_logged_once(tmp_path: Path, monkeypatch, backend: str) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier.from_env(prefer=backend)
    assert notifier.backend == backend
    notifier.ready()
    assert sock.recv(100) == b"READY=1"
    sock.close()
    path.unlink()  # systemd went away (or the file was a stale leftover)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            notifier.watchdog()
            notifier.status("still here")
    assert [e["event"] for e in logs] == ["notify_failed"]
    assert logs[0]["log_level"] == "warning"
    # It comes back by itself once the socket is there again.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    with structlog.testing.capture_logs() as logs:
        notifier.watchdog()
    assert sock.recv(100) == b"WATCHDOG=1"
    assert [e["event"] for e in logs] == ["notify_recovered"]
    sock.close()


def test_a_stale_socket_file_with_nobody_behind_it_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()  # the file stays; sendto gets ECONNREFUSED
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
    assert [e["event"] for e in logs] == ["notify_failed"]
    assert "ConnectionRefusedError" in logs[0]["error"]


def test_notify_is_thread_safe_under_concurrent_pings(path_listener: Listener) -> None:
    import threading

    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    received: list[str] = []
    # The kernel queues only a few datagrams (net.unix.max_dgram_qlen): read while they send.
    reader = threading.Thread(target=lambda: received.extend(path_listener.messages(200)))
    reader.start()
    threads = [threading.Thread(target=lambda: [notifier.watchdog() for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    reader.join(10)
    assert received == ["WATCHDOG=1"] * 200


def test_a_listener_that_never_reads_cannot_block_the_daemon_for_long(path_listener: Listener) -> None:
    import time

    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    notifier.send_timeout = 0.2
    start = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        results = [notifier.send("WATCHDOG=1") for _ in range(15)]  # past the queue length (10)
    assert time.monotonic() - start < 4  # about 0.2 s per refused message, not forever
    assert results[0] is True and results[-1] is False
    assert [e["event"] for e in logs] == ["notify_failed"]


def test_watchdog_interval_reads_usec_and_respects_watchdog_pid() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}) is None


def test_socket_address_maps_abstract_names_and_refuses_other_schemes() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == "\0abc"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1") is None


# --- the real daemon ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["socket", pytest.param("systemd-python", marks=needs_systemd_python)])
def test_the_daemon_reports_warm_up_ready_steps_pings_and_stopping(
    tmp_path: Path, tiny_model: Path, backend: str
) -> None:
    import threading
    import time

    from daemon_harness import Daemon, Dirs, drop_job, outcomes

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    got: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                got.append((time.monotonic(), sock.recv(65536).decode()))
            except socket.timeout:
                continue

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()

    def wait_for_message(predicate, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(m) for _, m in got):
                return
            time.sleep(0.05)
        raise AssertionError(f"no such notification in {timeout}s; got {[m for _, m in got]}")

    dirs = Dirs.make(tmp_path / "daemon", tiny_model, {"inference": {"prompt": "a red door"}})
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000", "INPAINTD_NOTIFY_BACKEND": backend}
    env.pop("JOURNAL_STREAM", None)
    daemon = Daemon(dirs, env=env)
    try:
        daemon.start(wait_ready=False)
        wait_for_message(lambda m: m == "READY=1")
        drop_job(dirs.inbox, "door")
        deadline = time.monotonic() + 60
        while "door" not in outcomes(dirs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "door" in outcomes(dirs), daemon.log_tail()
        wait_for_message(lambda m: m.startswith("STATUS=idle"), 10)
        wait_for_message(lambda m: m == "WATCHDOG=1", 10)
        code = daemon.stop()
        wait_for_message(lambda m: m == "STOPPING=1", 5)
    finally:
        done.set()
        daemon.stop()
        reader.join(5)
        sock.close()
    assert code == 0, daemon.log_tail()

    messages = [m for _, m in got]
    ready = messages.index("READY=1")
    before, after = messages[:ready], messages[ready + 1 :]
    # Warm-up: status and timeout extensions before READY, and READY only after warming.
    assert "STATUS=loading the model" in before
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in before)
    warming = [m for m in before if m.startswith("STATUS=warming up")]
    assert warming and warming[-1].split()[-1].split("/")[0] == warming[-1].split("/")[-1]  # n/n done
    # Running: watchdog pings, per-step status for the job, idle again, then STOPPING on SIGTERM.
    assert "WATCHDOG=1" in after
    assert any(re.fullmatch(r"STATUS=door: step \d+/\d+, 0 queued", m) for m in after), after
    assert after[-1] == "STOPPING=1" or "STOPPING=1" in after[-3:]
    assert not any(m == "READY=1" for m in after)
