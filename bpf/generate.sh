#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Regenerates the Go bindings and objects of the datapath (bpf2go, clang).
# Called by `go generate ./bpf` and by `make generate`; the output is
# deterministic, so CI runs it and fails on `git diff --exit-code bpf/`.
set -eu
cd "$(dirname "$0")"

multiarch=$(gcc -print-multiarch 2>/dev/null || echo "$(uname -m)-linux-gnu")
cflags="-O2 -g -Wall -Werror -I/usr/include/$multiarch"

for obj in from_endpoint:FromEndpoint to_endpoint:ToEndpoint from_uplink:FromUplink sock_lb:SockLB; do
	src=${obj%%:*}
	ident=${obj##*:}
	go run github.com/cilium/ebpf/cmd/bpf2go \
		-cc "${BPF2GO_CC:-clang}" -cflags "$cflags" \
		-target bpfel -go-package bpf -no-global-types \
		-output-stem "$src" "$ident" "$src.c"
done
