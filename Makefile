# rackwire — build, test and package.
#
#   make quickstart   run the agent on the embedded store with two demo workloads (root)
#   make deps test    install the test dependencies and pass every test (root; what CI runs)
#
# Other targets: build, deps, generate, generate-check, lint, test, test-unit,
# fuzz, bench, package, clean.

SHELL   := /bin/bash
# Release versions come from tags (v1.2.3); untagged trees build as 0.1.0.
VERSION ?= $(or $(shell git describe --tags --match 'v[0-9]*' 2>/dev/null | sed 's/^v//'),0.1.0)
LDFLAGS := -X github.com/rackwire/rackwire/internal/version.Version=$(VERSION)
GO      ?= go
BIN     := bin
CACHE   ?= /var/cache/rackwire-test
export RACKWIRE_CACHE := $(CACHE)
# Fuzz time per target inside `make test` (bounded).
FUZZTIME ?= 20s

.PHONY: all build deps generate generate-check lint test test-unit test-systemd test-salt fuzz bench bench-consul package quickstart quickstart-stop check clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

# Everything the tests need, from scratch (apt packages, Salt, the Consul build).
deps:
	bash scripts/deps.sh

# Regenerate the BPF objects and their Go bindings (needs clang).
generate:
	bash bpf/generate.sh

# CI: the committed BPF output must be what the sources produce.
generate-check: generate
	@if ! git diff --quiet --exit-code -- bpf/; then \
		echo "generated BPF output differs from the committed one; run 'make generate' and commit:"; \
		git --no-pager diff --stat -- bpf/; exit 1; fi

lint:
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; if [ -n "$$out" ]; then echo "gofmt -l:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Every Go test, the real-infrastructure ones included (they need root and
# the tools `make deps` installs; under CI=true a missing one fails).
test-unit:
	$(GO) test -count=1 -p 1 -timeout 40m ./...

fuzz:
	$(GO) test -run='^$$' -fuzz=FuzzParse -fuzztime=$(FUZZTIME) ./daemon/config
	$(GO) test -run='^$$' -fuzz=FuzzLoad -fuzztime=$(FUZZTIME) ./daemon/policy

# Every suite under tests/ is a Go package, so test-unit runs them all.
# generate-check needs clang (make deps).
test: lint generate-check test-unit fuzz

bench:
	bash tests/bench/run.sh

# Consul at fleet scale (~4 min): 300,000 ipcache entries into one agent,
# propagation of a new endpoint to 10 agents, recovery after an outage.
bench-consul:
	$(GO) test -tags rackwire_bench -count=1 -v -run TestBench -timeout 20m ./tests/multihost/

package:
	bash packaging/build.sh $(VERSION)

# The slow real-infrastructure suites, each runnable alone (also part of `make test`).
test-systemd:
	$(GO) test -count=1 -timeout 20m ./tests/systemd/
test-salt:
	$(GO) test -count=1 -timeout 20m ./tests/salt/

quickstart: build
	bash scripts/quickstart.sh start

quickstart-stop:
	bash scripts/quickstart.sh stop

# Install and test in one go: what .ci/run does on a fresh clone, as root.
check: deps test

clean:
	rm -rf $(BIN) dist
