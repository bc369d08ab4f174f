"""Logging: console and JSON lines, and a REAL journald reading our structured fields back.

The journald tests start /lib/systemd/systemd-journald by hand inside a private PID and
mount namespace (`unshare --pid --fork --kill-child --mount-proc --propagation private`)
with a tmpfs over /run, so the machine's /run, /var/log/journal and its own journald (if
any) are never touched, and everything started there dies with the namespace.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
from inpaintd.service.journal import (
    JournaldLogger,
    NativeJournal,
    field_name,
    journal_fields,
)
from inpaintd.service.logs import adopt_library_loggers, configure_logging

try:
    from systemd import journal as _sd_journal  # type: ignore[import-not-found]  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False

REPO = Path(__file__).resolve().parents[1]
JOURNALD = "/lib/systemd/systemd-journald"

# Guard rails, checked by the shell before anything starts: we must be in a new mount
# namespace (not the host's), and /run is replaced by a tmpfs before journald runs.
NAMESPACE_SCRIPT = r"""
set -eu
if [ "$(readlink /proc/self/ns/mnt)" = "$HOST_MNT_NS" ]; then echo "refusing: not in a private mount namespace" >&2; exit 97; fi
mount -t tmpfs -o mode=755 tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mkdir -p /run/systemd/journal /run/log
case "$MODE" in
  journald)
    /lib/systemd/systemd-journald &
    for i in $(seq 200); do [ -S /run/systemd/journal/socket ] && break; sleep .05; done
    [ -S /run/systemd/journal/socket ] || { echo "journald did not start" >&2; exit 98; }
    ;;
  stale)
    # A socket file with nobody behind it: what a crashed journald leaves.
    "$PYTHON" -c 'import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind("/run/systemd/journal/socket"); s.close()'
    ;;
esac
set +e
"$PYTHON" "$SCRIPT" >"$OUT_DIR/stdout" 2>"$OUT_DIR/stderr"
echo $? >"$OUT_DIR/rc"
set -e
if [ "$MODE" = journald ]; then
  journalctl --sync
  journalctl -o json --all --no-pager SYSLOG_IDENTIFIER=inpaintd >"$OUT_DIR/journal.json"
  journalctl -o json --all --no-pager INPAINTD_JOB=cat >"$OUT_DIR/journal-cat.json"
  journalctl -o json --all --no-pager INPAINTD_JOB=door >"$OUT_DIR/journal-door.json"
fi
"""


def _namespace_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root to make a private mount namespace"
    for tool in ("unshare", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.access(JOURNALD, os.X_OK):
        return f"{JOURNALD} not installed (apt-get install systemd)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare --mount not permitted here: {probe.stderr.decode().strip()}"
    return None


NAMESPACE_SKIP = _namespace_unavailable()
needs_namespace = pytest.mark.skipif(NAMESPACE_SKIP is not None, reason=f"private journald: {NAMESPACE_SKIP}")
needs_systemd_python = pytest.mark.skipif(
    not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed (scripts/setup-systemd-test-deps.sh installs it)"
)
TRANSPORTS = ["native", pytest.param("systemd-python", marks=needs_systemd_python)]


class Run:
    def __init__(self, out: Path) -> None:
        self.rc = int((out / "rc").read_text())
        self.stdout = (out / "stdout").read_text()
        self.stderr = (out / "stderr").read_text()
        self.out = out

    def journal(self, name: str = "journal.json") -> list[dict]:
        text = (self.out / name).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_in_namespace(tmp_path: Path, code: str, mode: str = "journald", env: dict | None = None) -> Run:
    script = tmp_path / "emit.py"
    script.write_text(textwrap.dedent(code))
    out = tmp_path / "out"
    out.mkdir()
    full_env = {
        **os.environ,
        "HOST_MNT_NS": os.readlink("/proc/self/ns/mnt"),
        "MODE": mode,
        "PYTHON": sys.executable,
        "SCRIPT": str(script),
        "OUT_DIR": str(out),
        "PYTHONPATH": str(REPO / "daemon"),
        **(env or {}),
    }
    full_env.pop("JOURNAL_STREAM", None)
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
         "bash", "-c", NAMESPACE_SCRIPT],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"namespace run failed ({proc.returncode}): {proc.stderr}"
    return Run(out)


EMIT = """
    import logging, structlog
    from inpaintd.service import logs
    from inpaintd.service.journal import journal_fields
    from inpaintd.service.logs import configure_logging, describe_backends
    backend = configure_logging("journald", level="debug", journal_prefer={transport!r})
    print(backend, describe_backends())
    log = structlog.get_logger("inpaintd.test")
    def job_step():
        log.info("job_done", job="cat", code="ok", seconds=12.3456, regions=2, work_size=[512, 384])
    job_step()
    log.debug("queued", job="dog", queue=3)
    log.warning("outbox_not_writable", job="cat", code="output_unwritable", path="/var/lib/inpaintd/outbox")
    try:
        {{}}["missing"]
    except KeyError:
        log.exception("job_crashed", job="cat", code="internal_error")
    log.info("multi_line", job="cat", detail="line one\\nline two")
    # A field quoting a user value is cut by the logger (quoting.LOG_VALUE_CHARS) ...
    log.info("bounded", job="dog", blob="y" * {big})
    # ... so a record this large only comes from inpaintd itself: the transport must still carry it.
    logs._state["sender"].sendv(journal_fields({{"event": "big", "level": "info", "job": "cat",
                                                      "blob": "x" * {big}}}))
    logging.getLogger("diffusers.pipelines").warning("a library says %s", "hello")
    print("alive")
"""


@needs_namespace
@pytest.mark.systemd
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_events_reach_a_real_journald_as_structured_fields_filterable_by_job(tmp_path: Path, transport: str) -> None:
    # 300 kB is more than one datagram carries: the native sender must pass it in a memfd.
    run = run_in_namespace(tmp_path, EMIT.format(transport=transport, big=300_000))
    assert run.rc == 0, run.stderr
    assert run.stdout.startswith(f"journald {{'log_backend': 'journald ({transport})'}}")
    assert "alive" in run.stdout
    assert "cannot log to journald" not in run.stderr

    entries = run.journal()
    by_event = {e["INPAINTD_EVENT"]: e for e in entries if "INPAINTD_EVENT" in e}
    assert set(by_event) >= {"job_done", "queued", "outbox_not_writable", "job_crashed", "multi_line", "big"}

    done = by_event["job_done"]
    assert done["MESSAGE"] == "job_done job=cat code=ok seconds=12.346 regions=2 work_size=[512,384]"
    assert done["PRIORITY"] == "6"
    assert done["INPAINTD_JOB"] == "cat"
    assert done["INPAINTD_CODE"] == "ok"
    assert done["INPAINTD_SECONDS"] == "12.346"
    assert done["INPAINTD_REGIONS"] == "2"
    assert done["INPAINTD_WORK_SIZE"] == "[512,384]"
    assert done["SYSLOG_IDENTIFIER"] == "inpaintd"
    # The call site is the caller's, not the logging module's.
    assert done["CODE_FUNC"] == "job_step" and done["CODE_FILE"].endswith("emit.py")

    assert by_event["queued"]["PRIORITY"] == "7" and by_event["queued"]["INPAINTD_QUEUE"] == "3"
    assert by_event["outbox_not_writable"]["PRIORITY"] == "4"
    crashed = by_event["job_crashed"]
    assert crashed["PRIORITY"] == "3"
    assert "Traceback (most recent call last)" in crashed["TRACEBACK"] and "KeyError: 'missing'" in crashed["TRACEBACK"]
    assert "KeyError: 'missing'" in crashed["MESSAGE"]
    assert by_event["multi_line"]["INPAINTD_DETAIL"] == "line one\nline two"
    assert len(by_event["big"]["INPAINTD_BLOB"]) == 300_000
    assert len(by_event["bounded"]["INPAINTD_BLOB"]) == 4000 and "more characters" in by_event["bounded"]["INPAINTD_BLOB"]

    library = [e for e in entries if e.get("INPAINTD_LOGGER") == "diffusers.pipelines"]
    assert library and library[0]["MESSAGE"] == "a library says hello" and library[0]["PRIORITY"] == "4"

    # journalctl INPAINTD_JOB=cat: only cat's entries come back.
    cat = run.journal("journal-cat.json")
    assert {e["INPAINTD_EVENT"] for e in cat} == {"job_done", "outbox_not_writable", "job_crashed", "multi_line", "big"}


@needs_namespace
@pytest.mark.systemd
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stale_journal_socket_never_crashes_and_falls_back_to_stderr_saying_so_once(
    tmp_path: Path, transport: str
) -> None:
    code = f"""
        import structlog
        from inpaintd.service.logs import configure_logging
        configure_logging("journald", journal_prefer={transport!r})
        log = structlog.get_logger()
        for i in range(3):
            log.info("job_done", job="cat", n=i)
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("job_crashed", job="cat")
        print("alive")
    """
    run = run_in_namespace(tmp_path, code, mode="stale")
    assert run.rc == 0, run.stderr
    assert run.stdout.strip() == "alive"
    assert run.stderr.count("cannot log to journald") == 1
    assert "ConnectionRefusedError" in run.stderr
    assert run.stderr.count("INFO job_done job=cat n=") == 3
    assert "ZeroDivisionError: division by zero" in run.stderr


@needs_namespace
@pytest.mark.systemd
def test_auto_picks_journald_only_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    code = """
        import os, sys
        from inpaintd.service.logs import configure_logging
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        print(configure_logging("auto"))
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # stderr was redirected elsewhere
        print(configure_logging("auto"))
        del os.environ["JOURNAL_STREAM"]
        print(configure_logging("auto"))
    """
    run = run_in_namespace(tmp_path, code)
    assert run.rc == 0, run.stderr
    assert run.stdout.split() == ["journald", "console", "console"]


def test_auto_without_journal_stream_is_console(monkeypatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert configure_logging("auto", stream=io.StringIO()) == "console"


def test_json_lines_carry_every_key_and_the_traceback() -> None:
    out = io.StringIO()
    assert configure_logging("json", stream=out) == "json"
    log = structlog.get_logger()
    log.info("job_done", job="cat", seconds=1.25)
    log.debug("hidden", job="cat")  # below the level
    try:
        raise ValueError("bad mask")
    except ValueError:
        log.exception("job_crashed", job="cat", code="internal_error")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["job_done", "job_crashed"]
    assert lines[0]["job"] == "cat" and lines[0]["seconds"] == 1.25 and lines[0]["level"] == "info"
    assert "timestamp" in lines[0]
    assert "ValueError: bad mask" in lines[1]["exception"] and lines[1]["level"] == "error"


def test_console_is_readable_plain_text_off_a_terminal_and_routes_library_logs() -> None:
    import logging

    out = io.StringIO()
    assert configure_logging("console", level="info", stream=out) == "console"
    structlog.get_logger().info("job_done", job="cat", seconds=1.5)
    logging.getLogger("some.library").warning("careful")
    logging.getLogger("some.library").info("chatter")  # libraries stay at WARNING
    text = out.getvalue()
    assert "\x1b[" not in text  # no colour codes into a file or pipe
    assert "job_done" in text and "job=cat" in text and "seconds=1.5" in text
    assert "careful" in text and "chatter" not in text


def test_hf_libraries_that_stop_propagation_are_adopted_into_the_pipeline() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.test")  # the library configures itself: own handler, no propagation
    out = io.StringIO()
    configure_logging("json", stream=out)
    assert "transformers" in adopt_library_loggers()
    # importing inpaintd defaults TRANSFORMERS_VERBOSITY to "error" (torchvision noise at import),
    # so an error is what reaches the pipeline by default.
    hf_logging.get_logger("transformers.test").error("a model error")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["logger_name"], e["level"]) for e in lines] == [("a model error", "transformers.test", "error")]


def test_console_uses_colour_on_a_terminal(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    configure_logging("console", stream=out)
    structlog.get_logger().warning("outbox_not_writable", job="cat")
    assert "\x1b[" in out.getvalue()


def test_journal_fields_name_mapping_and_priorities() -> None:
    fields = dict(
        journal_fields(
            {"event": "job_done", "level": "critical", "job": "a b", "weird-key.x": 1, "none": None, "_private": 1}
        )
    )
    assert fields["PRIORITY"] == b"2"
    assert fields["INPAINTD_JOB"] == b"a b"
    assert fields["INPAINTD_WEIRD_KEY_X"] == b"1"
    assert "INPAINTD_NONE" not in fields and "INPAINTD__PRIVATE" not in fields
    assert fields["MESSAGE"] == b'job_done job="a b" weird-key.x=1 none=None'
    assert len(field_name("k" * 200)) == 64


def test_native_encoding_uses_the_binary_form_for_values_with_newlines() -> None:
    data = NativeJournal.encode([("MESSAGE", b"one"), ("TRACEBACK", b"a\nb")])
    assert data == b"MESSAGE=one\nTRACEBACK\n" + (3).to_bytes(8, "little") + b"a\nb\n"


def test_a_failing_transport_falls_back_and_recovers_without_raising() -> None:
    class Flaky:
        fail = True

        def sendv(self, fields):
            if self.fail:
                raise ConnectionRefusedError(111, "Connection refused")

        def close(self):
            pass

    out = io.StringIO()
    sender = Flaky()
    logger = JournaldLogger(sender, "test", fallback=out)
    logger.msg({"event": "a", "level": "info", "job": "cat"})
    logger.msg({"event": "b", "level": "error", "job": "cat"})
    sender.fail = False
    logger.msg({"event": "c", "level": "info"})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("inpaintd: cannot log to journald (ConnectionRefusedError")
    assert lines[1:3] == ["INFO a job=cat", "ERROR b job=cat"]
    assert lines[3] == "inpaintd: journald reachable again, logging there"


def test_bad_format_or_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="console"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="debug"):
        configure_logging("console", level="loud")


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    configure_logging("console", stream=sys.stderr)


DAEMON_RUN = """
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from daemon_harness import Daemon, Dirs, drop_job, outcomes
    dirs = Dirs.make(Path({root!r}), Path({model!r}),
                     {{"inference": {{"prompt": "a red door"}}, "logging": {{"format": "journald", "level": "info"}}}})
    daemon = Daemon(dirs).start()
    drop_job(dirs.inbox, "door")
    deadline = time.monotonic() + 60
    while "door" not in outcomes(dirs) and time.monotonic() < deadline:
        time.sleep(0.1)
    code = daemon.stop()
    print(json.dumps({{"code": code, "done": "door" in outcomes(dirs), "log": dirs.log.read_text()}}))
"""


@needs_namespace
@pytest.mark.systemd
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["journald", "stale"])
def test_the_daemon_logs_its_jobs_to_journald_or_survives_a_stale_socket(
    tmp_path: Path, tiny_model: Path, mode: str
) -> None:
    code = DAEMON_RUN.format(tests=str(REPO / "tests"), root=str(tmp_path / "d"), model=str(tiny_model))
    run = run_in_namespace(tmp_path, code, mode=mode)
    assert run.rc == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["done"] and result["code"] == 0, result["log"]
    if mode == "stale":
        # Nothing reached journald, the daemon said so once and carried on logging to stderr.
        assert result["log"].count("cannot log to journald") == 1, result["log"]
        assert "ConnectionRefusedError" in result["log"]
        assert "job.done job=door" in result["log"] or "job=door" in result["log"]
        return
    assert "cannot log to journald" not in result["log"]
    entries = [e for e in run.journal() if "INPAINTD_EVENT" in e]
    events = [e["INPAINTD_EVENT"] for e in entries]
    assert "service.ready" in events and "service.stopped" in events, events
    door = run.journal("journal-door.json")  # journalctl INPAINTD_JOB=door
    assert door and {e["INPAINTD_JOB"] for e in door} == {"door"}
    assert "job.done" in {e["INPAINTD_EVENT"] for e in door}, events
