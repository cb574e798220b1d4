# rackwire — build, test and package.
#
#   make quickstart   run the agent on the embedded store with two demo workloads (root)
#   make deps test    install the test dependencies and pass every test (root; what CI runs)
#
# Other targets: build, deps, generate, generate-check, lint, test, test-unit,
# fuzz, bench, bench-cni, package, clean.

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

.PHONY: all build deps generate generate-check lint test test-unit test-systemd test-salt fuzz bench bench-services bench-consul bench-cni bench-fleet package quickstart quickstart-stop check clean

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

# The fuzz targets besides FuzzParse and FuzzLoad, as package:Target (go
# test -fuzz takes one target of one package per run): store values, state
# files, API bodies, Consul KV lists, BIRD replies and rendered configs (FuzzRenderBird runs
# `bird -p` per input), monitor events, the store file, CNI network configs
# and CNI_ARGS. `make fuzz` gives
# each FUZZTIME_SHORT, `make fuzz-long` gives every target, FuzzParse and
# FuzzLoad included, FUZZTIME_LONG. Crashers are written to the package's
# testdata/fuzz/.
FUZZTIME_SHORT ?= 4s
FUZZTIME_LONG ?= 5m
FUZZMINIMIZETIME ?= 2s
FUZZ_TARGETS := \
	./daemon/ipcache:FuzzNodes ./daemon/ipcache:FuzzRemote ./daemon/ipcache:FuzzDecodeIPRecord \
	./daemon/identity:FuzzIdentityIDKeys ./daemon/identity:FuzzIdentityClaims \
	./daemon/policy:FuzzDecodeStoreValue ./daemon/endpoint:FuzzStateFile ./daemon/restart:FuzzStateFile \
	./daemon:FuzzEndpointAdd ./daemon:FuzzTraceRequest ./daemon:FuzzPolicyImport \
	./daemon/api:FuzzRawEntry ./daemon/api:FuzzDecodeBody \
	./birdconf:FuzzReadReply ./birdconf:FuzzRenderBird \
	./daemon/datapath:FuzzDecodeEvent ./daemon/store/local:FuzzStoreFile ./daemon/store/consul:FuzzDecodeKVList \
	./internal/cniplugin:FuzzParseConfig ./internal/cniplugin:FuzzParseArgs
# A run that fails without writing a reproducer is the engine's own flake
# at the -fuzztime boundary (golang/go#51484, #56238): it is run once more.
fuzz-each = set -e; for t in $(1); do \
		p="$${t%%:*}"; n="$${t\#*:}"; \
		cmd="$(GO) test -run='^$$' -fuzz='^$$n$$' -fuzztime=$(2) -fuzzminimizetime=$(FUZZMINIMIZETIME) $$p"; \
		echo "$$cmd"; \
		before=$$(ls "$$p/testdata/fuzz/$$n" 2>/dev/null | wc -l); \
		if ! eval "$$cmd"; then \
			if [ "$$(ls "$$p/testdata/fuzz/$$n" 2>/dev/null | wc -l)" != "$$before" ]; then exit 1; fi; \
			echo "$$n failed without a reproducer (fuzzing engine flake); once more:"; \
			eval "$$cmd"; \
		fi; \
	done

fuzz:
	@$(call fuzz-each,./daemon/config:FuzzParse ./daemon/policy:FuzzLoad,$(FUZZTIME))
	@$(call fuzz-each,$(FUZZ_TARGETS),$(FUZZTIME_SHORT))

.PHONY: fuzz-long
fuzz-long:
	@$(call fuzz-each,./daemon/config:FuzzParse ./daemon/policy:FuzzLoad $(FUZZ_TARGETS),$(FUZZTIME_LONG))

# Every suite under tests/ is a Go package, so test-unit runs them all.
# generate-check needs clang (make deps).
test: lint generate-check test-unit test-e2e-perf fuzz

# The e2e suite once more on the perf event array that kernels before 5.8
# use: RACKWIRE_TEST_EVENTS=perf makes every test agent's config say
# [datapath] events = "perf". The runtime and service tests, which read no
# events (about three minutes of the suite), are skipped here (E2E_SKIP=
# runs them too). To run only the tests that read events: make
# test-e2e-perf E2E_RUN='TestEventFlood|TestPolicy|TestAuditMode|TestDatapathRawEntries'
.PHONY: test-e2e-perf
E2E_RUN ?= .
E2E_SKIP ?= ^(TestCNI|TestDocker|TestPodman|TestServiceSources|TestStatusHostRouting)
test-e2e-perf:
	RACKWIRE_TEST_EVENTS=perf $(GO) test -count=1 -timeout 20m -run '$(E2E_RUN)' -skip '$(E2E_SKIP)' ./tests/e2e/

bench:
	bash tests/bench/run.sh

# Service VIPs (socket load balancing) vs direct vs IPVS vs nftables DNAT, 1 vs 10,000
# services (~3 min; tests/bench/cmd/rwbench/svc.go). RWBENCH_SVC_ARGS=-quick
# for a short run.
bench-services:
	$(GO) build -o /tmp/rwsd-rwbench ./tests/bench/cmd/rwbench
	/tmp/rwsd-rwbench services $(RWBENCH_SVC_ARGS)

# Consul at fleet scale (~4 min): 300,000 ipcache entries into one agent,
# propagation of a new endpoint to 10 agents, recovery after an outage.
bench-consul:
	$(GO) test -tags rackwire_bench -count=1 -v -run TestBench -timeout 20m ./tests/multihost/

# CNI ADD/DEL latency p50/p99 with 1 and 200 endpoints present (~1 min).
bench-cni:
	$(GO) test -tags rackwire_bench -count=1 -v -run TestBenchCNILatency -timeout 15m ./tests/e2e/

# A fleet on one machine (docs/scale.md): RACKWIRE_FLEET_AGENTS agents
# (default 100) in namespaces on a 3-server Consul. RACKWIRE_FLEET_LADDER
# (entry totals, default 1000,10000,100000) and RACKWIRE_FLEET_WINDOW (the
# restart gate's window; default: the one [restart] fleet_size gives, 4m9s
# for 100 agents) tune it.
bench-fleet:
	$(GO) test -tags rackwire_fleet -count=1 -v -run TestFleet -timeout 40m ./tests/fleet/

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
