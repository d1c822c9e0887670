# dig-cluster: the two commands of the README, and the steps they are made of.
#   make run    the demo job through the HTTP API of `digctl standalone` (no servers needed)
#   make test   every test (installs what is missing first)
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
DIGCTL := target/release/digctl
# The stamp names the requirements' hash: editing them re-runs the install,
# an unchanged set-up costs nothing.
STAMP  := $(VENV)/.dig-setup-$(shell sha256sum requirements-dev.txt | cut -c1-12)

.PHONY: help setup build run run-hp35 test lint bench bench-train bench-pipeline bench-load services train-adk evaluate-adk chirality-adk chaos bench-scale bench-steering gpu-bundle density-bench

help:
	@echo "make run    sample adenylate kinase from the trained model through digctl standalone, fetch and score it"
	@echo "make test   run every test"
	@echo "make run-hp35  the same flow for HP35 with an UNTRAINED random model (pipeline only)"
	@echo "make train-adk  retrain examples/adk/model: seven stages, about 9 h on 2 cores, resumable (examples/adk/README.md)"
	@echo "make evaluate-adk  256 samples x 500 steps of the AdK model (flow above 0.8), scored (examples/adk/README.md)"
	@echo "make chirality-adk  where and why the AdK model folds mirror images (examples/adk/README.md, about 10 min on one core)"
	@echo "make bench  sampler benchmark (naive vs optimized, published architecture)"
	@echo "make bench-train  training update: native trainer vs the published PyTorch step"
	@echo "make bench-pipeline  a 1000-sample job through API, RabbitMQ, worker, S3 vs digctl sample"
	@echo "make bench-load  status reads and submissions (wrk) against digctl api while a job samples"
	@echo "make chaos  faults at random moments (kills, broker/Redis restarts) while a batch runs; every sample checked"
	@echo "make bench-scale  two 10 000-entry batches and a 10^6-sample job: control-plane times and memory"
	@echo "make density-bench  docs/density.md: round trips, density ranking, end states, partial diffusion, the closed-open path (PARTS=...)"
	@echo "make gpu-bundle  dist/gpu-bundle: digctl for PyTorch 2.11 + fixtures + gpu-check.sh, to check a GPU machine in one command"
	@echo "make bench-steering  the steering measurements of docs/steering.md (PARTS=..., about 2 h on one core)"

setup: $(STAMP)

$(STAMP): requirements-dev.txt
	@command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (rustup.rs)"; exit 1; }
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@# uv installs the same requirements from PyPI many times faster than pip
	@# (PyTorch's wheel with its CUDA libraries: 3 min with pip, 22 s with uv
	@# from its cache); pip alone is the fallback.
	$(VENV)/bin/pip install --disable-pip-version-check -q uv && \
	  $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python -r requirements-dev.txt || \
	  $(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-dev.txt
	@rm -f $(VENV)/.dig-setup-*; touch $@

build: setup
	cargo build --release -p digctl

run: build
	DIGCTL=$(DIGCTL) scripts/demo.sh

run-hp35: build
	DIG_DEMO=hp35 DIGCTL=$(DIGCTL) scripts/demo.sh

# The shipped AdK model's six-stage training recipe (examples/adk/README.md);
# run it again to resume after an interruption. OUT=... (default train-adk).
train-adk: build
	DIGCTL=$(DIGCTL) scripts/train-adk.sh

# docs/steering.md: unsteered, filtered and steered AdK ensembles (PARTS, OUT, N ...).
bench-steering: build
	scripts/steering-bench.sh

# docs/density.md's measurements (scripts/density-bench.sh says which parts).
density-bench: build
	scripts/density-bench.sh

# A GPU machine's check in one command, for machines with PyTorch 2.11 and no
# Rust (scripts/gpu-bundle.sh says how; docs/gpu.md what it prints).
gpu-bundle: setup
	scripts/gpu-bundle.sh

# The targets' measurement: 256 samples at the full 500 steps (the flow above
# t = 0.8, the shipped model's setting; FLOW_ABOVE= for none), scored.
evaluate-adk: build
	scripts/evaluate-adk.sh

# Where and why the AdK model folds mirror images: partial diffusion, and
# pure noise against noise plus the structure at t = 1, scored.
chirality-adk: build
	scripts/chirality-adk.sh

lint: setup
	scripts/stage.sh fmt cargo fmt --all -- --check
	scripts/stage.sh clippy cargo clippy --workspace --all-targets -- -D warnings

# Tests talk to real RabbitMQ, Redis and SeaweedFS (S3): scripts/services.sh
# installs and starts them when absent and writes their endpoints to
# .services/env, which the tests read from the environment.
services: setup
	scripts/stage.sh services scripts/services.sh >/dev/null
	scripts/stage.sh deploy-tools scripts/deploy-tools.sh

# fmt, one build of every test target linted as it compiles (while the
# services start), then every test; scripts/test.sh says how and why.
test: setup
	scripts/test.sh

bench: build
	$(DIGCTL) bench

# A training update, native against the published PyTorch step
# (bench/published-dig), small and published sizes, L = 128 and 214, batch 4,
# 1 and 2 threads. ARGS="--steps 5 ..." (digctl bench-train --help).
bench-train: build
	$(DIGCTL) bench-train $(ARGS)

# ARGS="--samples 1000 --steps 20 ..." (see target/release/pipeline-bench --help)
bench-pipeline: build services
	cargo build --release -p dig-tests --bin pipeline-bench
	set -a && . .services/env && set +a && target/release/pipeline-bench $(ARGS)

# ARGS="--seconds 30 --connections 64"; needs wrk (Debian: apt-get install wrk)
bench-load: build services
	@command -v wrk >/dev/null || { echo "error: wrk not found; apt-get install wrk"; exit 1; }
	cargo build --release -p dig-tests --bin load-bench
	set -a && . .services/env && set +a && target/release/load-bench $(ARGS)

# Faults at random moments while a batch runs (SIGKILL of workers, the
# coordinator, an API replica; RabbitMQ and Redis restarts); every sample
# checked. ARGS="--minutes 10 --jobs 40 --seed N" (target/release/chaos --help).
# make test runs a one-minute version (tests/tests/chaos.rs).
chaos: build services
	cargo build --release -p dig-tests --bin chaos
	set -a && . .services/env && set +a && target/release/chaos $(ARGS)

# Control-plane times and memory at scale: two 10 000-entry batches and a
# 10^6-sample job (shards of 1000), fetch interrupted and resumed.
# ARGS="--entries 10000 --big-samples 1000000" (target/release/scale-bench --help).
bench-scale: build services
	cargo build --release -p dig-tests --bin scale-bench
	set -a && . .services/env && set +a && target/release/scale-bench $(ARGS)
