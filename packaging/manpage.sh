#!/usr/bin/env bash
# manpage.sh BINARY SECTION VERSION prints a man page for BINARY (a built
# rackwired or rackwire) made from its own --help text, so the page can
# never disagree with the program. For the CLI every command's help is
# included. build.sh calls it; the output is roff on stdout.
set -euo pipefail

bin=${1:?usage: manpage.sh BINARY SECTION VERSION}
section=${2:?}
version=${3:?}
name=$(basename "$bin")

# roff: escape backslashes, and protect lines starting with . or '.
esc() { sed -e 's/\\/\\e/g' -e "s/^\\([.']\\)/\\\\\\&\\1/"; }

help() { "$bin" "$@" --help 2>&1 | grep -v "^$name: unknown command" || true; }

case "$name" in
rackwired) summary="the rackwire network agent (one per host, run by systemd)" ;;
rackwire) summary="operator CLI of the rackwire network agent" ;;
*) summary="part of rackwire" ;;
esac

upper=$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')
printf '.TH %s %s "" "rackwire %s" "rackwire"\n' "$upper" "$section" "$version"
printf '.SH NAME\n%s \\- %s\n' "$name" "$summary"
printf '.SH SYNOPSIS\n.nf\n'
help | esc
printf '.fi\n'
if [ "$name" = rackwire ]; then
	printf '.SH COMMANDS\n'
	help | awk '/^commands:/ {on=1; next} on && /^  [a-z]/ {print $1} on && /^$/ {on=0}' |
		while read -r cmd; do
			printf '.SS %s\n.nf\n' "$cmd"
			help "$cmd" | esc
			printf '.fi\n'
		done
fi
cat <<ROFF
.SH FILES
.TP
.I /etc/rackwire/rackwire.toml
the agent's config (example: /usr/share/doc/rackwire/rackwire.toml.example)
.TP
.I /etc/rackwire/policies.d/
per-host network policies
.TP
.I /run/rackwire/rackwire.sock
the API socket (group rackwire)
.TP
.I /var/lib/rackwire/
endpoint state, local store, restart-gate state
.SH SEE ALSO
.BR rackwire (1),
.BR rackwired (8),
.BR systemctl (1),
.BR bird (8)
ROFF
