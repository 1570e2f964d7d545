# Every command a person or CI runs. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
STATE := $(CURDIR)/.cluster

.PHONY: help
help: ## list the commands
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## install kubectl v1.36 and helm v4 into the cache
	@scripts/install-tools.sh

.PHONY: cluster-bins
cluster-bins: ## build (once) the real kube-apiserver and etcd from their Go modules
	@tests/cluster/build.sh

.PHONY: gen
gen: ## regenerate the CRD in the chart from crds/src
	$(CARGO) run -q -p tidepool-crds --bin crdgen

.PHONY: gen-check
gen-check: ## fail when the committed CRD differs from the code
	$(CARGO) run -q -p tidepool-crds --bin crdgen -- --check

.PHONY: lint
lint: deny ## rustfmt, clippy (with clippy.toml's disallowed types and methods), rustdoc, warnings denied; cargo deny
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -q -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps -q

.PHONY: deny
deny: ## cargo deny against deny.toml: licences, duplicate versions, sources (advisories when a local database exists)
	@scripts/deny.sh

.PHONY: rust-tools
rust-tools: ## install (once, cached) the pinned cargo tools make test runs: cargo-fuzz with its nightly, cargo-deny
	@scripts/install-cargo-fuzz.sh $(FUZZ_TOOLCHAIN) >/dev/null
	@scripts/deny.sh --install

.PHONY: peers
peers: ## build (once) the real gRPC peers the agent's tests run: grpc-go interop and route_guide, ghz
	@tests/peers/build.sh

.PHONY: unit
unit: ## unit and component tests, real gRPC peers included (no cluster)
	@peers=$$(tests/peers/build.sh); \
	TIDEPOOL_PEERS_BIN="$$peers" $(CARGO) test --workspace --exclude tidepool-e2e

.PHONY: e2e
e2e: ## end-to-end tests on a local control plane (or TIDEPOOL_E2E_KUBECONFIG's cluster)
	@tools=$$(scripts/install-tools.sh); bins=$$(tests/cluster/build.sh); \
	PATH="$$tools:$$PATH" TIDEPOOL_CLUSTER_BIN="$$bins" $(CARGO) test -p tidepool-e2e -- --test-threads=4

# The cargo-fuzz targets (fuzz/README.md), one per file of fuzz/fuzz_targets.
# Built with a pinned nightly into their own target directory outside the
# repository (scripts/fuzz-build.sh), then run as the libFuzzer binaries
# they are.
FUZZ_TARGETS := $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs)))
FUZZ_SECONDS ?= 600
FUZZ_TARGET_DIR ?= $(or $(TIDEPOOL_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tidepool)/cargo-fuzz-target
# A pinned nightly, so a fresh machine builds with the compiler this was
# fuzzed with.
FUZZ_TOOLCHAIN ?= nightly-2026-05-20
FUZZ_BUILD = scripts/fuzz-build.sh $(FUZZ_TOOLCHAIN) $(FUZZ_TARGET_DIR)

.PHONY: fuzz-smoke
fuzz-smoke: ## each fuzz target over its committed corpus and 5 s of fuzzing (installs cargo-fuzz once)
	@bins=$$($(FUZZ_BUILD)); \
	for t in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d); mkdir -p fuzz/artifacts/$$t; \
	  "$$bins/$$t" -artifact_prefix=fuzz/artifacts/$$t/ -max_total_time=5 -print_final_stats=1 $$work fuzz/corpus/$$t 2>$$work.log \
	    || { cat $$work.log >&2; rm -rf $$work $$work.log; echo "fuzz-smoke: $$t failed (its input is in fuzz/artifacts/$$t)" >&2; exit 1; }; \
	  echo "fuzz-smoke: $$t: $$(grep -E '^stat::number_of_executed_units' $$work.log | awk '{print $$2}') runs, no crash"; \
	  rm -rf $$work $$work.log; \
	done

.PHONY: fuzz
fuzz: ## each fuzz target in turn for FUZZ_SECONDS (600), niced; new inputs in fuzz/corpus-new/<target> (not committed)
	@bins=$$($(FUZZ_BUILD)); \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus-new/$$t fuzz/artifacts/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  nice -n 19 "$$bins/$$t" -artifact_prefix=fuzz/artifacts/$$t/ -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    fuzz/corpus-new/$$t fuzz/corpus/$$t || exit 1; \
	done

.PHONY: test
test: gen-check lint unit fuzz-smoke e2e ## everything CI runs

.PHONY: cluster-up
cluster-up: ## start a local control plane for a person; prints `export KUBECONFIG=...` last
	@if [ -f $(STATE)/pid ] && kill -0 $$(cat $(STATE)/pid) 2>/dev/null; then \
	  echo "a local control plane is already running (pid $$(cat $(STATE)/pid)); make cluster-down stops it" >&2; exit 1; fi
	@mkdir -p $(STATE); bins=$$(tests/cluster/build.sh); \
	nohup "$$bins/tpcluster" run --bin-dir "$$bins" --state-dir $(STATE)/state >$(STATE)/tpcluster.log 2>&1 </dev/null & \
	echo $$! > $(STATE)/pid; \
	for i in $$(seq 1 300); do \
	  if grep -q '^ready ' $(STATE)/tpcluster.log; then break; fi; \
	  if ! kill -0 $$(cat $(STATE)/pid) 2>/dev/null; then cat $(STATE)/tpcluster.log >&2; rm -f $(STATE)/pid; exit 1; fi; \
	  sleep 0.5; done; \
	grep -q '^ready ' $(STATE)/tpcluster.log || { echo "the control plane did not start within 150s; see $(STATE)/tpcluster.log" >&2; exit 1; }; \
	echo "local control plane running (pid $$(cat $(STATE)/pid)); stop it with: make cluster-down"; \
	echo "export KUBECONFIG=$$(sed -n 's/^ready kubeconfig=\([^ ]*\).*/\1/p' $(STATE)/tpcluster.log)"

.PHONY: cluster-down
cluster-down: ## stop the local control plane and remove its files
	@if [ -f $(STATE)/pid ]; then \
	  pid=$$(cat $(STATE)/pid); kill $$pid 2>/dev/null || true; \
	  for i in $$(seq 1 60); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
	  rm -rf $(STATE); echo "local control plane stopped"; \
	else echo "no local control plane is running"; fi

.PHONY: demo
demo: ## the main job on an embedded default (see README)
	@scripts/demo.sh

.PHONY: bench
bench: bench-peers ## benchmarks; figures go to docs/benchmarks.md by hand
	$(CARGO) bench -p tidepool-agent
	@tools=$$(scripts/install-tools.sh); bins=$$(tests/cluster/build.sh); $(CARGO) build -q --release -p tidepool-operator -p tidepool-e2e --bin tidepool-operator --bin operator-bench --bin failover-bench && target=$$($(CARGO) metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') && PATH="$$tools:$$PATH" TIDEPOOL_CLUSTER_BIN="$$bins" $$target/release/operator-bench && PATH="$$tools:$$PATH" TIDEPOOL_CLUSTER_BIN="$$bins" $$target/release/failover-bench

.PHONY: bench-peers
bench-peers: ## tidepool against HAProxy, Envoy and nginx, side by side (installs them; prints the peer table)
	@peers=$$(tests/peers/build.sh); $(CARGO) build -q --release -p tidepool-agent; \
	python3 bench/peers/peerbench.py --peers "$$peers" \
	  --agent "$$($(CARGO) metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tidepool-agent" \
	  $(if $(REPS),--reps $(REPS)) $(if $(SECONDS),--seconds $(SECONDS))

TAG ?= dev

.PHONY: release
release: ## statically linked release binaries (what the images copy)
	scripts/release.sh

.PHONY: release-check
release-check: release ## build the release binaries and check they are static (file, ldd)
	scripts/check-static.sh

.PHONY: images
images: ## images tidepool-operator, tidepool-agent, tidepool-demo :$(TAG), built without pulling (needs a Docker engine)
	@TAG=$(TAG) scripts/images.sh

.PHONY: node-image
node-image: ## build (once, cached) the offline kind node image for Kubernetes v1.36
	@tests/kind/engine.sh && tests/kind/node-image.sh

.PHONY: e2e-kind
e2e-kind: ## tidepool on pods: a 3-node kind cluster built offline, the scenarios, then the cluster deleted
	@tests/kind/run.sh e2e

.PHONY: kind-up
kind-up: ## a 3-node kind cluster with tidepool installed, for a person; prints `export KUBECONFIG=...` last
	@tests/kind/run.sh up

.PHONY: kind-down
kind-down: ## delete the cluster kind-up made
	@tests/kind/run.sh down
