# The two commands a fresh Debian 12 machine needs (see README.md):
#   make run    install what is missing, build release, write a default CNI network if there is
#               none (hack/cni-default.sh), run crispd with built-in defaults
#   make test   install what is missing and run every test (unit, integration, end-to-end)
SHELL := /bin/bash
CARGO ?= cargo
# Where test images are built (OCI layouts); reused across runs, rebuilt when hack/images changes.
export CRISP_TEST_IMAGES ?= $(CURDIR)/target/test-images
# `make install` (hack/install.sh): DESTDIR stages, PREFIX/BINDIR take the binaries.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
SYSTEMDUNITDIR ?= /etc/systemd/system
# Where `make run` and `make install` put a default pod network if there is none.
CNI_CONF_DIR ?= /etc/cni/net.d
INSTALL_VARS = DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" BINDIR="$(BINDIR)" SYSCONFDIR="$(SYSCONFDIR)" \
  SYSTEMDUNITDIR="$(SYSTEMDUNITDIR)" CNI_CONF_DIR="$(CNI_CONF_DIR)"
# The release shim: built in its own profile (Cargo.toml [profile.shim]: size-optimised, fat
# LTO) and linked statically against glibc (libc.a from Debian's libc6-dev), then put beside
# the release crispd. One shim runs per pod, and a static one maps no ld.so, libc, libm or
# libgcc_s (docs/design.md "Shim memory"). Only the shim: the flags reach its binary's final
# link alone through `cargo rustc`, so crispd stays dynamic (it resolves registry host names
# through glibc's NSS, which a static binary cannot load). Nothing the shim runs looks up
# users, groups or hosts or loads a library (no getpw*, getgr*, getaddrinfo or dlopen caller
# is left after --gc-sections). Not a PIE, as the dynamic shim (shim/build.rs says why).
# Linked by shim/link-hot-first.sh: `cc` with lld told to put the code a running shim uses
# first (shim/hot-symbols.txt), so the pages a shim maps are the ones it runs.
SHIM_BIN = containerd-shim-crisp-v2
SHIM_STATIC_FLAGS = -C target-feature=+crt-static -C relocation-model=static \
  -C linker=$(CURDIR)/shim/link-hot-first.sh
define build_static_shim
	$(CARGO) rustc --profile shim -p crisp-shim --bin $(SHIM_BIN) -- $(SHIM_STATIC_FLAGS)
	install -m 0755 target/shim/$(SHIM_BIN) target/release/$(SHIM_BIN)
endef

.PHONY: deps build release run install install-files test test-images fresh-root-check kind-image bench clean

deps:
	bash hack/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

release: deps
	$(CARGO) build --workspace --release --exclude crisp-shim
	$(build_static_shim)

run: release
	bash hack/cni-default.sh "$(CNI_CONF_DIR)"
	./target/release/crispd $(ARGS)

install: release
	$(INSTALL_VARS) REQUIRE_STATIC_SHIM=1 FROM="$(CURDIR)/target/release" bash hack/install.sh

# What `make install` copies, without building: FROM names the directory of the binaries;
# REQUIRE_STATIC_SHIM=1 refuses a shim that is not statically linked, as `make install` does.
install-files:
	$(INSTALL_VARS) REQUIRE_STATIC_SHIM="$(REQUIRE_STATIC_SHIM)" FROM="$(FROM)" bash hack/install.sh

test-images: deps
	bash hack/images/build.sh "$(CRISP_TEST_IMAGES)"

# The suite, then the fresh-root check (hack/fresh-root-check.sh: install-deps.sh on a
# minimal Debian 12 root is all the build and the suite need). Both run whatever the other
# does; either failing fails the target.
test: deps test-images
	$(CARGO) build --workspace --bins
	status=0; \
	$(CARGO) nextest run --workspace --no-fail-fast || status=$$?; \
	bash hack/fresh-root-check.sh || status=$$?; \
	exit $$status

fresh-root-check: deps
	bash hack/fresh-root-check.sh

# A kind node image running crisp (e2e/kind/; needs Docker, see README.md "crisp in kind").
KIND_NODE_IMAGE ?= kindest/node:v1.33.1
kind-image: release
	rm -rf e2e/kind/stage
	$(MAKE) install-files FROM="$(CURDIR)/target/release" DESTDIR="$(CURDIR)/e2e/kind/stage" CNI_CONF_DIR= \
	  REQUIRE_STATIC_SHIM=1
	docker build --build-arg KIND_NODE_IMAGE="$(KIND_NODE_IMAGE)" -t crisp-kind-node e2e/kind

# Benchmarks print figures (crisp against Debian's containerd in the same run); they assert
# nothing about time. Release against release: Debian's containerd and its shim are release
# builds, so crispd and the shim are too (CRISP_BIN points the e2e harness at the release
# crispd, which takes the shim beside it; bench_shim reads CRISP_SHIM_DIR). The shim is the
# static one `make release` builds; bench_shim also runs the shim as `cargo build --release`
# links it, dynamically (CRISP_SHIM_DYNAMIC: a copy in target/release/dynamic-shim, named
# for containerd). bench_pods runs
# last and ends with the one table of figures, ratios and targets; BENCH_JSON=path also
# writes it as JSON. BENCH_STEADY_SECS is how long kubelet's polling is replayed.
BENCH_STEADY_SECS ?= 300
DYNAMIC_SHIM = target/release/dynamic-shim/containerd-shim-crispdyn-v2
BENCH_ENV = CRISP_BIN=$(CURDIR)/target/release/crispd CRISP_SHIM_DIR=$(CURDIR)/target/release \
  CRISP_SHIM_DYNAMIC=$(CURDIR)/$(DYNAMIC_SHIM) \
  CRISP_BENCH_STEADY_SECS=$(BENCH_STEADY_SECS) $(if $(BENCH_JSON),BENCH_JSON=$(abspath $(BENCH_JSON)))
bench: deps test-images
	$(CARGO) bench --workspace
	$(CARGO) build --workspace --bins
	$(CARGO) build --release -p crisp-cri --bin crispd -p crisp-shim --bin $(SHIM_BIN)
	install -D -m 0755 target/release/$(SHIM_BIN) $(DYNAMIC_SHIM)
	$(build_static_shim)
	$(BENCH_ENV) $(CARGO) nextest run --workspace --run-ignored only --no-capture --test-threads 1 \
	  -E 'test(bench_large_pull) | test(bench_shim_rss_and_pod_start) | test(adapter_overhead) | test(bench_streaming)'
	$(BENCH_ENV) $(CARGO) nextest run -p crisp-e2e --test bench_pods --run-ignored only --no-capture

clean:
	$(CARGO) clean
