# The two commands a fresh Debian 12 machine needs (see README.md):
#   make run    install what is missing, build release, run crispd with built-in defaults
#   make test   install what is missing and run every test (unit, integration, end-to-end)
SHELL := /bin/bash
CARGO ?= cargo
# Where test images are built (OCI layouts); reused across runs, rebuilt when hack/images changes.
export CRISP_TEST_IMAGES ?= $(CURDIR)/target/test-images

.PHONY: deps build release run test test-images bench clean

deps:
	bash hack/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

release: deps
	$(CARGO) build --workspace --release

run: release
	./target/release/crispd $(ARGS)

test-images: deps
	bash hack/images/build.sh "$(CRISP_TEST_IMAGES)"

test: deps test-images
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast

# Benchmarks print figures (crisp against Debian's containerd in the same run); they assert
# nothing about time. The ignored ones need the debug binaries the e2e harness starts.
bench: deps test-images
	$(CARGO) bench --workspace
	$(CARGO) build --workspace --bins
	# containerd's shim is a release build: compare like with like (bench_shim reads
	# CRISP_SHIM_DIR; the other benches run the debug crispd and the shim beside it).
	$(CARGO) build --release -p crisp-shim
	CRISP_SHIM_DIR=$(CURDIR)/target/release $(CARGO) nextest run --workspace --run-ignored only --no-capture --test-threads 1 \
	  -E 'test(bench_large_pull) | test(bench_pods_crispd_vs_containerd) | test(bench_shim_rss_and_pod_start) | test(adapter_overhead) | test(bench_streaming)'

clean:
	$(CARGO) clean
