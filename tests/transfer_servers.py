"""Real file-transfer servers for tests: an sshd and an smbd on 127.0.0.1, started by the test.

Neither touches the system services or /etc: each runs in the foreground from a config file in
a temp folder, with its own host key / passdb, on a free high port bound to 127.0.0.1 only,
and is stopped by its pid. `SshServer.unavailable()` / `SmbServer.unavailable()` say why a
server cannot run here (missing binary, not root), for pytest.skip.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SMBD = shutil.which("smbd") or ("/usr/sbin/smbd" if os.path.exists("/usr/sbin/smbd") else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s: {log.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, group: bool = False) -> None:
    """SIGTERM (to the server's own process group when it has one), SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)  # proc.pid leads its own session (start_new_session)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)


class SshServer:
    """sshd -D on 127.0.0.1:PORT, key-only login as the current user, sftp subsystem in-process."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.key = self.dir / "client_key"
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        for tool in ("ssh", "scp", "ssh-keygen", "rsync"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (scripts/setup-transfer-test-deps.sh installs it as root)"
        if SSHD is None:
            return "sshd is not installed (openssh-server; scripts/setup-transfer-test-deps.sh installs it as root)"
        return None

    def start(self) -> "SshServer":
        host_key = self.dir / "host_key"
        for key in (host_key, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        authorized = self.dir / "authorized_keys"
        shutil.copy(f"{self.key}.pub", authorized)
        os.chmod(authorized, 0o600)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir sshd insists on
        config = self.dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    "StrictModes no",  # the keys live under /tmp
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {self.user}",
                    "Subsystem sftp internal-sftp",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, 15, self.proc, self.log)
        return self

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.key),
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes",
        ]

    def ssh_command(self) -> str:
        """The `-e` argument for rsync."""
        return " ".join(["ssh", "-p", str(self.port), *self.ssh_options()])

    def target(self, remote_path: Path) -> str:
        return f"{self.user}@127.0.0.1:{remote_path}"

    def scp(
        self, files: list[Path], remote_dir: Path, limit_kbit: int | None = None, legacy: bool = False, preserve: bool = False
    ) -> subprocess.Popen[bytes]:
        cmd = ["scp", "-q", "-P", str(self.port), *self.ssh_options()]
        if legacy:
            cmd.append("-O")  # the old scp protocol instead of SFTP
        if preserve:
            cmd.append("-p")  # keep mtimes: the server sets them after closing each file
        if limit_kbit:
            cmd += ["-l", str(limit_kbit)]
        cmd += [str(f) for f in files] + [self.target(remote_dir) + "/"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def rsync(self, files: list[Path], remote_dir: Path, bwlimit_kbyte: int | None = None, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        cmd = ["rsync", "-e", self.ssh_command()]
        if bwlimit_kbyte:
            cmd.append(f"--bwlimit={bwlimit_kbyte}")
        cmd += extra or []
        cmd += [str(f) for f in files] + [self.target(remote_dir) + "/"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        _stop(self.proc)


class SmbServer:
    """smbd --foreground serving one share [inbox] on 127.0.0.1:PORT, a test user in a private passdb."""

    def __init__(self, workdir: Path, share: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.share = share
        self.port = free_port()
        self.user = getpass.getuser()
        self.password = "inpaintd-test-" + os.urandom(4).hex()
        self.conf = self.dir / "smb.conf"
        self.log = self.dir / "smbd.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        if SMBD is None:
            return "smbd is not installed (samba; scripts/setup-transfer-test-deps.sh installs it as root)"
        for tool in ("smbclient", "smbpasswd"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (scripts/setup-transfer-test-deps.sh installs it as root)"
        if os.geteuid() != 0:
            return "smbd needs root to switch to the connecting user"
        return None

    def start(self) -> "SmbServer":
        d = self.dir
        for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log"):
            (d / sub).mkdir(exist_ok=True)
        self.conf.write_text(
            f"""[global]
  server role = standalone server
  smb ports = {self.port}
  interfaces = 127.0.0.1
  bind interfaces only = yes
  disable netbios = yes
  private dir = {d / 'private'}
  lock directory = {d / 'lock'}
  state directory = {d / 'state'}
  cache directory = {d / 'cache'}
  pid directory = {d / 'pid'}
  ncalrpc dir = {d / 'ncalrpc'}
  log file = {d / 'log' / 'smbd.log'}
  passdb backend = tdbsam:{d / 'private' / 'passdb.tdb'}
  load printers = no
  printcap name = /dev/null
  disable spoolss = yes
  server min protocol = SMB2
[inbox]
  path = {self.share}
  read only = no
  valid users = {self.user}
"""
        )
        subprocess.run(
            ["smbpasswd", "-c", str(self.conf), "-a", "-s", self.user],
            input=f"{self.password}\n{self.password}\n".encode(),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(self.log, "wb") as log:
            # Its own session: on shutdown smbd signals its whole process group, which must not
            # be the test runner's.
            self.proc = subprocess.Popen(
                [SMBD, "--foreground", "--no-process-group", "--debug-stdout", "-s", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_port(self.port, 20, self.proc, self.log)
        return self

    def client(self, commands: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """smbclient -c COMMANDS against //127.0.0.1/inbox."""
        cmd = [
            "smbclient", "-s", str(self.conf), "-p", str(self.port), "-U", f"{self.user}%{self.password}",
            "//127.0.0.1/inbox", "-c", commands,
        ]
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        _stop(self.proc, group=True)
