# mqvmm: two commands matter — `make run` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
BUILD ?= $(CURDIR)/build
CARGO ?= cargo
export MQVMM_BUILD := $(BUILD)

.PHONY: all run test test-unit test-component test-boot test-soak deps resources build lint bench fuzz clean

all: build

# Debian packages the project needs (idempotent; installs only what is missing).
deps:
	@resources/install-deps.sh

# Guest kernel, guest initramfs, nested-rig (L1) image: all from Debian packages, cached under $(BUILD).
resources: deps
	@resources/build-all.sh "$(BUILD)"

build:
	$(CARGO) build --release --workspace --bins

# Boot the default guest (2 vCPUs, 512 MiB, 2-pair multiqueue net, shell on the console),
# directly on KVM or in the nested rig when /dev/kvm cannot run an ordinary guest.
run: resources build
	$(CARGO) run --release -q -p mqvmm-tests --bin mqvmm-rig -- run $(if $(ARGS),-- $(ARGS))

test: deps lint test-unit test-component test-boot

test-unit:
	$(CARGO) test --workspace --lib --bins

test-component: deps build
	$(CARGO) test --release -p mqvmm-tests --test 'component_*'
	$(CARGO) test --release -p steering --tests

test-boot: resources build
	$(CARGO) test --release -p mqvmm-tests --test 'boot_*' -- --test-threads=1

test-soak: resources build
	MQVMM_RIG_TEST_TIMEOUT=$${MQVMM_RIG_TEST_TIMEOUT:-900} $(CARGO) test --release -p mqvmm-tests --test 'soak_*' -- --ignored --test-threads=1 --nocapture

# Benchmarks (not part of `make test`; root): mqvmm's device data path against the raw tap ceiling,
# then guests under mqvmm (with and without eBPF steering) and under Debian's QEMU (vhost=off,
# vhost=on) in the same run, in the nested rig when /dev/kvm cannot run guests. Writes bench/results/latest.{json,md} and SVG plots.
# BENCH_ARGS is passed on, e.g. BENCH_ARGS="--no-guest" or "--reps 5" (`mqvmm-bench all --help`).
bench: resources build
	$(CARGO) run --release -q -p mqvmm-bench -- all $(BENCH_ARGS)

# Fuzzing (not part of `make test`): builds fuzz/ (cargo-fuzz, installed into $(BUILD)/tools
# when missing) and runs each target for FUZZ_SECONDS (default 600), one at a time; libFuzzer's
# final numbers go to fuzz/last-run.txt. FUZZ_TARGETS="ctrl" picks targets; see fuzz/README.md.
fuzz:
	@fuzz/run.sh $(FUZZ_TARGETS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --quiet

clean:
	$(CARGO) clean
	rm -rf "$(BUILD)"
