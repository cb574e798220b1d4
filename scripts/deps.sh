#!/usr/bin/env bash
# deps.sh installs, from scratch, everything rackwire's tests need on a
# Debian bookworm machine: the eBPF toolchain, BIRD 2, iproute2 and friends,
# debootstrap for the systemd suite, the container runtimes the CNI plugin is
# tested with (podman, runc, docker.io), Salt from PyPI and a Consul server
# binary built from the Go module proxy into a cache outside the repository.
# It is idempotent: a second run only checks.
set -euo pipefail

CACHE=${RACKWIRE_CACHE:-/var/cache/rackwire-test}
CONSUL_VERSION=${CONSUL_VERSION:-v1.20.2}
mkdir -p "$CACHE"

log() { printf 'deps: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
	log "must run as root (apt-get, bpffs); try: sudo make deps"
	exit 1
fi

pkgs=(clang llvm libbpf-dev bpftool bird2 iproute2 iputils-ping netcat-openbsd
	debootstrap rpm procps psmisc python3-pip python3-venv curl ca-certificates nftables ipvsadm
	podman runc containernetworking-plugins docker.io)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The bird2 package starts a system BIRD; the tests run their own.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
	systemctl disable --now bird >/dev/null 2>&1 || true
fi

if ! mountpoint -q /sys/fs/bpf; then
	log "mount bpffs on /sys/fs/bpf"
	mount -t bpf bpf /sys/fs/bpf
fi

# Salt, in a venv of its own so it cannot disturb the system Python.
if [ ! -x "$CACHE/salt/bin/salt-call" ]; then
	log "pip install salt into $CACHE/salt"
	python3 -m venv "$CACHE/salt"
	"$CACHE/salt/bin/pip" install -q salt
fi

# Consul: a small module of its own that requires only consul, pinned.
if [ ! -x "$CACHE/consul-$CONSUL_VERSION" ]; then
	log "building consul $CONSUL_VERSION (several minutes on two cores)"
	src="$CACHE/consul-build"
	rm -rf "$src" && mkdir -p "$src"
	cat >"$src/go.mod" <<MOD
module consulbuild

go 1.22

require github.com/hashicorp/consul $CONSUL_VERSION

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
MOD
	cat >"$src/tools.go" <<'GO'
//go:build tools

package consulbuild

import _ "github.com/hashicorp/consul"
GO
	(cd "$src" &&
		GONOSUMDB=github.com/hashicorp/consul GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
		cd "$src" && GONOSUMDB=github.com/hashicorp/consul GOFLAGS=-mod=mod \
			go build -o "$CACHE/consul-$CONSUL_VERSION.tmp" github.com/hashicorp/consul)
	mv "$CACHE/consul-$CONSUL_VERSION.tmp" "$CACHE/consul-$CONSUL_VERSION"
fi
ln -sf "$CACHE/consul-$CONSUL_VERSION" "$CACHE/consul"

# The Debian root that the systemd and Salt suites boot systemd in (cached).
RACKWIRE_CACHE=$CACHE bash "$(dirname "$0")/../tests/systemd/debroot.sh" >&2
ln -sf "$CACHE/salt/bin/salt-call" "$CACHE/salt-call"
log "ok: consul=$CACHE/consul salt-call=$CACHE/salt-call"
