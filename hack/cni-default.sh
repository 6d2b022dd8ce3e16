#!/usr/bin/env bash
# cni-default.sh [CONF_DIR] -- gives a node with no pod network a default one, as CRI-O's
# package does (11-crio-ipv4-bridge.conflist): writes CONF_DIR/10-crisp-bridge.conflist
# (default /etc/cni/net.d) when CONF_DIR holds no network config at all, and never touches a
# directory that has one. `make run` and `make install` call it; crispd itself never writes
# into the CNI directory, which on a real node belongs to the network daemonset.
#
# The network: a bridge `crisp0` (gateway, masquerade, hairpin) with host-local IPAM on
# 10.88.0.0/16 (the range podman and CRI-O use for their default bridge, so unlikely to collide
# with a LAN), plus the unique local fd42:c815:88::/64 when the host has IPv6; then portmap (hostPort) and
# loopback. Prints what it did. CNI_DEFAULT_IPV6=0|1 overrides the IPv6 detection.
set -euo pipefail

DIR=${1:-/etc/cni/net.d}
NAME=10-crisp-bridge.conflist
SUBNET4=10.88.0.0/16
SUBNET6=fd42:c815:88::/64

# The names crispd's CNI loader reads (cri-server/src/cni.rs): *.conflist, *.conf, *.json.
existing=$(find "$DIR" -maxdepth 1 -type f \( -name '*.conflist' -o -name '*.conf' -o -name '*.json' \) \
  2>/dev/null | LC_ALL=C sort | head -n1 || true)
if [ -n "$existing" ]; then
  echo "cni-default: $DIR already has a network config ($existing); left as it is" >&2
  exit 0
fi

# IPv6 is on and some interface other than lo has a global-scope address (scope 00 in
# /proc/net/if_inet6): a host with only ::1 and link-local addresses has no IPv6 network.
host_has_ipv6() {
  [ "$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null)" = 0 ] &&
    awk '$4 == "00" && $6 != "lo" { found = 1 } END { exit !found }' /proc/net/if_inet6 2>/dev/null
}
ipv6=${CNI_DEFAULT_IPV6:-$(host_has_ipv6 && echo 1 || echo 0)}

ranges="[{\"subnet\": \"$SUBNET4\"}]"
routes='{"dst": "0.0.0.0/0"}'
if [ "$ipv6" = 1 ]; then
  ranges="$ranges, [{\"subnet\": \"$SUBNET6\"}]"
  routes="$routes, {\"dst\": \"::/0\"}"
fi

mkdir -p "$DIR"
# Written beside the target under a name crispd does not read, then linked into place: the
# link fails rather than replace a file that appeared meanwhile, and crispd (which re-reads
# the directory every second) never sees half a file.
tmp=$(mktemp "$DIR/.$NAME.XXXXXX.tmp")
trap 'rm -f "$tmp"' EXIT
cat >"$tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "crisp",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "crisp0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [$ranges],
        "routes": [$routes]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
chmod 0644 "$tmp"
if ! ln "$tmp" "$DIR/$NAME" 2>/dev/null; then
  echo "cni-default: $DIR/$NAME appeared meanwhile; left as it is" >&2
  exit 0
fi
echo "cni-default: wrote $DIR/$NAME (bridge crisp0, $SUBNET4$([ "$ipv6" = 1 ] && echo ", $SUBNET6"))" >&2
