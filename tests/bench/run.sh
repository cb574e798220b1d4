#!/usr/bin/env bash
# tests/bench/run.sh — the datapath performance benchmark (`make bench`, root).
#
# 1. Traffic (tests/bench/cmd/rwbench): between two endpoints on one host,
#    (a) no program, (b) rackwire with policy and local redirect,
#    (c) rackwire with policy through the host stack, (d) rackwire without
#    policy, (n) nftables sets with the same 10,000 rules; and between two
#    hosts routed through a router namespace, (a) vs (c) vs (f) rackwire
#    with policy and eBPF host routing (docs/datapath.md "Host routing"). Interleaved
#    rounds, medians side by side, ratios against the goals.
# 2. Per-packet cost through BPF_PROG_TEST_RUN (BenchmarkScaling in
#    daemon/datapath) over 10,240 distinct flows with port ranges, denies
#    and 1,000 CIDR prefixes: 10 vs 100,000 policy entries, 1,000 vs
#    300,000 ipcache entries, new and established flows.
#
# RW_BENCH_QUICK=1 (or -quick) is a short run while developing. Other
# arguments go to `rwbench run` (-rounds N, -dur D, -attach tc, -v). A
# missed goal is reported, not an error; a setup that does not work is.
# Everything the benchmark creates is named rwbn-bench*; it is removed on
# exit and on Ctrl-C, and a run removes the leftovers of a killed one.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
	echo "make bench creates network namespaces and loads BPF programs: run it as root" >&2
	exit 1
fi
for c in go ip sysctl nft; do
	command -v "$c" >/dev/null || { echo "bench: $c not found; run 'make deps'" >&2; exit 1; }
done
args=()
for a in "$@"; do
	if [ "$a" = -quick ]; then
		RW_BENCH_QUICK=1
	else
		args+=("$a")
	fi
done
if [ -n "${RW_BENCH_QUICK:-}" ]; then
	export RW_BENCH_QUICK
	args+=(-quick)
fi

work=$(mktemp -d /tmp/rwbn-bench.XXXXXX)
sweep() {
	local ns
	for ns in rwbn-bench-a rwbn-bench-b rwbn-bench-host rwbn-bench-xa rwbn-bench-xb rwbn-bench-xr rwbn-bench-xc rwbn-bench-xs; do
		[ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
	done
	rm -rf /sys/fs/bpf/rwbn-bench "$work"
}
trap sweep EXIT
trap 'exit 130' INT TERM

echo "load: $(uptime)"
echo "== building"
go build -o "$work/rwbench" ./tests/bench/cmd/rwbench
go test -c -o "$work/datapath.test" ./daemon/datapath

echo
echo "== traffic"
"$work/rwbench" run "${args[@]}"

echo
echo "== per-packet cost, BPF_PROG_TEST_RUN through rw_to_endpoint, distinct flows"
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
echo
echo "load: $(uptime)"
