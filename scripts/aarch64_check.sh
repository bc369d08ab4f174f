#!/usr/bin/env bash
# inpaintd on aarch64 under emulation (issue 21): a Debian bookworm arm64 root made with
# debootstrap, run through qemu-user-static (binfmt_misc), inpaintd installed there with the
# README's commands (`pip install torch==2.13.0` from PyPI: its aarch64 wheels are CPU builds,
# then `pip install .`), then `inpaintd demo` and the pure-Python and engine tests on the tiny
# model. Reports what ran. Speed means nothing here (every instruction is translated): see
# BENCHMARKS.md section 11 for published Raspberry Pi 5 figures instead.
#
# As root, with internet; not part of CI: the first run took 47 minutes on 2 busy cores at nice 19
# (debootstrap's second stage 36 min, pip 10 min), later runs reuse $ROOT. Leaves $ROOT for
# inspection. Results: BENCHMARKS.md section 11.5.
#   scripts/aarch64_check.sh            # ROOT=/var/tmp/inpaintd-arm64 by default
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-/var/tmp/inpaintd-arm64}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# The pure-Python and engine subset: no systemd, samba or ssh servers inside a chroot.
TESTS=${TESTS:-"tests/test_cpus.py tests/test_engine.py tests/test_layout.py tests/test_memory_quant.py tests/test_models.py tests/test_config.py tests/test_geometry.py tests/test_jobspec.py"}
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - start ))s) $*" >&2; }

if [ "$(id -u)" != 0 ]; then echo "aarch64_check.sh: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; fi
say "host packages: qemu-user-static, binfmt-support, debootstrap"
command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
}
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
if [ ! -e "$ROOT/.stage1-done" ] && [ ! -x "$ROOT/usr/bin/python3" ]; then
  say "debootstrap bookworm arm64 into $ROOT, first stage (download and unpack, no emulation)"
  debootstrap --foreign --arch=arm64 \
    --include=python3,python3-venv,python3-pip,ca-certificates,libjpeg-turbo-progs,libgomp1,git \
    bookworm "$ROOT" "$MIRROR"
  touch "$ROOT/.stage1-done"
fi
cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
if [ ! -x "$ROOT/usr/bin/python3" ] || [ -e "$ROOT/debootstrap/debootstrap" ]; then
  say "debootstrap second stage (dpkg under emulation)"
  chroot "$ROOT" /debootstrap/debootstrap --second-stage
fi
say "copy the working tree to $ROOT/src"
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
git ls-files -z | xargs -0 cp --parents -t "$ROOT/src"
# Under qemu-user the guest reads the host's /proc/cpuinfo and /sys: oneDNN's aarch64 probe then
# finds no MIDR_EL1 and torch crashes at import (SIGSEGV). A Raspberry Pi 5's view instead: its
# cpuinfo (tests/fixtures) over /proc/cpuinfo and a sysfs of four Cortex-A76 cores (MIDR
# 0x414fd0b1) as the root's /sys. With those, `import torch` works under emulation.
FAKESYS="$ROOT/.fakesys"
for i in 0 1 2 3; do
  mkdir -p "$FAKESYS/devices/system/cpu/cpu$i/regs/identification"
  echo 0x00000000414fd0b1 > "$FAKESYS/devices/system/cpu/cpu$i/regs/identification/midr_el1"
  echo 0x0000000000000000 > "$FAKESYS/devices/system/cpu/cpu$i/regs/identification/revidr_el1"
done
for f in possible present online; do echo 0-3 > "$FAKESYS/devices/system/cpu/$f"; done
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
mountpoint -q "$ROOT/sys" && umount -l "$ROOT/sys"
mount --bind "$FAKESYS" "$ROOT/sys"
mount --bind tests/fixtures/cpuinfo/raspberry-pi5-cortex-a76.txt "$ROOT/proc/cpuinfo"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# A site CA (a proxy's) the host trusts must be trusted inside too, or pip fails TLS there.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  chroot "$ROOT" update-ca-certificates >/dev/null
fi
trap 'umount "$ROOT/proc/cpuinfo" 2>/dev/null; for fs in dev sys proc; do umount "$ROOT/$fs" 2>/dev/null || true; done' EXIT
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 OMP_NUM_THREADS="${THREADS:-1}" /bin/bash -c "$1"; }
say "uname -m inside: $(in_root 'uname -m')"
say "install (README 'Installing torch', aarch64 boards)"
in_root 'cd /src && { [ -x .venv/bin/python ] || python3 -m venv .venv; } &&
  .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q ".[test]"'
say "versions and what inpaintd sees"
in_root 'cd /src && .venv/bin/python -c "
import platform, torch
from inpaintd.engine.host import cpu_facts, bf16_in_use
print(platform.machine(), \"torch\", torch.__version__, \"capability\", torch.backends.cpu.get_cpu_capability())
print(\"cpuinfo (a Raspberry Pi 5 capture in place of the host one):\", cpu_facts(), \"bf16 in use:\", bf16_in_use())
"'
say "inpaintd demo (embedded tiny model, compute dtype fp32: INPAINTD_CPU_BF16=0 as on a Pi 5)"
in_root 'cd /src && INPAINTD_CPU_BF16=0 timeout 3600 .venv/bin/inpaintd demo --dir /tmp/demo' && demo=ok || demo="failed ($?)"
say "tests: $TESTS"
# Not the CPU-time bounds against blow-ups (every instruction is translated, 5-20x slower).
in_root "cd /src && INPAINTD_CPU_BF16=0 timeout 7200 .venv/bin/python -m pytest -q -p no:cacheprovider -m 'not cost_bound' $TESTS" \
  && tests=ok || tests="failed ($?)"
say "done: demo $demo, tests $tests, $(( $(date +%s) - start )) s in all"
