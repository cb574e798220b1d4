#!/usr/bin/env bash
# tests/bench/run.sh — the datapath performance benchmark (`make bench`, root).
#
# 1. Traffic between two endpoints on one host (tests/bench/cmd/rwbench):
#    plain veth + routing vs rackwire with 1,000 ipcache identities and
#    10,000 policy entries, alternated, medians and ratios b/a.
# 2. Per-packet cost through BPF_PROG_TEST_RUN (BenchmarkScaling in
#    daemon/datapath): 10 vs 100,000 policy entries, 1,000 vs 300,000
#    ipcache entries.
#
# Extra arguments go to `rwbench run` (-rounds N, -dur D, -attach tc, -v).
# Everything the benchmark creates is named rwh-bench*; it is removed on
# exit and on Ctrl-C, and a run removes the leftovers of a killed one.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
	echo "make bench creates network namespaces and loads BPF programs: run it as root" >&2
	exit 1
fi
for c in go ip sysctl; do
	command -v "$c" >/dev/null || { echo "bench: $c not found; run 'make deps'" >&2; exit 1; }
done

work=$(mktemp -d /tmp/rwh-bench.XXXXXX)
sweep() {
	local ns
	for ns in rwh-bench-a rwh-bench-b rwh-bench-host; do
		[ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
	done
	rm -rf /sys/fs/bpf/rwh-bench "$work"
}
trap sweep EXIT
trap 'exit 130' INT TERM

echo "== building"
go build -o "$work/rwbench" ./tests/bench/cmd/rwbench
go test -c -o "$work/datapath.test" ./daemon/datapath

echo
echo "== traffic between two endpoints (a: no program, b: rackwire)"
"$work/rwbench" run "$@"

echo
echo "== per-packet cost, BPF_PROG_TEST_RUN (new flow through rw_to_endpoint)"
# The test binary runs in its package directory, as go test does.
out=$(cd daemon/datapath && "$work/datapath.test" -test.run '^$' -test.bench '^BenchmarkScaling$' \
	-test.benchtime 1x -test.count 1 -test.timeout 5m)
grep -E '^(flows|floor|new flow|established|ratio)' <<<"$out"
# Four ratio lines (policy and ipcache, new and established) or the setup broke.
if [ "$(grep -c '^ratio .* goal <= ' <<<"$out")" != 4 ]; then
	echo "bench: BenchmarkScaling printed no ratios; its output:" >&2
	echo "$out" >&2
	exit 1
fi
