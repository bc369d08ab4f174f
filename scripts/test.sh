#!/usr/bin/env bash
# The README's second command (and what .ci/run calls): set up, install the system pieces
# the real-thing tests need where we are root (systemd, journald, sshd, samba, jpegtran), run pytest.
# Tests whose piece cannot be installed or started skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${INPAINTD_SKIP_SYSTEM_DEPS:-0}" != 1 ]; then
  for deps in scripts/setup-systemd-test-deps.sh scripts/setup-transfer-test-deps.sh scripts/setup-image-deps.sh; do
    "$deps" .venv/bin/python || echo "test: $deps failed; tests that need it will skip with a reason"
  done
fi
exec .venv/bin/python -m pytest -q "$@"
