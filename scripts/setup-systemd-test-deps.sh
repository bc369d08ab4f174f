#!/usr/bin/env bash
# What the systemd tests need (CI calls this; idempotent, Debian/Ubuntu, root):
#   libsystemd-dev + pkg-config  so `pip install systemd-python` can build
#   systemd                      systemd-journald, journalctl, systemd-analyze
#   systemd-container            systemd-nspawn (tests/test_systemd_integration.py)
#   acl, util-linux              setfacl (install.sh), unshare/nsenter
#   libtcmalloc-minimal4         the allocator install.sh preloads into the service
# then systemd-python into the test venv (default .venv, or $VENV, or the python given as $1).
set -euo pipefail
python=${1:-${VENV:-.venv}/bin/python}
[ -x "$python" ] || python=$(command -v python3)
need=()
for pkg in libsystemd-dev pkg-config systemd systemd-container acl util-linux libtcmalloc-minimal4; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "setup-systemd-test-deps: need root to apt-get install ${need[*]}" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ! "$python" -c 'from systemd import daemon, journal' 2>/dev/null; then
  "$python" -m pip install -q --disable-pip-version-check "systemd-python>=235"
fi
"$python" -c 'from systemd import daemon, journal; print("systemd-python ok")'
