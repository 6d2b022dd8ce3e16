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

bench: deps test-images
	$(CARGO) build --workspace --release --bins
	$(CARGO) bench --workspace

clean:
	$(CARGO) clean
