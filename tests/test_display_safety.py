"""Names from drops never reach a person raw (issue 22 item 2), against a real running daemon.

File names holding an OSC 52 clipboard write, an ESC[2J, a C1 CSI (U+009B) and a bidi override
(U+202E) are dropped into a live `inpaintd run` that logs to its console. Whatever the daemon
shows a person (its console log, status.json's lines, `inpaintd status`) holds none of them raw;
the machine records (error.json, the sidecar) keep the exact names, JSON-escaped, so a consumer
still finds the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from daemon_harness import Daemon, Dirs, image_bytes, mask_bytes, put, wait_for

pytestmark = pytest.mark.slow

HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}
NAMES = {
    "clip": "\x1b]52;c;aGVsbG8=\x07clip",  # OSC 52: writes the terminal's clipboard
    "clear": "wipe\x1b[2J\x1b[H",  # clears the screen
    "csi": "c1\u009b31mred",  # a one-byte CSI
    "bidi": "invoice\u202egnp.exe",  # shows as invoice"exe.png"
}


def hidden_in(text: str) -> list[str]:
    """Hidden characters in text that is meant for a person, other than line structure."""
    return sorted({repr(c) for c in text if c not in "\n\t" and unicodedata.category(c) in HIDDEN})


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("display")
    dirs = Dirs.make(root, tiny_model, {"logging": {"format": "console"}})
    daemon = Daemon(dirs).start(wait_ready=False)
    try:
        for key, name in NAMES.items():
            put(dirs.inbox / f"{name}.png", image_bytes(seed=len(key)))
            put(dirs.inbox / f"{name}.mask.png", mask_bytes())
            put(dirs.inbox / f"{name}.txt", b"a small red house")
        found = wait_for(dirs, list(NAMES.values()), 120, daemon)
        status = subprocess.run([sys.executable, "-m", "inpaintd", "status", "--config", str(dirs.config)],
                                capture_output=True, text=True, timeout=60)
        yield dirs, daemon, found, status
    finally:
        daemon.stop()


def test_every_hostile_name_ends_as_its_job_says(run) -> None:
    dirs, daemon, found, _status = run
    assert set(found) == set(NAMES.values()), daemon.log_tail()
    # A name with control characters is refused (job_unsafe, its files kept in failed/); a
    # bidi override is printable text to the filesystem, so that job is painted and published.
    assert {k: found[NAMES[k]][0].code for k in NAMES} == {"clip": "job_unsafe", "clear": "job_unsafe",
                                                           "csi": "job_unsafe", "bidi": None}


def test_the_console_log_shows_no_hidden_character(run) -> None:
    dirs, daemon, _found, _status = run
    text = dirs.log.read_bytes().decode("utf-8", "surrogateescape")
    assert "job_unsafe" in text and "job.done" in text
    assert hidden_in(text) == []
    assert "\\x1b" in text and "\\u202e" in text  # the names are there, visibly escaped


def test_status_json_and_inpaintd_status_show_no_hidden_character(run) -> None:
    dirs, _daemon, _found, status = run
    assert status.returncode == 0, status.stderr
    assert hidden_in(status.stdout) == [] and hidden_in(status.stderr) == []
    raw = (dirs.state / "status.json").read_bytes().decode("utf-8")
    assert hidden_in(raw) == []
    last = json.loads(raw).get("last_error") or {}
    assert last.get("code") == "job_unsafe" and ("\\x1b" in last.get("job", "") or "\\x9b" in last.get("job", ""))


def test_records_keep_the_exact_names_with_no_raw_control(run) -> None:
    dirs, _daemon, _found, _status = run
    records = [path.read_bytes().decode("utf-8") for path in dirs.failed.glob("*/error.json")]
    assert len(records) == 3
    for raw in records:
        assert hidden_in(raw) == []
    assert {json.loads(raw)["job"] for raw in records} == {NAMES["clip"], NAMES["clear"], NAMES["csi"]}  # exact
    for key in ("bidi",):
        sidecar = dirs.outbox / f"{NAMES[key]}.json"
        raw = sidecar.read_bytes().decode("utf-8")
        assert hidden_in(raw) == []
        data = json.loads(raw)
        assert data["name"] == NAMES[key] and os.path.exists(dirs.outbox / data["output_file"])
