#!/usr/bin/env bash
# debroot.sh builds, once, the Debian bookworm root in which the systemd and
# Salt suites boot a real systemd as PID 1, and prints its path. The root is a
# cache outside the repository (default /var/cache/rackwire-test/debroot);
# the suites never change it, they run on a throw-away overlay of it. The
# mirror is read at run time from this machine's apt sources, so no mirror
# host is written down here. Rebuild with REBUILD=1.
set -euo pipefail

CACHE=${RACKWIRE_CACHE:-/var/cache/rackwire-test}
ROOT="$CACHE/debroot"
SUITE=bookworm
# iproute2: a dependency of the package; bird2: the Salt formula enables it;
# procps: pidof/ps for the suites.
INCLUDE=systemd,systemd-sysv,dbus,iproute2,bird2,procps,ca-certificates

log() { printf 'debroot: %s\n' "$*" >&2; }

mirror() {
	# The first Debian (non-security) URI of the enabled apt sources, deb822
	# or one-line format.
	local f u
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		u=$(awk '/^URIs:/ {print $2}' "$f" | grep -v security | head -n1 || true)
		[ -n "$u" ] && { echo "$u"; return; }
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		u=$(awk '$1=="deb" && $0 ~ /bookworm/ && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
		[ -n "$u" ] && { echo "$u"; return; }
	done
	return 1
}

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap missing: make deps"; exit 1; }
mkdir -p "$CACHE"
exec 9>"$CACHE/debroot.lock"
flock 9
if [ "${REBUILD:-0}" = 1 ]; then rm -rf "$ROOT"; fi
if [ -f "$ROOT/.rackwire-debroot-ok" ] && [ "$(cat "$ROOT/.rackwire-debroot-ok")" = "$INCLUDE" ]; then
	echo "$ROOT"
	exit 0
fi
m=$(mirror) || { log "no Debian mirror found in /etc/apt/sources*"; exit 1; }
tmp="$ROOT.tmp"
rm -rf "$tmp" "$ROOT"
log "debootstrap $SUITE from $m into $ROOT (about a minute)"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$m" >"$CACHE/debroot.log" 2>&1 ||
	{ log "debootstrap failed; see $CACHE/debroot.log"; tail -n 20 "$CACHE/debroot.log" >&2; exit 1; }
# A quiet, fast boot: no getty, no units that need hardware.
chroot "$tmp" systemctl mask getty@tty1.service console-getty.service \
	systemd-networkd-wait-online.service systemd-timesyncd.service \
	apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
# The package's BIRD recommendation is started by Salt in its suite, not at boot.
chroot "$tmp" systemctl disable bird.service >/dev/null 2>&1 || true
echo rackwire-test >"$tmp/etc/hostname"
rm -f "$tmp/var/cache/apt/archives/"*.deb
echo "$INCLUDE" >"$tmp/.rackwire-debroot-ok"
mv "$tmp" "$ROOT"
echo "$ROOT"
