#!/usr/bin/env bash
# Create ./.venv with the CPU build of torch and inpaintd installed (idempotent).
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  # On x86 with internet use: --index-url https://download.pytorch.org/whl/cpu ; see README.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
extras="test"
# systemd-python needs libsystemd-dev + pkg-config to build; without them inpaintd speaks
# sd_notify itself and logs to stderr, so it stays optional.
if pkg-config --exists libsystemd 2>/dev/null; then extras="test,systemd"; fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
