# `make test` and `make demo` set up on first use (and again when scripts/setup.sh changes).
SWIFT ?= swift
STAMP := .deps/.stamp
RELEASE := .build/release/ttrv

.PHONY: setup test demo bench build release clean-deps fuzz

$(STAMP): scripts/setup.sh
	bash scripts/setup.sh

setup:
	bash scripts/setup.sh

build: $(STAMP)
	$(SWIFT) build

release: $(STAMP)
	$(SWIFT) build -c release --product ttrv

# Passive OpenMP waiting for the test suite: spinning threads are many times slower on a shared
# machine (the ttrv binary sets its own short spin, see Sources/ttrv/main.swift).
test: $(STAMP)
	$(SWIFT) build --build-tests
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(SWIFT) test

demo: release
	$(RELEASE) demo

# Speed and memory benchmarks (release build); writes bench-results.json. Set PEER_PYTHON
# (e.g. PEER_PYTHON=$$(bash ../shared/bench/setup-peer.sh | tail -1)) to measure the Python
# reference in the same run.
bench: release
	$(RELEASE) bench --json bench-results.json

# libFuzzer over every file parser, FUZZ_SECONDS each (default 180); crash inputs land in
# Tests/Fixtures/fuzz/<target>/ and are replayed by `make test`. FUZZ_TARGETS picks a subset.
fuzz: $(STAMP)
	bash scripts/fuzz.sh

clean-deps:
	rm -rf .deps
