#!/usr/bin/env bash
# Remove the inpaintd service: unit, venv, sysusers/tmpfiles snippets.
# Jobs and results in /var/lib/inpaintd, the config in /etc/inpaintd and the inpaintd user
# (which owns those files) are KEPT unless --purge is given.
#
#   sudo scripts/uninstall.sh [--root DIR] [--purge]
# Environment: DESTDIR works like --root.
set -euo pipefail

root=${DESTDIR:-/}
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --root=*) root=${1#--root=}; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { printf 'inpaintd uninstall: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "uninstall.sh: run as root" >&2; exit 1; }
root=${root%/}; [ -n "$root" ] || root=/
R=${root%/}
unit=$R/etc/systemd/system/inpaintd.service

if [ "$root" = / ] && [ -d /run/systemd/system ]; then
  systemctl disable --now inpaintd.service 2>/dev/null || true
elif [ -e "$unit" ] && command -v systemctl >/dev/null 2>&1; then
  systemctl --root="$root" disable inpaintd.service >/dev/null 2>&1 || true
fi
rm -f "$unit" "$R/etc/systemd/system/multi-user.target.wants/inpaintd.service"
# Our own drop-in goes; the operator's (override.conf) stay unless --purge.
rm -f "$R/etc/systemd/system/inpaintd.service.d/10-allocator.conf"
rmdir "$R/etc/systemd/system/inpaintd.service.d" 2>/dev/null || true
rm -f "$R/etc/sysusers.d/inpaintd.conf" "$R/etc/tmpfiles.d/inpaintd.conf"
rm -rf "$R/opt/inpaintd"
say "removed the unit and /opt/inpaintd"

if [ "$purge" -eq 1 ]; then
  rm -rf "$R/etc/systemd/system/inpaintd.service.d" "$R/etc/inpaintd" "$R/var/lib/inpaintd" "$R/var/cache/inpaintd"
  ug=(); [ "$root" = / ] || ug=(--root "$root")
  if grep -q '^inpaintd:' "$R/etc/passwd" 2>/dev/null; then userdel "${ug[@]}" inpaintd || true; fi
  if grep -q '^inpaintd:' "$R/etc/group" 2>/dev/null; then groupdel "${ug[@]}" inpaintd || true; fi
  if grep -q '^inpaintd-drop:' "$R/etc/group" 2>/dev/null; then groupdel "${ug[@]}" inpaintd-drop || true; fi
  say "--purge: removed /var/lib/inpaintd, /var/cache/inpaintd, /etc/inpaintd, drop-ins, user and groups"
else
  say "kept /var/lib/inpaintd (jobs and results), /etc/inpaintd and the inpaintd user; --purge removes them"
fi
if [ "$root" = / ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
say "done"
