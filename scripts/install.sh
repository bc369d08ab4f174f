#!/usr/bin/env bash
# Install inpaintd as a systemd service. Idempotent: run it again to upgrade.
#
#   sudo scripts/install.sh                 # the real thing
#   sudo scripts/install.sh --root /tmp/x   # everything under /tmp/x instead of / (tests, images)
#
# What it does:
#   - the service user `inpaintd` and the drop group `inpaintd-drop` (add SMB/scp users to it:
#     `usermod -aG inpaintd-drop alice`), from systemd/inpaintd.sysusers;
#   - /var/lib/inpaintd/{inbox,outbox,failed,archive,state} from systemd/inpaintd.tmpfiles:
#     inbox setgid and writable by the drop group, outbox/failed/archive readable by it,
#     state private to the daemon; a default ACL on the inbox keeps dropped files readable
#     by the daemon whatever the uploader's umask (when setfacl is installed);
#   - /var/lib/inpaintd-metrics (same tmpfiles): the metrics textfile's folder (metrics.textfile),
#     the service user's and world-readable, for node_exporter's textfile collector;
#   - a venv in /opt/inpaintd/venv: torch==2.13.0 first, then this project, and the optional
#     systemd-python when libsystemd-dev and pkg-config are installed;
#   - /etc/inpaintd/config.yaml from config.example.yaml, only if it does not exist yet;
#   - /etc/systemd/system/inpaintd.service, then daemon-reload and enable (and try-restart,
#     so an upgrade takes effect if it was running) when systemd is PID 1;
#   - jpegtran (libjpeg-turbo-progs, apt-get where it can): JPEG outputs keep the input's
#     coefficients outside the painted MCUs; without it they are re-encoded whole;
#   - the tcmalloc allocator for the service (lower peak memory, see BENCHMARKS.md): it installs
#     libtcmalloc-minimal4 with apt-get where it can and then the drop-in
#     inpaintd.service.d/10-allocator.conf that preloads it; without the library, glibc malloc.
#
# Options:
#   --root DIR      install below DIR (users and folders via systemd-sysusers/-tmpfiles --root)
#   --skip-venv     do not create or update the venv (tests; or you manage it yourself)
#   --python PATH   interpreter for the venv (default: python3)
#   --no-enable     install only: no daemon-reload/enable/restart
#   --allocator A   tcmalloc (default) or glibc (no preload; removes the allocator drop-in)
# Environment: DESTDIR works like --root; PIP_ARGS are passed to every pip install.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/.." && pwd)
root=${DESTDIR:-/}
skip_venv=0
enable=1
python=python3
allocator=tcmalloc

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --root=*) root=${1#--root=}; shift ;;
    --skip-venv) skip_venv=1; shift ;;
    --python) python=$2; shift 2 ;;
    --no-enable) enable=0; shift ;;
    --allocator) allocator=$2; shift 2 ;;
    --allocator=*) allocator=${1#--allocator=}; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$allocator" in tcmalloc|glibc) ;; *) echo "install.sh: --allocator is tcmalloc or glibc, not $allocator" >&2; exit 2 ;; esac

say() { printf 'inpaintd install: %s\n' "$*"; }
die() { printf 'inpaintd install: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and writes /etc, /opt, /var/lib)"
root=${root%/}
[ -n "$root" ] || root=/
R=${root%/}   # prefix for paths: "" for /
[ "$root" = / ] || mkdir -p "$root"

venv=/opt/inpaintd/venv
etc=/etc/inpaintd

# --- user, group, folders ------------------------------------------------------------------
install -d -m 0755 "$R/etc/sysusers.d" "$R/etc/tmpfiles.d"
install -m 0644 "$src/systemd/inpaintd.sysusers" "$R/etc/sysusers.d/inpaintd.conf"
install -m 0644 "$src/systemd/inpaintd.tmpfiles" "$R/etc/tmpfiles.d/inpaintd.conf"

if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers --root="$root" "$R/etc/sysusers.d/inpaintd.conf"
else
  # Same result with shadow-utils.
  ug=(); [ "$root" = / ] || ug=(--root "$root")
  getent_in_root() { grep -q "^$2:" "$R/etc/$1" 2>/dev/null; }
  getent_in_root group inpaintd-drop || groupadd "${ug[@]}" --system inpaintd-drop
  getent_in_root passwd inpaintd || useradd "${ug[@]}" --system --user-group --home-dir /var/lib/inpaintd \
      --no-create-home --shell /usr/sbin/nologin --comment "inpaintd inpainting daemon" inpaintd
  usermod "${ug[@]}" -a -G inpaintd-drop inpaintd
fi
say "user inpaintd and group inpaintd-drop are in place"

if command -v systemd-tmpfiles >/dev/null 2>&1; then
  systemd-tmpfiles --create --root="$root" "$R/etc/tmpfiles.d/inpaintd.conf"
else
  while read -r type path mode user group _; do
    case "$type" in d) install -d -m "$mode" -o "$user" -g "$group" "$R$path" ;; esac
  done < <(grep -E '^d ' "$src/systemd/inpaintd.tmpfiles")
fi

# Numeric ids from the target root's own user database (--root may differ from this host).
uid_of() { awk -F: -v n="$1" '$1 == n { print $3 }' "$R/etc/passwd"; }
gid_of() { awk -F: -v n="$1" '$1 == n { print $3 }' "$R/etc/group"; }
svc_uid=$(uid_of inpaintd); drop_gid=$(gid_of inpaintd-drop); svc_gid=$(gid_of inpaintd)
[ -n "$svc_uid" ] && [ -n "$drop_gid" ] || die "user inpaintd / group inpaintd-drop missing after creation"

if command -v setfacl >/dev/null 2>&1; then
  # New files in the inbox get group rw and daemon read access regardless of the uploader's umask.
  if setfacl -m "d:u:$svc_uid:rwX,d:g:$drop_gid:rwX,d:m::rwX" "$R/var/lib/inpaintd/inbox" 2>/dev/null; then
    say "default ACL set on the inbox"
  else
    say "the file system of /var/lib/inpaintd has no ACLs: uploaders need umask 002/007 (smb.conf: create mask = 0660)"
  fi
else
  say "setfacl not installed (apt-get install acl): uploaders need umask 002/007 (smb.conf: create mask = 0660)"
fi
say "folders under /var/lib/inpaintd: inbox (drop group writes), outbox/failed/archive (drop group reads), state (private)"

# --- venv ------------------------------------------------------------------------------------
if [ "$skip_venv" -eq 0 ]; then
  if [ ! -x "$R$venv/bin/python" ]; then
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
      say "installing python3-venv"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    fi
    install -d -m 0755 "$R/opt/inpaintd"
    "$python" -m venv "$R$venv"
    say "created the venv $venv"
  fi
  pip=("$R$venv/bin/python" -m pip install --disable-pip-version-check ${PIP_ARGS:-})
  # torch first: the pinned CPU build; then the project, which will find it satisfied.
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" --upgrade "$src"
  if pkg-config --exists libsystemd 2>/dev/null; then
    "${pip[@]}" "systemd-python>=235" && say "systemd-python installed (native sd_notify and journal fields)"
  else
    say "libsystemd-dev/pkg-config not installed: skipping systemd-python (the daemon uses its pure-Python sd_notify and journald senders)"
  fi
else
  say "--skip-venv: leaving $venv alone"
fi

# --- config -----------------------------------------------------------------------------------
install -d -m 0750 -o 0 -g "$svc_gid" "$R$etc"
if [ -e "$R$etc/config.yaml" ]; then
  say "$etc/config.yaml exists: kept as it is (compare with $src/config.example.yaml after upgrades)"
else
  tmp=$(mktemp "$R$etc/.config.yaml.XXXXXX")
  # The service user's home is not writable (ProtectSystem=strict); its cache is /var/cache/inpaintd.
  sed 's#~/\.cache/inpaintd#/var/cache/inpaintd#' "$src/config.example.yaml" >"$tmp"
  chown "0:$svc_gid" "$tmp"; chmod 0640 "$tmp"
  mv "$tmp" "$R$etc/config.yaml"
  say "wrote $etc/config.yaml (edit model.path to point at a prepared model)"
fi

# --- unit -------------------------------------------------------------------------------------
install -d -m 0755 "$R/etc/systemd/system"
install -m 0644 "$src/systemd/inpaintd.service" "$R/etc/systemd/system/inpaintd.service"
say "installed /etc/systemd/system/inpaintd.service (local changes: systemctl edit inpaintd)"

# --- jpegtran -----------------------------------------------------------------------------------
# The daemon runs /usr/bin/jpegtran as a subprocess for lossless JPEG outputs (paint/jpeg_lossless.py).
if ! [ -x "$R/usr/bin/jpegtran" ] && [ "$root" = / ] && command -v apt-get >/dev/null 2>&1; then
  say "installing libjpeg-turbo-progs (jpegtran)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libjpeg-turbo-progs >/dev/null || true
fi
if ! [ -x "$R/usr/bin/jpegtran" ]; then
  say "jpegtran not found (apt-get install libjpeg-turbo-progs): JPEG outputs are re-encoded whole"
fi

# --- allocator ----------------------------------------------------------------------------------
dropins=$R/etc/systemd/system/inpaintd.service.d
has_tcmalloc() { compgen -G "$R/usr/lib/*/libtcmalloc_minimal.so.4" >/dev/null || [ -e "$R/usr/lib/libtcmalloc_minimal.so.4" ]; }
if [ "$allocator" = tcmalloc ] && ! has_tcmalloc && [ "$root" = / ] && command -v apt-get >/dev/null 2>&1; then
  say "installing libtcmalloc-minimal4"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 >/dev/null || true
fi
if [ "$allocator" = tcmalloc ] && has_tcmalloc; then
  install -d -m 0755 "$dropins"
  install -m 0644 "$src/systemd/inpaintd-allocator.conf" "$dropins/10-allocator.conf"
  say "the service preloads tcmalloc ($dropins/10-allocator.conf)"
else
  rm -f "$dropins/10-allocator.conf"
  rmdir "$dropins" 2>/dev/null || true
  if [ "$allocator" = tcmalloc ]; then
    say "libtcmalloc_minimal.so.4 not found (apt-get install libtcmalloc-minimal4): the service uses glibc malloc"
  else
    say "--allocator glibc: the service uses glibc malloc"
  fi
fi

if [ "$enable" -eq 0 ]; then
  say "--no-enable: not enabling the service"
elif [ "$root" != / ]; then
  if command -v systemctl >/dev/null 2>&1; then
    systemctl --root="$root" enable inpaintd.service >/dev/null 2>&1 && say "enabled inpaintd.service in $root"
  fi
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable inpaintd.service
  systemctl try-restart inpaintd.service
  say "enabled. Start it with: systemctl start inpaintd; watch it with: journalctl -u inpaintd -f"
else
  say "PID 1 is not systemd here: skipped daemon-reload and enable (run 'systemctl daemon-reload && systemctl enable --now inpaintd' on the device)"
fi
say "done"
