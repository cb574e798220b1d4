#!/usr/bin/env bash
# quickstart.sh — run rackwired on the embedded store with two demo
# workloads, show one connection that policy allows and one the datapath
# drops, and leave it running for you to explore.
#
#   scripts/quickstart.sh start   (what `make quickstart` runs)
#   scripts/quickstart.sh stop    remove everything it created
#
# Everything lives under $QS (default /tmp/rackwire-quickstart) and in the
# namespaces rwqs-*; nothing touches the host's real config.
set -euo pipefail
cd "$(dirname "$0")/.."
QS=${QS:-/tmp/rackwire-quickstart}
BIN=$PWD/bin
export RACKWIRE_SOCKET=$QS/rackwire.sock
NS=(rwqs-web rwqs-client rwqs-other)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
rw() { echo "+ rackwire $*" >&2; "$BIN/rackwire" "$@"; }

stop() {
	if [ -f "$QS/rackwired.pid" ]; then
		kill "$(cat "$QS/rackwired.pid")" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$(cat "$QS/rackwired.pid")" 2>/dev/null || break; sleep 0.1; done
	fi
	[ -f "$QS/web.pid" ] && kill "$(cat "$QS/web.pid")" 2>/dev/null || true
	[ -f "$QS/rackwire.toml" ] && "$BIN/rackwired" cleanup --config "$QS/rackwire.toml" 2>/dev/null || true
	for n in "${NS[@]}"; do ip netns del "$n" 2>/dev/null || true; done
	rm -rf "$QS"
	echo "quickstart removed"
}

start() {
	[ "$(id -u)" = 0 ] || { echo "the quickstart creates network namespaces and loads BPF: run it as root (sudo make quickstart)" >&2; exit 1; }
	mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	[ -x "$BIN/rackwired" ] || make build
	if [ -f "$QS/rackwired.pid" ] && kill -0 "$(cat "$QS/rackwired.pid")" 2>/dev/null; then
		echo "the quickstart is already running; stop it with: make quickstart-stop" >&2
		exit 1
	fi
	stop >/dev/null 2>&1 || true
	mkdir -p "$QS/policies.d"
	cat >"$QS/rackwire.toml" <<TOML
version = 1
[node]
name = "quickstart"
[agent]
state_dir = "$QS/state"
socket = "$QS/rackwire.sock"
socket_group = ""
[ipam]
cidrs = ["10.250.99.0/24"]
[datapath]
pin_dir = "/sys/fs/bpf/rackwire-quickstart"
policy_dir = "$QS/policies.d"
[restart]
jitter_window = "0s"
[metrics]
listen = "127.0.0.1:9962"
[log]
format = "text"
TOML
	say "starting rackwired (embedded store, logs in $QS/rackwired.log)"
	"$BIN/rackwired" --config "$QS/rackwire.toml" >"$QS/rackwired.log" 2>&1 &
	echo $! >"$QS/rackwired.pid"
	for _ in $(seq 100); do [ -S "$QS/rackwire.sock" ] && break; sleep 0.1; done
	[ -S "$QS/rackwire.sock" ] || { echo "rackwired did not start; its log:" >&2; cat "$QS/rackwired.log" >&2; exit 1; }
	rw status

	say "creating three workloads in network namespaces"
	for n in "${NS[@]}"; do ip netns add "$n"; done
	rw endpoint add --name web --netns /run/netns/rwqs-web --labels app=web,env=demo
	rw endpoint add --name client --netns /run/netns/rwqs-client --labels app=client,env=demo
	rw endpoint add --name other --netns /run/netns/rwqs-other --labels app=other,env=demo
	rw endpoint list
	web_ip=$("$BIN/rackwire" endpoint get web --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ipv4"])')

	say "applying docs/examples/quickstart.yaml: web accepts TCP/80 from app=client only"
	rw policy import docs/examples/quickstart.yaml
	# A minimal HTTP server (http.server would resolve its own name first,
	# which hangs on a machine without DNS).
	ip netns exec rwqs-web python3 - "$web_ip" >/dev/null 2>&1 <<'PY' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 80)); s.listen(16)
while True:
    c, _ = s.accept()
    try:
        c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 20\r\n\r\nhello from web (ok)\n")
    finally:
        c.close()
PY
	echo $! >"$QS/web.pid"
	for _ in $(seq 50); do ip netns exec rwqs-web ss -ltn | grep -q ":80 " && break; sleep 0.1; done

	say "client -> web:80 (allowed)"
	if ip netns exec rwqs-client python3 - "$web_ip" <<'PY'
import sys, urllib.request
print(urllib.request.urlopen("http://%s/" % sys.argv[1], timeout=3).status, "OK")
PY
	then :; else echo "unexpected: the allowed connection failed; see $QS/rackwired.log"; fi

	say "other -> web:80 (dropped by policy)"
	if ip netns exec rwqs-other python3 - "$web_ip" <<'PY'
import sys, socket
s = socket.socket(); s.settimeout(2)
try:
    s.connect((sys.argv[1], 80)); print("unexpected: connected")
except OSError as e:
    print("dropped:", e)
PY
	then :; fi
	rw policy trace --src app=other --dst app=web --dport 80/tcp || true

	cat <<EOF2

The agent keeps running. Try:
  export RACKWIRE_SOCKET=$RACKWIRE_SOCKET
  bin/rackwire status
  bin/rackwire endpoint list
  bin/rackwire bpf policy get web
  bin/rackwire monitor --type drop      # then: ip netns exec rwqs-other curl -m1 http://$web_ip/
Remove everything with: make quickstart-stop
EOF2
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
