#!/usr/bin/env bash
# build.sh VERSION builds rackwire's packages into dist/:
#   dist/rackwire_VERSION_amd64.deb and dist/rackwire-VERSION.x86_64.rpm
# It builds rackwired, rackwire and rackwire-cni with VERSION stamped in
# (the same ldflags as the Makefile), stages them with the maintainer scripts, and runs nfpm as
# a Go module at a pinned version (no downloaded binary). Output directory:
# $DIST (default dist/ in the repository).
set -euo pipefail

VERSION=${1:?usage: packaging/build.sh VERSION}
NFPM=github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIST=${DIST:-$ROOT/dist}
cd "$ROOT"

log() { printf 'package: %s\n' "$*" >&2; }

# A version nfpm cannot read would only fail later with a worse message.
if ! [[ "$VERSION" =~ ^v?[0-9]+\.[0-9]+\.[0-9]+([.~+-][0-9A-Za-z.~+-]*)?$ ]]; then
	log "version $VERSION is not like 1.2.3 or 1.2.3-rc1"
	exit 2
fi
VERSION=${VERSION#v}

mkdir -p "$DIST"
STAGE=$(mktemp -d "$DIST/.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/scripts/deb" "$STAGE/scripts/rpm"

log "go build rackwired rackwire rackwire-cni ($VERSION)"
CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath \
	-ldflags "-X github.com/rackwire/rackwire/internal/version.Version=$VERSION" \
	-o "$STAGE/bin/" ./cmd/rackwired ./cmd/rackwire ./cmd/rackwire-cni

# Man pages from the binaries' own --help.
mkdir -p "$STAGE/man"
packaging/manpage.sh "$STAGE/bin/rackwired" 8 "$VERSION" | gzip -9n >"$STAGE/man/rackwired.8.gz"
packaging/manpage.sh "$STAGE/bin/rackwire" 1 "$VERSION" | gzip -9n >"$STAGE/man/rackwire.1.gz"

# Maintainer scripts: paste the shared functions where #COMMON# stands.
for f in packaging/scripts/deb/* packaging/scripts/rpm/*; do
	out="$STAGE/scripts/$(basename "$(dirname "$f")")/$(basename "$f")"
	awk -v common=packaging/scripts/common.sh '
		/^#COMMON#$/ { while ((getline l < common) > 0) print l; next }
		{ print }' "$f" >"$out"
	chmod 0755 "$out"
	sh -n "$out"
done

cp -R salt "$STAGE/salt"
find "$STAGE/salt" -type d -exec chmod 0755 {} + -o -type f -exec chmod 0644 {} +

if [ -f packaging/rackwire.toml.example ]; then
	cp packaging/rackwire.toml.example "$STAGE/rackwire.toml.example"
else
	log "warning: packaging/rackwire.toml.example missing; shipping a minimal one"
	printf '%s\n' '# rackwire.toml: every key has a default; see docs/config.md.' 'version = 1' \
		>"$STAGE/rackwire.toml.example"
fi
cat >"$STAGE/README" <<TXT
rackwire $VERSION

Config:   /etc/rackwire/rackwire.toml (example: rackwire.toml.example here)
Policies: /etc/rackwire/policies.d/*.yaml
Service:  systemctl start rackwired; systemctl reload rackwired (re-reads the config)
Salt:     /usr/share/rackwire/salt/ (the rackwire formula)
Check:    rackwired check-config; rackwire status
CNI:      /opt/cni/bin/rackwire-cni (also in /usr/libexec/cni, /usr/lib/cni);
          example network: /usr/share/rackwire/cni/rackwire.conflist
TXT

# nfpm expands variables in a few fields only; substitute them all here.
sed -e "s|\${RW_STAGE}|$STAGE|g" -e "s|\${RW_VERSION}|$VERSION|g" packaging/nfpm.yaml >"$STAGE/nfpm.yaml"
deb="$DIST/rackwire_${VERSION}_amd64.deb"
rpm="$DIST/rackwire-${VERSION}.x86_64.rpm"
log "nfpm deb -> $deb"
go run "$NFPM" pkg --config "$STAGE/nfpm.yaml" --packager deb --target "$deb" >&2
log "nfpm rpm -> $rpm"
go run "$NFPM" pkg --config "$STAGE/nfpm.yaml" --packager rpm --target "$rpm" >&2
printf '%s\n%s\n' "$deb" "$rpm"
