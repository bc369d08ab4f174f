"""`inpaintd demo`: the daemon end to end on a throw-away inbox, as the README's first command.

It writes a config beside a fresh inbox/outbox, starts `inpaintd run` as a child process
(exactly what the systemd unit starts), drops the bundled sample job the way an scp client
would (temporary name, then rename), waits for the sidecar in the outbox, prints where the
result is, and stops the daemon with SIGTERM.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

DEMO_CONFIG = """\
# Written by `inpaintd demo`. The model is the embedded tiny RANDOM-WEIGHT model:
# it runs the whole pipeline but paints noise. See README "Installing a real model".
model:
  path: null
  threads: 0
inference:
  steps: 8
roi:
  min_size: 256
  max_size: 256
  bucket_sides: [256]
paths:
  inbox: inbox
  outbox: outbox
  failed: failed
  archive: archive
  state: state
watch:
  settle_seconds: 0.5
  poll_interval: 0.5
logging:
  format: console
"""

SAMPLE_FILES = ("sample.png", "sample.mask.png", "sample.txt")


def run_demo(directory: Path, timeout: float = 600.0) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("inbox", "outbox", "failed", "archive", "state"):
        (directory / sub).mkdir(exist_ok=True)
    config_path = directory / "config.yaml"
    config_path.write_text(DEMO_CONFIG, encoding="utf-8")
    outbox = directory / "outbox"
    before = set(outbox.glob("*.json")) | set((directory / "failed").glob("*/error.json"))

    print(f"demo: starting `inpaintd run --config {config_path}`", flush=True)
    daemon = subprocess.Popen([sys.executable, "-m", "inpaintd", "run", "--config", str(config_path)])
    try:
        _drop_sample(directory / "inbox")
        print(f"demo: dropped sample job into {directory / 'inbox'}; waiting for the outbox ...", flush=True)
        sidecar = _wait_for_result(outbox, before, directory / "failed", daemon, timeout)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    if sidecar is None:
        return 1
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    image = outbox / data.get("output_file", sidecar.with_suffix(".png").name)
    print(f"demo: result  {image}")
    print(f"demo: sidecar {sidecar}")
    print(f"demo: seed {data.get('seed')}, regions {[r['crop_box'] for r in data.get('regions', [])]}")
    if data.get("model", {}).get("random_weights"):
        print("demo: note: RANDOM WEIGHTS model; the painted area is noise by design")
    print(f"demo: daemon stopped (exit code {daemon.returncode})")
    return 0 if daemon.returncode == 0 else 1


def _drop_sample(inbox: Path) -> None:
    samples = resources.files("inpaintd.demo") / "samples"
    for name in SAMPLE_FILES:
        temp = inbox / f"{name}.part"
        with resources.as_file(samples / name) as source:
            shutil.copyfile(source, temp)
        temp.rename(inbox / name)


def _wait_for_result(
    outbox: Path, before: set[Path], failed: Path, daemon: subprocess.Popen[bytes], timeout: float
) -> Path | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = sorted(set(outbox.glob("sample*.json")) - before)
        if fresh:
            return fresh[0]
        failures = sorted(set(failed.glob("sample*/error.json")) - before)
        if failures:
            print(f"demo: the job failed: {failures[0].read_text(encoding='utf-8')}", file=sys.stderr)
            return None
        if daemon.poll() is not None:
            print(f"demo: the daemon exited early with code {daemon.returncode}", file=sys.stderr)
            return None
        time.sleep(0.2)
    print(f"demo: no result within {timeout:.0f} s", file=sys.stderr)
    return None
