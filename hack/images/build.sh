#!/usr/bin/env bash
# build.sh OUTDIR -- builds crisp's test images from local material only, as OCI layouts.
#
# Output (OUTDIR is $CRISP_TEST_IMAGES, target/test-images by default):
#   OUTDIR/<name>/        one OCI image layout per image, its one ref named after the tag
#   OUTDIR/<name>.tar     the same layout as an archive (skopeo's oci-archive:)
#   OUTDIR/registry/      docker-registry storage with every image pushed under every tag
#                         (see PUSHES); e2e/src/registry.rs hard-links it into each test's
#                         registry instead of pushing again
#   OUTDIR/.stamp         hash of hack/images/*; when it matches, the script exits at once
#
# Images (e2e/src/images.rs lists them for the tests; keep the two in step):
#   busybox       Debian's dynamically linked busybox + the host's glibc libs, applets as
#                 hard links in /bin, /etc/passwd and /etc/group, Cmd ["sh"]. Not
#                 busybox-static: its ash runs built-in applets instead of exec'ing /bin/ls,
#                 so masked paths and PATH lookups would not be exercised.
#   layers        busybox + 4 layers with every tar feature an unpacker must get right:
#                 whiteout, opaque directory, hard link, symlinks, user.* xattr, setuid
#                 root binary, ~2000 files. Asserted below, so a broken image fails here.
#   user          busybox + USER 1000:1000 and a passwd entry `crisp` for it.
#   large         busybox + one incompressible layer of 208 MiB (deterministic).
#   multiarch     an image index: linux/amd64 and linux/arm64/v8 manifests. Both carry the
#                 amd64 busybox; /etc/crisp-arch says which one was picked.
#   busybox-zstd  busybox with zstd-compressed layers (application/vnd.oci.image.layer.v1.tar+zstd).
#   pause         static pause binary alone, Entrypoint ["/pause"] (the sandbox image).
#
# Needs root (umoci keeps ownership, setuid and xattrs), umoci, skopeo, gcc, zstd, attr
# (setfattr), jq, curl, docker-registry, and `apt-get download busybox` (a Debian mirror) on
# a cold cache; hack/install-deps.sh installs the rest.
set -euo pipefail

OUTDIR=${1:?usage: build.sh OUTDIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# --------------------------------------------------------------------------- cache check
# The stamp is the hash of every file in hack/images (names and contents), so editing any
# of them rebuilds; e2e/src/images.rs computes the same hash to refuse stale images.
stamp=$(cd "$HERE" && find . -maxdepth 1 -type f -printf '%P\n' | LC_ALL=C sort |
  xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1)
IMAGES=(busybox layers user large multiarch busybox-zstd pause)
up_to_date() {
  [ "$(cat "$OUTDIR/.stamp" 2>/dev/null)" = "$stamp" ] || return 1
  for n in "${IMAGES[@]}"; do [ -f "$OUTDIR/$n/index.json" ] && [ -f "$OUTDIR/$n.tar" ] || return 1; done
  [ -d "$OUTDIR/registry/docker" ]
}
up_to_date && exit 0

for t in umoci skopeo gcc jq curl tar gzip zstd setfattr getfattr docker-registry apt-get dpkg-deb; do
  command -v "$t" >/dev/null || { echo "build.sh: missing $t (run hack/install-deps.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (umoci must keep ownership, setuid bits and xattrs)" >&2; exit 1; }

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# Two `make test` runs at once must not build into the same directory.
exec 9>"$OUTDIR/.lock"
flock 9
up_to_date && exit 0

started=$SECONDS
WORK=$OUTDIR/.work
CACHE=$OUTDIR/.cache   # the busybox .deb survives rebuilds: no mirror needed after the first
LAYOUT=$WORK/oci       # one layout for all images while building, so blobs are shared
rm -rf "$WORK"
mkdir -p "$WORK" "$CACHE"
REG_PID=
cleanup() {
  if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK" # KEEP_WORK=1 keeps it for debugging
}
trap cleanup EXIT

say() { echo "build.sh: [$((SECONDS - started))s] $*" >&2; }
die() { echo "build.sh: FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------ material
if ! compgen -G "$CACHE/busybox_*.deb" >/dev/null; then
  say "downloading Debian's busybox .deb"
  # (apt warns that _apt cannot write here and downloads as root: harmless)
  (cd "$CACHE" && apt-get download -q busybox >"$WORK/apt.log" 2>&1) || {
    cat "$WORK/apt.log" >&2
    die "apt-get download busybox (needs a Debian mirror once; the .deb is cached in $CACHE)"
  }
fi
dpkg-deb -x "$(compgen -G "$CACHE/busybox_*.deb" | head -n1)" "$WORK/busybox-deb"
BUSYBOX=$WORK/busybox-deb/bin/busybox
[ -x "$BUSYBOX" ] || die "no bin/busybox in the busybox .deb"

mkdir -p "$WORK/bin"
for p in pause nnp; do gcc -static -Os -s -o "$WORK/bin/$p" "$HERE/$p.c"; done
gcc -O2 -o "$WORK/bin/prng" "$HERE/prng.c"

# ------------------------------------------------------------------------- busybox rootfs
BASE=$WORK/base
mkdir -p "$BASE"
(
  cd "$BASE"
  mkdir -p bin sbin usr/bin usr/sbin usr/local/bin etc root home tmp var/run var/log dev proc sys
  chmod 1777 tmp
  chmod 700 root
  install -m 0755 "$BUSYBOX" bin/busybox
  # the libraries of the dynamic busybox (the host's glibc), at the host's paths
  for lib in $(ldd "$BUSYBOX" | grep -o '/[^ ]*' | sort -u); do
    mkdir -p ".$(dirname "$lib")"
    cp -L "$lib" ".$lib"
  done
  # every applet as a hard link, as upstream busybox images do
  for a in $("$BUSYBOX" --list-full); do
    [ -e "$a" ] || ln bin/busybox "$a"
  done
  cat >etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >etc/group <<'EOF'
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
wheel:x:10:root
www-data:x:33:
users:x:100:
nogroup:x:65534:
EOF
)

# -------------------------------------------------------------------------------- helpers
umoci init --layout "$LAYOUT"
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HIST=(--history.author hack/images/build.sh)

# derive FROM TO STEP DESCRIPTION: unpack FROM, run STEP in its rootfs, repack as tag TO
# (one new layer on top of FROM's; umoci's mtree diff writes whiteouts for deletions).
derive() {
  local from=$1 to=$2 step=$3 what=$4 b=$WORK/bundle
  rm -rf "$b"
  umoci unpack --image "$LAYOUT:$from" "$b" >/dev/null
  (cd "$b/rootfs" && "$step")
  # repack writes the new layer over the tag it names; copy FROM's tag first to keep FROM
  [ "$from" = "$to" ] || umoci config --image "$LAYOUT:$from" --tag "$to" --no-history
  umoci repack --image "$LAYOUT:$to" "${HIST[@]}" --history.created_by "$what" "$b"
  rm -rf "$b"
}

# blob TAG -> path of the manifest blob of TAG (an image manifest, or the index for multiarch)
manifest_of() {
  local d
  d=$(jq -r --arg t "$1" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$LAYOUT/index.json")
  [ -n "$d" ] || die "no tag $1 in the build layout"
  echo "$LAYOUT/blobs/sha256/${d#sha256:}"
}
layer_blobs() { jq -r '.layers[].digest | sub("sha256:"; "")' "$(manifest_of "$1")" | sed "s|^|$LAYOUT/blobs/sha256/|"; }
# write_blob FILE -> digest; stores FILE in the build layout under its sha256
write_blob() {
  local d
  d=$(sha256sum "$1" | cut -d' ' -f1)
  cp "$1" "$LAYOUT/blobs/sha256/$d"
  echo "sha256:$d"
}
# set_ref TAG DESCRIPTOR_JSON: point TAG of the build layout at DESCRIPTOR
set_ref() {
  jq --arg t "$1" --argjson d "$2" \
    '.manifests = ([.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] != $t)]
       + [$d + {annotations: {"org.opencontainers.image.ref.name": $t}}])' \
    "$LAYOUT/index.json" >"$WORK/index.json.new"
  mv "$WORK/index.json.new" "$LAYOUT/index.json"
}

# ------------------------------------------------------------------------------- busybox
say "busybox"
umoci new --image "$LAYOUT:busybox"
rm -rf "$WORK/bundle"
umoci unpack --image "$LAYOUT:busybox" "$WORK/bundle" >/dev/null
rmdir "$WORK/bundle/rootfs"
cp -a "$BASE" "$WORK/bundle/rootfs"
umoci repack --image "$LAYOUT:busybox" "${HIST[@]}" --history.created_by "busybox $("$BUSYBOX" | head -n1 | cut -d' ' -f2) (Debian, dynamic) + glibc" "$WORK/bundle"
rm -rf "$WORK/bundle"
umoci config --image "$LAYOUT:busybox" --no-history --author hack/images/build.sh \
  --config.env "$PATH_ENV" --config.cmd sh

# -------------------------------------------------------------------------------- layers
# What a container of `layers` must see (e2e tests rely on it, images.rs repeats it):
#   /data/many/d00..d18/f00..f99   1900 files "dNN/fNN\n"; d19 was deleted (dir whiteout)
#   /data/keep.txt "keep\n"; /data/gone.txt absent (whiteout); /data/replaced.txt "upper\n"
#   /data/opq/ holds only new.txt "new\n": a.txt b.txt c.txt below it hidden (opaque dir)
#   /data/hardlink/orig and /data/hardlink/link: one inode, "hard\n"
#   /data/symlink -> keep.txt, /data/abs-symlink -> /data/keep.txt
#   /data/xattr.txt with user.crisp=test
#   /usr/local/bin/nnp root:root 4755, prints "Effective uid: N"
say "layers"
l2() {
  mkdir -p data/opq
  local d f
  for d in $(seq -w 0 19); do
    mkdir -p "data/many/d$d"
    for f in $(seq -w 0 99); do echo "d$d/f$f" >"data/many/d$d/f$f"; done
  done
  echo keep >data/keep.txt
  echo gone >data/gone.txt
  echo lower >data/replaced.txt
  for f in a b c; do echo "$f" >"data/opq/$f.txt"; done
}
l3() {
  mkdir -p data/hardlink
  echo hard >data/hardlink/orig
  ln data/hardlink/orig data/hardlink/link
  ln -s keep.txt data/symlink
  ln -s /data/keep.txt data/abs-symlink
  echo xattr >data/xattr.txt
  setfattr -n user.crisp -v test data/xattr.txt
  install -o 0 -g 0 -m 4755 "$WORK/bin/nnp" usr/local/bin/nnp
  echo upper >data/replaced.txt
}
l4() {
  rm data/gone.txt
  rm -r data/many/d19
}
derive busybox layers l2 "2000 files, files to delete and hide later"
derive layers layers l3 "hard link, symlinks, xattr, setuid root nnp, modified file"
derive layers layers l4 "delete a file and a directory (whiteouts)"
# umoci never writes opaque markers (it whiteouts each deleted file), so the last layer is
# a hand-made tar: data/opq/.wh..wh..opq hides everything below data/opq.
mkdir -p "$WORK/l5/data/opq"
: >"$WORK/l5/data/opq/.wh..wh..opq"
echo new >"$WORK/l5/data/opq/new.txt"
tar --numeric-owner --owner=0 --group=0 -C "$WORK/l5" -cf "$WORK/l5.tar" data
umoci raw add-layer --image "$LAYOUT:layers" "${HIST[@]}" \
  --history.created_by "opaque directory data/opq" "$WORK/l5.tar"

# Prove every feature is in the layer tars; a silent change in umoci must fail the build.
mapfile -t LB < <(layer_blobs layers)
((${#LB[@]} == 5)) || die "layers: expected 5 layers, got ${#LB[@]}"
lb() { echo "${LB[$(($1 - 1))]}"; } # layers count from 1, the busybox base
for i in 1 2 3 4 5; do tar -tvzf "$(lb "$i")" >"$WORK/layer$i.txt"; done
has() { # has LAYER REGEX WHAT
  grep -Eq "$2" "$WORK/layer$1.txt" || { cat "$WORK/layer$1.txt" >&2; die "layers: layer $1 lacks $3 (/$2/)"; }
}
has 2 '^-.* data/gone\.txt$' "the file deleted later"
has 3 ' data/hardlink/(link link to data/hardlink/orig|orig link to data/hardlink/link)$' "a hard link"
has 3 '^l.* data/symlink -> keep\.txt$' "a relative symlink"
has 3 '^l.* data/abs-symlink -> /data/keep\.txt$' "an absolute symlink"
has 3 '^-rwsr-xr-x 0/0 .* usr/local/bin/nnp$' "a setuid root file"
has 4 ' data/\.wh\.gone\.txt$' "the whiteout of data/gone.txt"
has 4 ' data/many/\.wh\.d19$' "the whiteout of data/many/d19"
has 5 ' data/opq/\.wh\.\.wh\.\.opq$' "the opaque marker of data/opq"
zcat "$(lb 3)" | grep -ac 'SCHILY\.xattr\.user\.crisp=test' >/dev/null || die "layers: layer 3 lacks the user.crisp xattr of data/xattr.txt"
total=0
for i in 1 2 3 4 5; do total=$((total + $(grep -cv '/$' "$WORK/layer$i.txt"))); done
((total >= 2000)) || die "layers: only $total non-directory entries, want >= 2000"
say "layers: 5 layers, $total entries, features present"

# ---------------------------------------------------------------------------------- user
say "user"
u_step() {
  echo 'crisp:x:1000:1000:crisp test user:/home/crisp:/bin/sh' >>etc/passwd
  echo 'crisp:x:1000:' >>etc/group
  mkdir -p home/crisp
  chown 1000:1000 home/crisp
}
derive busybox user u_step "user crisp (1000:1000)"
umoci config --image "$LAYOUT:user" "${HIST[@]}" --history.created_by "USER 1000:1000" \
  --config.user 1000:1000 --config.workingdir /home/crisp

# --------------------------------------------------------------------------------- large
say "large"
large_step() { "$WORK/bin/prng" 0x63726973702d6c67 $((208 << 20)) >large.bin; }
derive busybox large large_step "208 MiB of seeded pseudo-random data (/large.bin)"
big=$(jq '[.layers[].size] | max' "$(manifest_of large)")
((big >= 200 << 20)) || die "large: biggest layer is $big bytes, want >= 200 MiB"

# ----------------------------------------------------------------------------- multiarch
say "multiarch"
arch_amd64() { echo amd64 >etc/crisp-arch; }
arch_arm64() { echo arm64 >etc/crisp-arch; }
derive busybox multiarch-amd64 arch_amd64 "/etc/crisp-arch"
derive busybox multiarch-arm64 arch_arm64 "/etc/crisp-arch"
umoci config --image "$LAYOUT:multiarch-arm64" --no-history --architecture arm64
# umoci has no variant flag; arm64 images in the wild say v8
cfg=$(jq -r '.config.digest | sub("sha256:"; "")' "$(manifest_of multiarch-arm64)")
jq -c '. + {variant: "v8"}' "$LAYOUT/blobs/sha256/$cfg" >"$WORK/arm64-config.json"
new_cfg=$(write_blob "$WORK/arm64-config.json")
jq -c --arg d "$new_cfg" --argjson s "$(stat -c %s "$WORK/arm64-config.json")" \
  '.config.digest = $d | .config.size = $s' "$(manifest_of multiarch-arm64)" >"$WORK/arm64-manifest.json"
arm_m=$(write_blob "$WORK/arm64-manifest.json")
amd_f=$(manifest_of multiarch-amd64)
jq -n --arg amd "sha256:$(basename "$amd_f")" --argjson amds "$(stat -c %s "$amd_f")" \
  --arg arm "$arm_m" --argjson arms "$(stat -c %s "$WORK/arm64-manifest.json")" '{
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [
      {mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $amd, size: $amds,
       platform: {architecture: "amd64", os: "linux"}},
      {mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $arm, size: $arms,
       platform: {architecture: "arm64", os: "linux", variant: "v8"}}
    ]}' >"$WORK/index.json"
idx=$(write_blob "$WORK/index.json")
set_ref multiarch "$(jq -nc --arg d "$idx" --argjson s "$(stat -c %s "$WORK/index.json")" \
  '{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s}')"

# -------------------------------------------------------------------------- busybox-zstd
say "busybox-zstd"
# Through a second layout: copying within one layout, skopeo finds the gzip blobs already
# there and reuses them instead of recompressing.
skopeo copy -q --dest-compress-format zstd --dest-compress "oci:$LAYOUT:busybox" "oci:$WORK/zstd:busybox-zstd"
skopeo copy -q "oci:$WORK/zstd:busybox-zstd" "oci:$LAYOUT:busybox-zstd"
jq -e '[.layers[].mediaType] | length > 0 and all(. == "application/vnd.oci.image.layer.v1.tar+zstd")' \
  "$(manifest_of busybox-zstd)" >/dev/null || die "busybox-zstd: layers are not zstd"

# --------------------------------------------------------------------------------- pause
say "pause"
umoci new --image "$LAYOUT:pause"
rm -rf "$WORK/bundle"
umoci unpack --image "$LAYOUT:pause" "$WORK/bundle" >/dev/null
install -m 0755 "$WORK/bin/pause" "$WORK/bundle/rootfs/pause"
umoci repack --image "$LAYOUT:pause" "${HIST[@]}" --history.created_by "static pause" "$WORK/bundle"
rm -rf "$WORK/bundle"
umoci config --image "$LAYOUT:pause" --no-history --author hack/images/build.sh \
  --config.entrypoint /pause --config.user 65535:65535 --clear config.cmd

# ------------------------------------------------------------------------------- exports
# export NAME TAG: OUTDIR/NAME/ holds only NAME's blobs (hard links into the build layout),
# with one ref, TAG; OUTDIR/NAME.tar is that layout archived.
NEW=$WORK/out
export_layout() {
  local name=$1 tag=$2 src=${3:-$1} desc dir=$NEW/$1
  desc=$(jq -c --arg t "$src" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)' "$LAYOUT/index.json")
  [ -n "$desc" ] || die "export: no tag $src"
  mkdir -p "$dir/blobs/sha256"
  local todo=("$(jq -r .digest <<<"$desc")") d f
  while ((${#todo[@]})); do
    d=${todo[-1]#sha256:}
    unset 'todo[-1]'
    f=$LAYOUT/blobs/sha256/$d
    [ -e "$dir/blobs/sha256/$d" ] && continue
    ln "$f" "$dir/blobs/sha256/$d"
    # manifests and indexes name more blobs; layers and configs are leaves
    if (($(stat -c %s "$f") < 1 << 20)) && jq -e 'type == "object" and has("schemaVersion")' "$f" >/dev/null 2>&1; then
      mapfile -t -O "${#todo[@]}" todo < <(jq -r '(.manifests // [])[].digest, (.config // empty).digest, (.layers // [])[].digest' "$f")
    fi
  done
  echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  jq -n --argjson d "$desc" --arg t "$tag" \
    '{schemaVersion: 2, manifests: [$d + {annotations: {"org.opencontainers.image.ref.name": $t}}]}' >"$dir/index.json"
  tar -C "$dir" -cf "$NEW/$name.tar" oci-layout index.json blobs
}
say "exporting layouts"
for n in busybox layers user large multiarch busybox-zstd; do export_layout "$n" latest; done
export_layout pause 3.9

# ------------------------------------------------------------------------ registry seed
# Every test starts its own docker-registry; pushing 250 MiB with skopeo each time would
# take seconds per test. Push once here and let registry.rs hard-link this storage instead.
# PUSHES: layout repository:tag... (repositories are the upstream paths without the host,
# so a mirror for docker.io or registry.k8s.io resolves to them).
PUSHES=(
  "busybox library/busybox:latest library/busybox:1.36"
  "layers library/layers:latest"
  "user library/user:latest"
  "large library/large:latest"
  "multiarch library/multiarch:latest"
  "busybox-zstd library/busybox-zstd:latest"
  "pause pause:3.9 pause:3.6 pause:latest"
)
say "pushing into the registry seed"
SEED=$NEW/registry
mkdir -p "$SEED"
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $SEED
  delete:
    enabled: true
http:
  addr: 127.0.0.1:PORT
  secret: crisp-build-not-secret
EOF
for port in $(shuf -i 20000-59999 -n 20); do
  (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue # taken
  sed "s/PORT/$port/" "$WORK/registry.yml" >"$WORK/registry-$port.yml"
  docker-registry serve "$WORK/registry-$port.yml" >"$WORK/registry.log" 2>&1 &
  REG_PID=$!
  for _ in $(seq 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/" 2>/dev/null && break 2
    kill -0 "$REG_PID" 2>/dev/null || break
    sleep 0.05
  done
  kill "$REG_PID" 2>/dev/null || true
  wait "$REG_PID" 2>/dev/null || true
  REG_PID=
done
[ -n "$REG_PID" ] || { cat "$WORK/registry.log" >&2; die "could not start docker-registry"; }
for p in "${PUSHES[@]}"; do
  read -r name refs <<<"$p"
  for ref in $refs; do
    skopeo copy -q --all --dest-tls-verify=false "oci:$NEW/$name:$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"]' "$NEW/$name/index.json")" \
      "docker://127.0.0.1:$port/$ref"
  done
done
kill "$REG_PID"
wait "$REG_PID" 2>/dev/null || true
REG_PID=
rm -rf "$SEED/docker/registry/v2/repositories"/*/_uploads "$SEED/docker/registry/v2/repositories"/*/*/_uploads
# The registry must serve the layouts' exact manifests (tests compare digests).
for p in "${PUSHES[@]}"; do
  read -r name refs <<<"$p"
  want=$(jq -r '.manifests[0].digest' "$NEW/$name/index.json")
  for ref in $refs; do
    got=$(cat "$SEED/docker/registry/v2/repositories/${ref%:*}/_manifests/tags/${ref##*:}/current/link")
    [ "$got" = "$want" ] || die "registry: $ref is $got, layout $name has $want"
  done
done
# Blobs the registry stored are byte-for-byte the layouts' blobs: share the inodes (the
# registry replaces blob files by rename, never rewrites them, so sharing is safe).
for f in "$SEED"/docker/registry/v2/blobs/sha256/*/*/data; do
  d=$(basename "$(dirname "$f")")
  for l in "$NEW"/*/blobs/sha256/"$d"; do
    [ -e "$l" ] && ln -f "$l" "$f" && break
  done
done

# ----------------------------------------------------------------------------- install
for n in "${IMAGES[@]}" registry; do
  rm -rf "${OUTDIR:?}/$n" "$OUTDIR/$n.tar"
  mv "$NEW/$n" "$OUTDIR/$n"
  [ -e "$NEW/$n.tar" ] && mv "$NEW/$n.tar" "$OUTDIR/$n.tar"
done
echo "$stamp" >"$OUTDIR/.stamp"
say "built ${#IMAGES[@]} images in $OUTDIR"
