#!/usr/bin/env bash
# run-suites.sh runs the end-to-end suites under tests/ that are not Go
# tests (each is also runnable alone). Go suites under tests/ run with
# `go test ./...`.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
rc=0
for s in tests/*/suite.sh; do
	echo "=== suite $s"
	if ! bash "$s"; then
		echo "--- FAIL suite $s"
		rc=1
	else
		echo "--- PASS suite $s"
	fi
done
exit $rc
