#!/usr/bin/env bash
# Installs what crisp needs on a Debian 12 node or test machine, and only what is missing.
# Every Debian package the build, the daemons and the test suite use is listed here: a
# CI run on a machine where someone installed a package by hand must not hide a gap.
set -euo pipefail

PACKAGES=(
  # OCI runtimes and what runs containers and pods
  runc crun containernetworking-plugins iptables iproute2 util-linux
  # the build (libprotobuf-dev carries the well-known .proto files protoc imports: empty, timestamp, field_mask)
  protobuf-compiler libprotobuf-dev gcc libc6-dev make pkg-config
  # test images: busybox (the dynamic one is downloaded, not installed; see hack/images/),
  # umoci builds OCI layouts, skopeo pushes them, zstd/gzip compress layers
  busybox-static umoci skopeo zstd gzip attr curl jq
  # the reference runtime and the local registry the tests pull from
  containerd docker-registry
  # hack/fresh-root-check.sh builds a minimal Debian root to prove this list complete;
  # systemd-analyze (package systemd) verifies the unit `make install` writes
  debootstrap systemd
)

missing=()
for p in "${PACKAGES[@]}"; do
  # Compared, not piped to grep -q, which under pipefail can fail on SIGPIPE.
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"install ok installed"* ]] || missing+=("$p")
done

if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing Debian packages (${missing[*]}); run as root" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# docker-registry's package starts a registry on :5000 where an init system runs it; the
# tests start their own on a free port, so a packaged one is harmless but not relied upon.

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

# crispd gives pods that ask for a user namespace (without explicit mappings) 65536 IDs each
# from the subordinate ranges of its `userns.user` (default `crisp`). Create that system user
# and a range that overlaps no other user's, unless they exist. Without them crispd still
# runs; only such pods fail, with FailedPrecondition naming the setting.
CRISP_USER=${CRISP_USER:-crisp}
if [ "$(id -u)" = 0 ]; then
  if ! getent passwd "$CRISP_USER" >/dev/null; then
    echo "install-deps: adding system user $CRISP_USER (owner of pod ID ranges)" >&2
    useradd --system --no-create-home --shell /usr/sbin/nologin "$CRISP_USER"
  fi
  for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -q "^$CRISP_USER:" "$f"; then
      # Above every existing range, and at least at 1e9 (clear of Debian's 100000+ ranges).
      start=$(awk -F: 'BEGIN{m=1000000000} NF>=3 {e=$2+$3; if (e>m) m=e} END{printf "%.0f\n", m}' "$f")
      count=65536000 # 1000 pods
      if ((start + count > 4294967296)); then
        echo "install-deps: no room in $f for a $count-ID range for $CRISP_USER; add one by hand" >&2
      else
        echo "install-deps: $f: $CRISP_USER:$start:$count" >&2
        echo "$CRISP_USER:$start:$count" >>"$f"
      fi
    fi
  done
fi
