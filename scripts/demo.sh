#!/usr/bin/env bash
# The README's first command: set up, then run the daemon on a demo inbox with the embedded
# tiny random-weight model, drop the sample job, wait for the result, stop cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/inpaintd demo --dir demo "$@"
