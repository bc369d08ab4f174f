#!/usr/bin/env bash
# What the JPEG splice needs (daemon/inpaintd/paint/jpeg_lossless.py) and tests/test_jpeg_lossless.py
# drives for real: libjpeg-turbo's jpegtran (and cjpeg, to make odd-sampled test inputs), from
# Debian's libjpeg-turbo-progs. Idempotent; root + apt only. Without it JPEG outputs are
# re-encoded whole (the sidecar says so) and the splice tests skip with the reason.
set -euo pipefail
if command -v jpegtran >/dev/null && command -v cjpeg >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-image-deps: needs root and apt-get to install libjpeg-turbo-progs; JPEG splice tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends libjpeg-turbo-progs >/dev/null
echo "setup-image-deps: installed libjpeg-turbo-progs ($(jpegtran -v </dev/null 2>&1 | head -1))"
