#!/usr/bin/env bash
# install.sh -- what `make install` copies, from binaries already built. Variables (the
# Makefile passes them; defaults in brackets):
#   FROM            where crispd, containerd-shim-crisp-v2, crisp-snapshotter are [target/release]
#   DESTDIR         staging root prefixed to every path below []
#   PREFIX          [/usr/local]; binaries go to BINDIR [$PREFIX/bin]
#   SYSCONFDIR      [/etc]; crispd's config is $SYSCONFDIR/crisp/config.toml
#   SYSTEMDUNITDIR  [/etc/systemd/system]; crispd.service
#   CNI_CONF_DIR    [/etc/cni/net.d]; gets hack/cni-default.sh's network if it has none;
#                   set but empty: no network is written (kind, where kindnet writes one)
#   REQUIRE_STATIC_SHIM  [] 1: refuse a shim that is not statically linked (make install and
#                   make kind-image set it: make release links the shim statically, a debug or
#                   plain `cargo build` shim is dynamic and would cost every pod glibc's pages)
#
# An existing config.toml is never replaced (it is checked with `crispd config check` and
# the problems printed); a new one is `crispd config default` with shim_binary set to the
# installed shim, since systemd's PATH need not hold BINDIR. The unit is always rewritten.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FROM=${FROM:-$HERE/../target/release}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
BINDIR=${BINDIR:-$PREFIX/bin}
SYSCONFDIR=${SYSCONFDIR:-/etc}
SYSTEMDUNITDIR=${SYSTEMDUNITDIR:-/etc/systemd/system}
CNI_CONF_DIR=${CNI_CONF_DIR-/etc/cni/net.d}
BINARIES=(crispd containerd-shim-crisp-v2 crisp-snapshotter)

say() { echo "install: $*" >&2; }
die() {
  echo "install: FAILED: $*" >&2
  exit 1
}

for p in BINDIR SYSCONFDIR SYSTEMDUNITDIR ${CNI_CONF_DIR:+CNI_CONF_DIR}; do
  [[ ${!p} == /* ]] || die "$p=${!p} must be an absolute path (DESTDIR is the staging prefix)"
done
for b in "${BINARIES[@]}"; do
  [ -x "$FROM/$b" ] || die "no $FROM/$b: build it first (make release)"
done

# The shim's linkage as `file` would say it: "static" or "dynamic (interpreter …)". Read from
# its program headers (readelf, binutils): a dynamic executable names the ld.so that loads it.
linkage() {
  command -v readelf >/dev/null || die "readelf is needed to check how $1 is linked (Debian package binutils)"
  local headers interp
  headers=$(readelf -lW "$1" 2>&1) || die "$1 is not an ELF executable: $headers"
  interp=$(sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p' <<<"$headers")
  if [ -n "$interp" ]; then echo "dynamic (interpreter $interp)"; else echo static; fi
}
shim_linkage=$(linkage "$FROM/containerd-shim-crisp-v2")
if [ "${REQUIRE_STATIC_SHIM:-}" = 1 ] && [ "$shim_linkage" != static ]; then
  die "$FROM/containerd-shim-crisp-v2 is $shim_linkage, not statically linked: build it with make release"
fi

install -d -m 0755 "$DESTDIR$BINDIR"
for b in "${BINARIES[@]}"; do
  install -m 0755 "$FROM/$b" "$DESTDIR$BINDIR/$b"
  if [ "$b" = containerd-shim-crisp-v2 ]; then
    say "$DESTDIR$BINDIR/$b ($shim_linkage)"
  else
    say "$DESTDIR$BINDIR/$b"
  fi
done
crispd=$DESTDIR$BINDIR/crispd

conf=$DESTDIR$SYSCONFDIR/crisp/config.toml
if [ -e "$conf" ] || [ -L "$conf" ]; then
  say "$conf exists: kept as it is"
  "$crispd" config check --config "$conf" >/dev/null ||
    say "WARNING: $conf has the problems above; crispd will refuse to start until they are fixed"
else
  install -d -m 0755 "$(dirname "$conf")"
  tmp=$(mktemp "$conf.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  "$crispd" config default >"$tmp"
  grep -q '^shim_binary = ' "$tmp" || die "crispd config default printed no shim_binary line"
  sed -i "s|^shim_binary = .*|shim_binary = \"$BINDIR/containerd-shim-crisp-v2\"|" "$tmp"
  "$crispd" config check --config "$tmp" >/dev/null || die "the config written for $conf does not pass crispd config check"
  chmod 0644 "$tmp"
  mv "$tmp" "$conf"
  trap - EXIT
  say "$conf (crispd config default, shim_binary = $BINDIR/containerd-shim-crisp-v2)"
fi

install -d -m 0755 "$DESTDIR$SYSTEMDUNITDIR"
sed "s|@BINDIR@|$BINDIR|g" "$HERE/systemd/crispd.service.in" >"$DESTDIR$SYSTEMDUNITDIR/crispd.service"
chmod 0644 "$DESTDIR$SYSTEMDUNITDIR/crispd.service"
say "$DESTDIR$SYSTEMDUNITDIR/crispd.service"

if [ -n "$CNI_CONF_DIR" ]; then
  bash "$HERE/cni-default.sh" "$DESTDIR$CNI_CONF_DIR"
else
  say "CNI_CONF_DIR is empty: no default network written"
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  say "then: systemctl daemon-reload && systemctl enable --now crispd"
fi
