#!/bin/sh
# The static shim's linker (Makefile, build_static_shim): `cc`, with the functions and constants
# a running shim uses placed first, in the order of shim/hot-symbols.txt.
#
# Why: a shim runs per pod and its VmRSS is mostly its binary's code pages. The kernel maps a
# file page and the ones around it (fault-around, 64 KiB) on each fault, so a shim that runs
# one function in every 64 KiB of .text maps all of it. Put together, what a shim runs fills
# the first pages and the rest is never mapped (docs/design.md, "Shim memory").
#
# Rust's symbol names end in a hash (17h<16 hex digits>E) that moves with the toolchain and the
# dependencies; the list keeps names without it, resolved here against this link's objects.
# hack/shim-hot-symbols/make-list.py makes the list. A name that is no longer there is skipped: the
# order only decides where code lies, never what is linked.
set -eu
list=$(dirname "$0")/hot-symbols.txt
[ -r "$list" ] || { echo "shim/link-hot-first.sh: cannot read $list" >&2; exit 1; }
case " $* " in
*" -fuse-ld=lld "*) ;;
*) echo "shim/link-hot-first.sh: the link does not use lld (rustc >= 1.90 links x86_64 Linux with it); --symbol-ordering-file needs it" >&2; exit 1 ;;
esac
order=$(mktemp)
trap 'rm -f "$order"' EXIT
for a in "$@"; do
	case $a in *.o) nm --defined-only "$a" ;; esac
done | awk -v list="$list" '
	BEGIN { while ((getline l < list) > 0) if (l != "" && l !~ /^#/ && !(l in rank)) rank[l] = ++n }
	{ k = $NF; sub(/17h[0-9a-f]+E$/, "", k); if (k in rank) print rank[k], $NF }
	END { for (l in rank) if (l !~ /^_ZN/) print rank[l], l }' |
	sort -n -s -k1,1 | cut -d' ' -f2 | awk '!seen[$0]++' >"$order"
cc "$@" -Wl,--symbol-ordering-file="$order" -Wl,--no-warn-symbol-ordering
