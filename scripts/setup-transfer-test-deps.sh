#!/usr/bin/env bash
# Install what tests/test_transfers.py, tests/test_faults.py and tests/test_fleet.py drive for real: an
# sshd and scp/rsync clients, samba's smbd and smbclient, libfaketime and sshfs. Idempotent; root + apt only. The tests start
# their own sshd/smbd on 127.0.0.1 with configs in a temp folder; the system services are not used.
set -euo pipefail
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-transfer-test-deps: needs root and apt-get; transfer tests will skip with a reason"
  exit 0
fi
need=()
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null && command -v scp >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
command -v smbd >/dev/null || [ -x /usr/sbin/smbd ] || need+=(samba)
command -v smbclient >/dev/null || need+=(smbclient)
command -v faketime >/dev/null || need+=(faketime)
command -v sshfs >/dev/null || need+=(sshfs)  # tests/test_fleet.py: several devices on one share (FUSE)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d keeps the packages' own services from starting (the tests run their own).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup-transfer-test-deps: installed ${need[*]}"
