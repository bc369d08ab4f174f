#!/usr/bin/env bash
# Run one command under a hard memory cap, the way systemd's MemoryMax= caps the unit.
#
#   scripts/bench_memcap.sh 1.5G -- inpaintd process photo.jpg --mask photo.mask.png --model DIR
#   DROP_CACHES=1 scripts/bench_memcap.sh 1.25G -- ...   # start with an empty page cache (root)
#
# Prints the command's exit status, whether the kernel OOM-killed it, the cgroup's peak usage
# and the wall time. Needs root. Uses, in order:
#   1. cgroup v1 memory controller (/sys/fs/cgroup/memory): a child cgroup with
#      memory.limit_in_bytes and memory.memsw.limit_in_bytes (no swap escape);
#   2. cgroup v2 (/sys/fs/cgroup/cgroup.controllers lists memory): memory.max + memory.swap.max=0;
#   3. systemd-run --scope -p MemoryMax=... -p MemorySwapMax=0 when systemd is PID 1.
# Page-cache pages are charged to the cgroup that first reads them: with a warm cache read by
# another cgroup, mmap'd weights are not charged to the capped one. DROP_CACHES=1 avoids that
# (what a freshly booted device sees); scripts/bench.py memcap --drop-caches does the same.
set -euo pipefail

if [ $# -lt 3 ] || [ "$2" != "--" ]; then
  echo "usage: $0 LIMIT -- COMMAND [ARGS...]   (LIMIT like 1.5G, 1280M, or bytes)" >&2
  exit 2
fi
limit_text=$1
shift 2

to_bytes() {
  python3 - "$1" <<'EOF'
import sys
t = sys.argv[1].strip().upper().removesuffix("IB").removesuffix("B")
mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
print(int(float(t.rstrip("KMG")) * mult))
EOF
}
limit=$(to_bytes "$limit_text")

if [ "${DROP_CACHES:-0}" = 1 ]; then
  sync
  echo 3 > /proc/sys/vm/drop_caches || echo "memcap: cannot drop caches (not root?)" >&2
fi

name="inpaintd-memcap-$$"
start=$(date +%s.%N)
status=0
if [ -w /sys/fs/cgroup/memory ] && [ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
  cg=/sys/fs/cgroup/memory/$name
  mkdir "$cg"
  trap 'rmdir "$cg" 2>/dev/null || true' EXIT
  echo "$limit" > "$cg/memory.limit_in_bytes"
  [ -e "$cg/memory.memsw.limit_in_bytes" ] && echo "$limit" > "$cg/memory.memsw.limit_in_bytes"
  # The subshell joins the cgroup, then execs the command (its children stay in it).
  ( echo $BASHPID > "$cg/cgroup.procs"; exec "$@" ) || status=$?
  peak=$(cat "$cg/memory.max_usage_in_bytes")
  oom_kills=$(awk '/oom_kill /{print $2}' "$cg/memory.oom_control")
  failcnt=$(( $(cat "$cg/memory.failcnt") + $(cat "$cg/memory.memsw.failcnt" 2>/dev/null || echo 0) ))
  backend="cgroup-v1"
elif grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null && [ -w /sys/fs/cgroup ]; then
  cg=/sys/fs/cgroup/$name
  mkdir "$cg"
  trap 'rmdir "$cg" 2>/dev/null || true' EXIT
  echo "$limit" > "$cg/memory.max"
  [ -e "$cg/memory.swap.max" ] && echo 0 > "$cg/memory.swap.max"
  ( echo $BASHPID > "$cg/cgroup.procs"; exec "$@" ) || status=$?
  peak=$(cat "$cg/memory.peak" 2>/dev/null || echo "?")
  oom_kills=$(awk '/oom_kill /{print $2}' "$cg/memory.events")
  failcnt=$(awk '/^max /{print $2}' "$cg/memory.events")
  backend="cgroup-v2"
elif [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
  systemd-run --scope --quiet -p MemoryMax="$limit" -p MemorySwapMax=0 -- "$@" || status=$?
  peak="?"; oom_kills="?"; failcnt="?"
  backend="systemd-run --scope"
else
  echo "memcap: no writable cgroup memory controller and no systemd; cannot cap memory here" >&2
  exit 3
fi
end=$(date +%s.%N)
python3 - "$backend" "$limit" "$status" "$peak" "$oom_kills" "$failcnt" "$start" "$end" <<'EOF'
import sys
backend, limit, status, peak, ooms, failcnt, start, end = sys.argv[1:]
peak_mib = f"{int(peak) / 2**20:.0f} MiB" if peak.isdigit() else peak
verdict = "OOM-killed" if ooms not in ("0", "?", "") else ("completed" if status == "0" else f"exit {status}")
print(f"memcap[{backend}] limit {int(limit) / 2**30:.2f} GiB: {verdict}; exit {status}; peak {peak_mib}; "
      f"limit hits {failcnt}; oom kills {ooms}; {float(end) - float(start):.1f} s")
EOF
exit "$status"
