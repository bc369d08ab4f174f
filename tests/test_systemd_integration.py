"""The real unit under a real systemd: start/READY/STATUS, a job, journald, watchdog, restart, stop.

How, and the guard rails that keep this machine safe (do not remove them):

- systemd runs as PID 1 of a throw-away container: `systemd-nspawn -D / --volatile=yes`
  boots the host's /usr read-only on a tmpfs root, so the container's /etc, /var, /run and
  /tmp are fresh and empty: boot-time tmpfiles clean nothing of the host's, and no host
  service config exists in there. `--private-network` gives it no network.
- nspawn runs inside `unshare --mount --propagation private` with a tmpfs over /run/systemd,
  so it neither sees nor talks to a systemd/machined of the host (`--register=no --keep-unit`).
  The boot script refuses to run when it finds itself in the host's mount namespace.
- The container boots `basic.target` only, with a fixed /etc/machine-id (so no first-boot
  "preset-all" enables every installed service), and `systemd.firstboot=off` (no prompt).
- Its cgroups live under a cgroup made for this run alone; teardown stops the container
  (SIGTERM, then SIGKILL to its whole process group) and removes every cgroup it left.

What runs inside is the repository's systemd/inpaintd.service unchanged (User=inpaintd,
ProtectSystem=strict, PrivateNetwork, SystemCallFilter, ...), the user and folders come from
systemd/inpaintd.sysusers and systemd/inpaintd.tmpfiles as systemd itself applies them, and
/opt/inpaintd/venv is a venv of the host's /usr/bin/python3 that sees this checkout's
packages. A drop-in only shortens WatchdogSec/RestartSec so the test takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import FAST_SETTINGS, image_bytes, job_bytes

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "inpaintd.service"
SYSUSERS = REPO / "systemd" / "inpaintd.sysusers"
TMPFILES = REPO / "systemd" / "inpaintd.tmpfiles"
ALLOCATOR_DROPIN = REPO / "systemd" / "inpaintd-allocator.conf"
# The container boots this machine's own /usr, so the service can preload tcmalloc exactly
# when this machine has it (scripts/setup-systemd-test-deps.sh installs it).
HOST_TCMALLOC = sorted(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4"))
WATCHDOG_SEC = 8  # the test drop-in's WatchdogSec (the unit's own is 2 min)

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


def _why_no_container() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, systemd-nspawn)"
    for tool in ("systemd-nspawn", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            pkg = "systemd-container" if tool == "systemd-nspawn" else "util-linux"
            return f"{tool} not installed (apt-get install {pkg}; scripts/setup-systemd-test-deps.sh does it)"
    if not Path("/usr/bin/python3").exists():
        return "no /usr/bin/python3 for the container's venv"
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    )
    mine = "%d.%d" % sys.version_info[:2]
    if probe.stdout.strip() != mine:
        return f"/usr/bin/python3 is {probe.stdout.strip() or '?'}, the test venv {mine}: packages would not load"
    if not _cgroup_roots():
        return "no writable cgroup hierarchy for the container"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount not permitted: {probe.stderr.strip()}"
    return None


def _cgroup_roots() -> list[Path]:
    """The cgroup directories this process sits in, for the hierarchies nspawn uses."""
    roots = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            base = Path("/sys/fs/cgroup/systemd")
        elif controllers == "":
            unified = Path("/sys/fs/cgroup/unified")
            base = unified if unified.is_dir() else Path("/sys/fs/cgroup")
        else:
            continue
        here = base / path.lstrip("/")
        if (here / "cgroup.procs").exists() and os.access(here, os.W_OK):
            roots.append(here)
    return roots


BOOT_SCRIPT = r"""
set -eu
# Guard rail: never boot anything from the host's mount namespace.
if [ "$(readlink /proc/self/ns/mnt)" = "$HOST_MNT_NS" ]; then
  echo "refusing to boot: not in a private mount namespace" >&2; exit 97
fi
# A cgroup of our own, so what nspawn creates (payload/, supervisor/) is ours to remove.
for dir in $CGROUP_DIRS; do mkdir -p "$dir"; echo $$ > "$dir/cgroup.procs"; done
# Hide the host's systemd runtime dir: nspawn must not find or register with a host manager.
mkdir -p /run/systemd
mount -t tmpfs -o mode=755 tmpfs /run/systemd
exec systemd-nspawn -D / --volatile=yes --register=no --keep-unit --private-network -b -M "$MACHINE" \
  --bind-ro="$STAGE/venv:/opt/inpaintd/venv" \
  --bind-ro="$SITE:/opt/inpaintd/site" \
  --bind-ro="$SRC:/opt/inpaintd/src" \
  --bind-ro="$STAGE/model:/opt/inpaintd/model" \
  --bind-ro="$STAGE/probe.py:/opt/inpaintd/probe.py" \
  --bind-ro="$STAGE/config.yaml:/etc/inpaintd/config.yaml" \
  --bind-ro="$STAGE/machine-id:/etc/machine-id" \
  --bind-ro="$UNIT:/etc/systemd/system/inpaintd.service" \
  --bind-ro="$STAGE/dropin.conf:/etc/systemd/system/inpaintd.service.d/test.conf" \
  ${ALLOCATOR_BIND:+"$ALLOCATOR_BIND"} \
  --bind-ro="$SYSUSERS:/etc/sysusers.d/inpaintd.conf" \
  --bind-ro="$TMPFILES:/etc/tmpfiles.d/inpaintd.conf" \
  -- systemd.firstboot=off systemd.unit=basic.target
"""

DROPIN = f"""\
# Test only: a hung loop should trip the watchdog in seconds, not minutes.
[Service]
WatchdogSec={WATCHDOG_SEC}s
RestartSec=1s
"""

# Runs one oneDNN convolution (what the UNet does); used to check which hardening options
# torch survives under the real systemd's seccomp filters.
PROBE = """\
import torch
# The size of a UNet block's convolution at 512 px (64x64 latents): oneDNN JIT-compiles it.
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
with torch.no_grad():
    conv(torch.randn(1, 64, 64, 64))
    conv.to(torch.bfloat16)(torch.randn(1, 64, 64, 64, dtype=torch.bfloat16))
print("conv ok")
"""


class Container:
    """A booted nspawn container with systemd as PID 1; commands run in it through nsenter."""

    def __init__(self, stage: Path) -> None:
        self.stage = stage
        self.machine = f"inpaintd-ci-{uuid.uuid4().hex[:8]}"
        self.cgroup_dirs = [root / self.machine for root in _cgroup_roots()]
        self.log_path = stage / "nspawn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # -- lifecycle --------------------------------------------------------------------------
    def boot(self, timeout: float = 90.0) -> None:
        env = {
            **os.environ,
            "HOST_MNT_NS": os.readlink("/proc/self/ns/mnt"),
            "CGROUP_DIRS": " ".join(str(d) for d in self.cgroup_dirs),
            "MACHINE": self.machine,
            "STAGE": str(self.stage),
            "UNIT": str(UNIT),
            "SYSUSERS": str(SYSUSERS),
            "TMPFILES": str(TMPFILES),
            "SITE": sysconfig.get_paths()["purelib"],
            "SRC": str(REPO / "daemon"),
            "SYSTEMD_LOG_COLOR": "0",
            # What install.sh does where the library is installed.
            "ALLOCATOR_BIND": (
                f"--bind-ro={ALLOCATOR_DROPIN}:/etc/systemd/system/inpaintd.service.d/10-allocator.conf"
                if HOST_TCMALLOC else ""
            ),
        }
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", BOOT_SCRIPT],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no container init after {timeout}s:\n{self.log_tail()}")
            self.pid1 = self._find_init()
            time.sleep(0.1)
        while True:  # the manager's private socket appears a moment after PID 1 does
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(1.0, deadline - time.monotonic()))
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"container did not finish booting: {state.stdout} {state.stderr}\n{self.log_tail()}")
            time.sleep(0.2)

    def _find_init(self) -> int:
        """The container's PID 1: the process named systemd below our nspawn."""
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "systemd":
                    return child
                todo.append(child)
        return 0

    def teardown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        if self.pid1:
            # Anything still alive in the container's PID namespace dies with its init.
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for top in self.cgroup_dirs:
            remove_cgroup_tree(top)

    # -- helpers ------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 60.0, input: str | None = None):
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *argv],
            capture_output=True, text=True, timeout=max(timeout, 1.0), input=input,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0", "LANG": "C.UTF-8"},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def show(self, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", "inpaintd.service", *[f"-p{p}" for p in props]]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        self.run(["journalctl", "--sync"], check=False)
        out = self.run(["journalctl", "-o", "json", "--no-pager", *matches], check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def root(self) -> Path:
        """The container's file system, seen from the host."""
        return Path(f"/proc/{self.pid1}/root")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def diagnostics(self) -> str:
        status = self.run(["systemctl", "status", "--no-pager", "-l", "inpaintd"], check=False).stdout
        journal = self.run(["journalctl", "--no-pager", "-n", "80", "-u", "inpaintd"], check=False).stdout
        return f"{status}\n--- journal ---\n{journal}"


def remove_cgroup_tree(top: Path) -> None:
    """rmdir a cgroup and everything below it, deepest first (only empty cgroups go)."""
    if not top.is_dir():
        return
    for _ in range(50):
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            try:
                d.rmdir()
            except OSError:
                pass
        if not top.exists():
            return
        time.sleep(0.1)  # processes still leaving
    raise RuntimeError(f"cgroup {top} could not be removed (processes left?)")


def stage_files(stage: Path, model: Path) -> None:
    """The venv, sources, model and config bound into the container."""
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(stage / "venv")], check=True)
    version = "python%d.%d" % sys.version_info[:2]
    site_dir = stage / "venv" / "lib" / version / "site-packages"
    # The checkout's sources first, then the test venv's packages (torch, diffusers, ...).
    (site_dir / "inpaintd_host.pth").write_text(
        "import sys; sys.path.insert(0, '/opt/inpaintd/src')\n"
        "import site; site.addsitedir('/opt/inpaintd/site')\n"
    )
    script = stage / "venv" / "bin" / "inpaintd"
    script.write_text("#!/opt/inpaintd/venv/bin/python\nimport sys\nfrom inpaintd.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    (stage / "model").mkdir()
    shutil.copytree(model, stage / "model", dirs_exist_ok=True)
    (stage / "probe.py").write_text(PROBE)
    (stage / "dropin.conf").write_text(DROPIN)
    (stage / "machine-id").write_text(uuid.uuid4().hex + "\n")
    settings = {section: dict(values) for section, values in FAST_SETTINGS.items()}
    settings["model"] = {**settings["model"], "path": "/opt/inpaintd/model", "cache_dir": "/var/cache/inpaintd"}
    settings["inference"] = {**settings["inference"], "prompt": "a small red house"}
    settings["logging"] = {"format": "auto", "level": "info"}  # under systemd: journald, found by itself
    (stage / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    for path in stage.rglob("*"):  # readable by the unprivileged service user
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o005 if path.is_dir() else path.stat().st_mode | 0o004)
    stage.chmod(0o755)


NO_CONTAINER = _why_no_container()


@pytest.fixture(scope="module")
def container(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    if NO_CONTAINER is not None:
        pytest.skip(f"cannot boot a systemd container here: {NO_CONTAINER}")
    stage = tmp_path_factory.mktemp("systemd-stage")
    stage_files(stage, tiny_model)
    box = Container(stage)
    try:
        box.boot()
        yield box
    finally:
        box.teardown()


@pytest.fixture(scope="module")
def started(container: Container):
    """`systemctl start inpaintd` once; returns how long it blocked."""
    began = time.monotonic()
    proc = container.run(["systemctl", "start", "inpaintd.service"], check=False, timeout=180)
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, f"systemctl start failed: {proc.stderr}\n{container.diagnostics()}"
    return elapsed


def service_events(container: Container, *matches: str) -> list[dict[str, Any]]:
    return [e for e in container.journal("-u", "inpaintd.service", *matches) if "INPAINTD_EVENT" in e]


def wait_until(predicate, timeout: float, what: str, container: Container | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{container.diagnostics() if container else ''}")


def test_systemctl_start_returns_once_ready_with_status_text(container: Container, started: float) -> None:
    props = container.show("ActiveState", "SubState", "StatusText", "MainPID", "Type", "NotifyAccess", "WatchdogUSec", "User")
    # Type=notify: `systemctl start` blocks until READY=1, so the unit is already running here.
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
    assert props["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    assert props["User"] == "inpaintd"
    assert props["StatusText"].startswith("idle, 0 queued"), props["StatusText"]
    events = [e["INPAINTD_EVENT"] for e in service_events(container)]
    # READY came after the model was loaded and warmed: the warm-up is logged before it.
    assert "service.ready" in events, events
    assert any(e.startswith("service.warming") for e in events[: events.index("service.ready")]), events
    # The daemon runs as the unprivileged user, with no capabilities.
    pid = props["MainPID"]
    status = container.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = container.run(["id", "-u", "inpaintd"]).stdout.strip()
    assert fields["Uid"].split()[0] == uid
    assert int(fields["CapEff"].strip(), 16) == 0 and int(fields["CapBnd"].strip(), 16) == 0
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"


def test_the_service_runs_on_tcmalloc_through_the_allocator_drop_in(container: Container, started: float) -> None:
    if not HOST_TCMALLOC:
        pytest.skip("libtcmalloc-minimal4 is not installed here (scripts/setup-systemd-test-deps.sh installs it)")
    props = container.show("MainPID", "Environment", "DropInPaths")
    assert "10-allocator.conf" in props["DropInPaths"], props
    assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in props["Environment"].split(), props
    # Found by soname and really mapped into the daemon (not just named in its environment).
    maps = container.run(["cat", f"/proc/{props['MainPID']}/maps"]).stdout
    assert "libtcmalloc_minimal.so.4" in maps


def test_journal_carries_structured_fields_from_the_service(container: Container, started: float) -> None:
    entries = service_events(container)
    ready = [e for e in entries if e["INPAINTD_EVENT"] == "service.ready"][-1]
    assert ready["_TRANSPORT"] == "journal"  # native journal entry, not a parsed stderr line
    assert ready["SYSLOG_IDENTIFIER"] == "inpaintd" and ready["PRIORITY"] == "6"
    assert ready["_SYSTEMD_UNIT"] == "inpaintd.service"
    assert ready["MESSAGE"].startswith("service.ready")


def test_a_dropped_job_produces_its_result_and_its_journal_lines(container: Container, started: float) -> None:
    root = container.root()
    inbox = root / "var/lib/inpaintd/inbox"
    outbox = root / "var/lib/inpaintd/outbox"
    drop_gid = int(container.run(["getent", "group", "inpaintd-drop"]).stdout.split(":")[2])
    # Like an scp/SMB user of the drop group: files owned by someone else, group-readable.
    for name, data in job_bytes("porch").items():
        tmp = inbox / f".{name}.part"
        tmp.write_bytes(data)
        os.chown(tmp, 0, drop_gid)
        tmp.chmod(0o640)
        tmp.rename(inbox / name)
    sidecar = outbox / "porch.json"
    wait_until(sidecar.exists, 60, "porch.json in the outbox", container)
    result = json.loads(sidecar.read_text())
    assert (outbox / result.get("output_file", "porch.png")).exists()
    st = sidecar.stat()
    assert st.st_gid == drop_gid and st.st_mode & 0o777 == 0o640, oct(st.st_mode)  # setgid outbox + UMask=0027
    # `journalctl -u inpaintd INPAINTD_JOB=porch` finds this job's lines, and only those.
    lines = wait_until(
        lambda: [e for e in service_events(container, "INPAINTD_JOB=porch") if e["INPAINTD_EVENT"] == "job.done"]
        and service_events(container, "INPAINTD_JOB=porch"),
        10, "job.done for porch in the journal", container,
    )
    assert {e["INPAINTD_JOB"] for e in lines} == {"porch"}
    assert "job.done" in {e["INPAINTD_EVENT"] for e in lines}
    wait_until(lambda: container.show("StatusText")["StatusText"].startswith("idle"), 10, "idle status", container)


@pytest.mark.skipif(shutil.which("jpegtran") is None, reason="jpegtran not installed (scripts/setup-image-deps.sh)")
def test_a_jpeg_job_is_spliced_by_jpegtran_under_the_hardened_unit(container: Container, started: float) -> None:
    """ProtectSystem=strict, PrivateTmp, SystemCallFilter: the service can still run /usr/bin/jpegtran."""
    root = container.root()
    inbox = root / "var/lib/inpaintd/inbox"
    outbox = root / "var/lib/inpaintd/outbox"
    files = job_bytes("deck", size=(96, 80))
    files["deck.jpg"] = image_bytes((96, 80), "JPEG", quality=90)
    del files["deck.png"]
    for name, data in files.items():
        tmp = inbox / f".{name}.part"
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.rename(inbox / name)
    sidecar = outbox / "deck.json"
    wait_until(sidecar.exists, 60, "deck.json in the outbox", container)
    output = json.loads(sidecar.read_text())["output"]
    assert output["jpeg_mode"] == "lossless-outside", output


def test_a_hung_loop_trips_the_watchdog_and_restart_brings_it_back(container: Container, started: float) -> None:
    before = container.show("MainPID", "NRestarts")
    old_pid = before["MainPID"]
    container.run(["kill", "-STOP", old_pid])  # the loop stops pinging, as a deadlock would
    began = time.monotonic()

    def restarted() -> dict[str, str] | None:
        props = container.show("MainPID", "NRestarts", "ActiveState", "SubState")
        ok = props["MainPID"] not in ("0", old_pid) and props["ActiveState"] == "active" and props["SubState"] == "running"
        return props if ok else None

    props = wait_until(restarted, WATCHDOG_SEC + 90, "a restarted, ready inpaintd", container)
    elapsed = time.monotonic() - began
    assert int(props["NRestarts"]) == int(before["NRestarts"]) + 1
    assert elapsed >= WATCHDOG_SEC - 1
    messages = [e.get("MESSAGE", "") for e in container.journal("-u", "inpaintd.service")]
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]
    assert container.run(["test", "-d", f"/proc/{old_pid}"], check=False).returncode != 0


def test_systemctl_stop_exits_cleanly(container: Container, started: float) -> None:
    container.run(["systemctl", "stop", "inpaintd.service"], timeout=60)
    props = container.show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode", "MainPID")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    events = [e["INPAINTD_EVENT"] for e in service_events(container)]
    assert events[-1] == "service.stopped", events[-5:]


@pytest.mark.parametrize(
    "properties, works",
    [
        ([], True),
        (["MemoryDenyWriteExecute=yes"], False),  # oneDNN's JIT needs W+X memory
        (["SystemCallFilter=@system-service", "SystemCallFilter=~@privileged", "SystemCallErrorNumber=EPERM"], True),
        # Runs with EPERM, though unpinned: why the unit leaves @resources allowed is in its comments.
        (["SystemCallFilter=@system-service", "SystemCallFilter=~@resources", "SystemCallErrorNumber=EPERM"], True),
    ],
    ids=["plain", "MemoryDenyWriteExecute", "unit-syscall-filter", "no-resources-syscalls"],
)
def test_which_hardening_options_torch_survives(container: Container, properties: list[str], works: bool | None,
                                                record_property) -> None:
    argv = ["systemd-run", "--wait", "--pipe", "--quiet", "-p", "User=inpaintd", "-p", "NoNewPrivileges=yes"]
    for prop in properties:
        argv += ["-p", prop]
    argv += ["/opt/inpaintd/venv/bin/python", "/opt/inpaintd/probe.py"]
    proc = container.run(argv, check=False, timeout=120)
    ok = proc.returncode == 0 and "conv ok" in proc.stdout
    record_property("probe", f"{properties}: {'works' if ok else 'fails'}: {proc.stderr.strip()[-300:]}")
    print(f"{properties}: {'works' if ok else 'FAILS'} (rc {proc.returncode})\n{proc.stdout[-300:]}{proc.stderr[-600:]}")
    if works is not None:
        assert ok == works, proc.stdout + proc.stderr
    if works is False:
        assert "could not create a primitive" in proc.stderr
