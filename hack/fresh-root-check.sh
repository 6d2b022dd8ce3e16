#!/usr/bin/env bash
# fresh-root-check.sh -- proves that hack/install-deps.sh is all a fresh Debian 12 machine needs.
#
# The machines crisp is developed and tested on have packages installed by hand; a package the
# build or the suite uses but install-deps.sh does not list stays hidden there (libprotobuf-dev
# once did). This check builds a minimal Debian 12 root (debootstrap --variant=minbase, from the
# host's configured Debian mirror), runs install-deps.sh in it, and then, inside that root:
#   1. builds what `make test` builds (the workspace's binaries and tests) with the host's
#      Rust toolchain, mounted read-only, and the crates the host already fetched (copied;
#      the build runs --offline --locked, from the repository mounted read-only);
#   2. checks every external program and file the suite takes from Debian (PROGRAMS below; a
#      guard fails if the sources invoke a program the table does not name);
#   3. builds the test images (hack/images/build.sh);
#   4. runs the built crispd: `config default`, and `config check` of what it printed;
#   5. links a small static program with shim/link-hot-first.sh, the linker `make release`
#      (and so `make run`) gives the static shim, runs it and checks the order took.
# Anything missing fails the check with the Debian package it comes from.
#
# Cache (CRISP_FRESH_ROOT_CACHE, default /var/cache/crisp/fresh-root): one directory per key,
# the hash of install-deps.sh and of the root's recipe (suite, variant, mirror). A new key means a
# new root from debootstrap and a cold build; the old key's directory is deleted once the new one
# passes. With the key unchanged the root, its cargo target dir and its test images are reused,
# so a warm run is an incremental build (install-deps.sh still runs: it must be a no-op).
#
# Mounts: everything runs in a private mount namespace (unshare -m), so no mount made here is
# visible on the host, and the kernel drops them all when the namespace's last process exits,
# whatever kills this script. Inside, an EXIT trap unmounts them in reverse order as well, and
# the outer half checks afterwards that the host sees no mount below the cache.
#
# Needs root, debootstrap, unshare (util-linux), a Rust toolchain on the host (rustc, cargo,
# cargo-nextest), and a reachable Debian mirror on a cold cache. Run by `make test`; alone:
#   bash hack/fresh-root-check.sh
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$HERE/.." && pwd)
CACHE=${CRISP_FRESH_ROOT_CACHE:-/var/cache/crisp/fresh-root}

# What the suite runs or reads from Debian packages: "program-or-absolute-path package".
# Programs come from `Command::new("…")`/`which("…")` in the Rust sources and from the tool
# list of hack/images/build.sh (the guard below keeps this table complete); the paths are the
# CNI plugins the tests' network configs name and the .proto files protoc imports.
PROGRAMS=(
  "runc runc" "crun crun"
  "containerd containerd" "ctr containerd" "containerd-shim-runc-v2 containerd"
  "docker-registry docker-registry" "skopeo skopeo" "umoci umoci"
  "iptables iptables" "iptables-save iptables" "ip iproute2"
  "nsenter util-linux" "unshare util-linux"
  "zstd zstd" "gzip gzip" "tar tar" "setfattr attr" "getfattr attr" "jq jq" "curl curl"
  "gcc gcc" "cc gcc" "readelf binutils" "nm binutils" "awk mawk" "protoc protobuf-compiler" "pkg-config pkg-config" "make make"
  "sh dash" "bash bash" "cp coreutils" "sleep coreutils" "true coreutils" "chroot coreutils" "sync coreutils"
  "apt-get apt" "dpkg-deb dpkg" "systemd-analyze systemd"
  "/usr/lib/cni/bridge containernetworking-plugins"
  "/usr/lib/cni/host-local containernetworking-plugins"
  "/usr/lib/cni/portmap containernetworking-plugins"
  "/usr/lib/cni/loopback containernetworking-plugins"
  "/usr/include/google/protobuf/empty.proto libprotobuf-dev"
  "/usr/include/google/protobuf/timestamp.proto libprotobuf-dev"
  "/usr/include/google/protobuf/field_mask.proto libprotobuf-dev"
)

say() { echo "fresh-root-check: [$((SECONDS))s] $*" >&2; }
die() {
  echo "fresh-root-check: FAILED: $*" >&2
  exit 1
}

# ------------------------------------------------------------------------------ outer half
# Runs in the host's mount namespace: checks, the key, the lock, then the inner half in a
# private mount namespace, then the no-mount-left check.
outer() {
  [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it)"
  local t
  for t in debootstrap unshare findmnt flock rustc cargo sha256sum; do
    command -v "$t" >/dev/null || die "missing $t on the host (run hack/install-deps.sh)"
  done
  command -v cargo-nextest >/dev/null || die "missing cargo-nextest on the host (run hack/install-deps.sh)"
  programs_table_is_complete

  local mirror sysroot cargo_home key
  mirror=${CRISP_DEBIAN_MIRROR:-$(host_debian_mirror)}
  [ -n "$mirror" ] || die "no Debian $SUITE mirror in /etc/apt/sources.list*; set CRISP_DEBIAN_MIRROR"
  sysroot=$(rustc --print sysroot)
  [ -x "$sysroot/bin/cargo" ] && [ -x "$sysroot/bin/rustc" ] ||
    die "the host toolchain $sysroot has no bin/cargo and bin/rustc"
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  # The build inside is offline: make sure the host's registry holds every locked crate.
  (cd "$REPO" && cargo fetch --locked -q) || die "cargo fetch --locked on the host"
  [ -d "$cargo_home/registry/index" ] && [ -d "$cargo_home/registry/cache" ] ||
    die "no crates.io registry under $cargo_home/registry after cargo fetch"

  key=$( (sha256sum <"$HERE/install-deps.sh" && echo "$SUITE $VARIANT $mirror") | sha256sum | cut -c1-16)
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.lock"
  flock 8 # two runs at once must not share a root
  say "key $key (install-deps.sh + $SUITE/$VARIANT from $mirror), cache $CACHE/$key"

  local rc=0
  unshare --mount --propagation private -- env \
    CRISP_FRC_KEYDIR="$CACHE/$key" CRISP_FRC_MIRROR="$mirror" CRISP_FRC_SYSROOT="$sysroot" \
    CRISP_FRC_REGISTRY="$cargo_home/registry" CRISP_FRC_NEXTEST="$(command -v cargo-nextest)" \
    bash "$SELF" --inner || rc=$?

  local left
  left=$(findmnt -rn -o TARGET | grep -F "$CACHE/" || true)
  [ -z "$left" ] || die "mounts left on the host below $CACHE (unmount them): $left"
  if ((rc == 0)); then
    # The new key passed: roots of older install lists are dead weight (a few GB each).
    local d
    for d in "$CACHE"/*/; do
      [ "$(basename "$d")" = "$key" ] || { say "removing the stale root $d" && rm -rf --one-file-system "$d"; }
    done
    say "passed in $((SECONDS))s"
  fi
  return "$rc"
}

# The first URI of a one-line or deb822 source for Debian's $SUITE (not -updates/-security).
host_debian_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
      if ($(i + 1) == s) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; ok = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { split($i, u, " "); uri = u[2] }
          if ($i ~ /^Suites:/) { n = split($i, w, " "); for (j = 2; j <= n; j++) if (w[j] == s) ok = 1 }
        }
        if (ok && uri != "") { print uri; exit } }' "$f"
  done | head -n1
}

# Every program the Rust sources start by name, and every tool hack/images/build.sh checks for,
# must be in PROGRAMS: a new `Command::new("foo")` without a row would go unchecked.
programs_table_is_complete() {
  local used p row missing=()
  local -A listed=()
  used=$(
    grep -rhoE --include='*.rs' --exclude-dir=target --exclude-dir=vendor \
      '(Command::new|which)\("[A-Za-z0-9_.-]+"\)' "$REPO" | sed -E 's/.*\("([^"]+)"\)/\1/'
    sed -nE 's/^for t in (.*); do$/\1/p' "$REPO/hack/images/build.sh" | tr ' ' '\n'
  )
  # A lookup, not `printf | grep -q`: grep -q leaves at its match while printf (one write per
  # row) may still be writing, and under pipefail that SIGPIPE failed CI naming a listed program.
  for row in "${PROGRAMS[@]}"; do listed[${row%% *}]=1; done
  for p in $(sort -u <<<"$used"); do
    [[ -n ${listed[$p]:-} ]] || missing+=("$p")
  done
  ((${#missing[@]} == 0)) ||
    die "the sources run ${missing[*]}, which PROGRAMS in $0 does not list: add each with its Debian package"
}

# ------------------------------------------------------------------------------ inner half
# Runs in a private mount namespace. Inside the root:
#   /src                          the repository, read-only
#   /opt/rust                     the host toolchain (rustc --print sysroot), read-only
#   /usr/local/bin/cargo-nextest  the host's cargo-nextest, read-only
#   /var/cache/crisp-check/       cargo home (registry copied in), target dir, test images
KEYDIR=${CRISP_FRC_KEYDIR:-}
ROOT=$KEYDIR/root
WORK=/var/cache/crisp-check
MOUNTS=()

mnt() { # mnt TARGET MOUNT-ARGS...: mount and remember it for the trap
  local target=$1
  shift
  mount "$@" "$target" || die "mount $* $target"
  MOUNTS+=("$target")
}
unmount_all() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount -R "${MOUNTS[i]}" 2>/dev/null || umount -R -l "${MOUNTS[i]}" ||
      echo "fresh-root-check: cannot unmount ${MOUNTS[i]}" >&2
  done
  MOUNTS=()
}

# in_root CMD...: run CMD in the root with a clean environment and the toolchain on PATH.
in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=$WORK/cargo-home CARGO_TARGET_DIR=$WORK/target CARGO_TERM_COLOR=never \
    "$@"
}

bootstrap_root() {
  [ -e "$KEYDIR/debootstrap.ok" ] && return 0
  rm -rf --one-file-system "$KEYDIR"
  mkdir -p "$ROOT"
  say "debootstrap --variant=$VARIANT $SUITE from $CRISP_FRC_MIRROR"
  debootstrap --variant="$VARIANT" "$SUITE" "$ROOT" "$CRISP_FRC_MIRROR" >"$KEYDIR/debootstrap.log" 2>&1 || {
    tail -n 30 "$KEYDIR/debootstrap.log" >&2
    die "debootstrap $SUITE from $CRISP_FRC_MIRROR (log: $KEYDIR/debootstrap.log)"
  }
  # The host's Debian sources (stanzas/lines for $SUITE, -updates, -security), so apt in the
  # root sees the same archive the host does; other vendors' repositories stay out.
  rm -f "$ROOT/etc/apt/sources.list"
  host_debian_sources >"$ROOT/etc/apt/sources.list.d/debian.sources"
  # Packages' maintainer scripts must not start daemons (containerd, docker-registry) in the
  # root: there is no init, and a daemon would outlive the check.
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
  chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
  touch "$KEYDIR/debootstrap.ok"
}

# deb822 stanzas for Debian's suites from the host's sources (one-line entries converted).
host_debian_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
      if ($(i + 1) ~ "^" s "(-updates|-security)?$") {
        printf "Types: deb\nURIs: %s\nSuites: %s\nComponents:", $i, $(i + 1)
        for (j = i + 2; j <= NF; j++) printf " %s", $j
        printf "\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n" } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n"; ORS = "\n\n" }
      { for (i = 1; i <= NF; i++) if ($i ~ /^Suites:/) {
          n = split($i, w, " "); for (j = 2; j <= n; j++) if (w[j] ~ "^" s "(-updates|-security)?$") { print; next } } }' "$f"
  done
}

mount_everything() {
  mkdir -p "$ROOT/src" "$ROOT/opt/rust" "$ROOT$WORK"/{cargo-home/registry,target,images}
  touch "$ROOT/usr/local/bin/cargo-nextest"
  mnt "$ROOT/proc" -t proc proc
  mnt "$ROOT/sys" --rbind /sys
  mnt "$ROOT/dev" --rbind /dev
  mnt "$ROOT/run" -t tmpfs -o mode=0755 tmpfs
  mnt "$ROOT/tmp" -t tmpfs -o mode=1777 tmpfs
  mnt "$ROOT/src" --bind -o ro "$REPO"
  mnt "$ROOT/opt/rust" --bind -o ro "$CRISP_FRC_SYSROOT"
  mnt "$ROOT/usr/local/bin/cargo-nextest" --bind -o ro "$CRISP_FRC_NEXTEST"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
}

# The crates the host fetched, copied (cargo extracts sources into its own registry/src).
copy_registry() {
  local part
  for part in index cache; do
    cp -a -u "$CRISP_FRC_REGISTRY/$part" "$ROOT$WORK/cargo-home/registry/" ||
      die "copying the host's cargo registry $part"
  done
}

install_deps() {
  if [ -e "$KEYDIR/deps.ok" ]; then
    say "install-deps.sh (root already has its packages: must be a no-op)"
  else
    say "install-deps.sh in a fresh $SUITE root"
  fi
  in_root bash /src/hack/install-deps.sh >"$KEYDIR/install-deps.log" 2>&1 || {
    tail -n 30 "$KEYDIR/install-deps.log" >&2
    die "hack/install-deps.sh in the fresh root (log: $KEYDIR/install-deps.log)"
  }
  touch "$KEYDIR/deps.ok"
}

check_programs() {
  local row prog pkg missing=()
  for row in "${PROGRAMS[@]}"; do
    read -r prog pkg <<<"$row"
    if [[ $prog == /* ]]; then
      [ -e "$ROOT$prog" ] || missing+=("$prog (Debian package $pkg)")
    else
      in_root sh -c 'command -v "$1"' sh "$prog" >/dev/null || missing+=("$prog (Debian package $pkg)")
    fi
  done
  if ((${#missing[@]})); then
    printf 'fresh-root-check: missing in a root with only what install-deps.sh installs: %s\n' "${missing[@]}" >&2
    die "${#missing[@]} program(s) or file(s) missing; add their packages to hack/install-deps.sh"
  fi
  say "all ${#PROGRAMS[@]} programs and files the suite uses are there"
}

build_workspace() {
  say "cargo build --workspace --bins --tests (offline, target dir $KEYDIR/root$WORK/target)"
  in_root bash -c 'cd /src && cargo build --workspace --bins --tests --locked --offline' \
    >"$KEYDIR/build.log" 2>&1 || {
    tail -n 40 "$KEYDIR/build.log" >&2
    die "the workspace does not build in the fresh root (log: $KEYDIR/build.log)"
  }
}

run_binaries() {
  local t=$WORK/target/debug
  in_root bash -c "set -e; $t/crispd config default >/tmp/config.toml; $t/crispd config check --config /tmp/config.toml" \
    >"$KEYDIR/run.log" 2>&1 || {
    cat "$KEYDIR/run.log" >&2
    die "the crispd built in the fresh root does not run"
  }
}

link_hot_first() {
  in_root bash -c 'set -e; d=$(mktemp -d); cd "$d"
    echo "fn main() { println!(\"linked hot-first\"); }" >main.rs
    rustc -O -C target-feature=+crt-static -C relocation-model=static \
      -C linker=/src/shim/link-hot-first.sh main.rs -o main
    ./main
    # The order took: main (first in the list) lies before crt1.o'"'"'s _start, which an
    # unordered link puts first.
    m=$(nm main | awk "\$3 == \"main\" { print \$1 }"); s=$(nm main | awk "\$3 == \"_start\" { print \$1 }")
    [ -n "$m" ] && [ -n "$s" ] && [ "$((16#$m))" -lt "$((16#$s))" ] || { echo "main at $m, _start at $s: not ordered"; exit 1; }
    rm -rf "$d"' >"$KEYDIR/link.log" 2>&1 || {
    cat "$KEYDIR/link.log" >&2
    die "shim/link-hot-first.sh, the static shim's linker (make release), fails in the fresh root"
  }
}

build_images() {
  say "hack/images/build.sh"
  in_root bash /src/hack/images/build.sh "$WORK/images" >"$KEYDIR/images.log" 2>&1 || {
    tail -n 30 "$KEYDIR/images.log" >&2
    die "hack/images/build.sh in the fresh root (log: $KEYDIR/images.log)"
  }
}

inner() {
  trap unmount_all EXIT
  trap 'exit 130' INT TERM
  local phase_start
  phase() {
    say "$1 took $((SECONDS - phase_start))s"
    phase_start=$SECONDS
  }
  phase_start=$SECONDS
  bootstrap_root
  phase "debootstrap"
  mount_everything
  copy_registry
  install_deps
  phase "install-deps"
  check_programs
  build_workspace
  phase "build"
  run_binaries
  link_hot_first
  build_images
  phase "images"
}

if [ "${1:-}" = --inner ]; then
  [ -n "$KEYDIR" ] || die "--inner is for the script itself"
  inner
else
  outer
fi
