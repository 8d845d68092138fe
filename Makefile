# One script for people and CI alike. `make demo` and `make test` work on a
# bare Debian 12 machine: they install what is missing first.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: setup guest image install garage build demo demo-lan3 test lint unit system bench clean-state fuzz-smoke fuzz-bench

setup:
	bash scripts/setup.sh

guest: setup
	bash guest/build.sh

# The Debian 12 reference OS image (docs/images.md): target/images/debian-12/,
# rebuilt only when its inputs change; the root file system (mmdebstrap,
# a few minutes) is cached in .cache/images/.
image: setup guest
	bash guest/debian/build.sh

# Garage (the replicated S3 store of the object-store tests), built once from
# crates.io into .cache/garage/<version>/ (~10 min the first time; a no-op after).
garage:
	bash scripts/garage.sh

build:
	$(CARGO) build --bins

# A working stasis anywhere: the binaries into $(DESTDIR)$(PREFIX)/bin, the
# busybox guest into share/stasis/guest, the reference OS image (when
# built: make image) into share/stasis/images/debian-12. Images of your own
# go into ~/.local/share/stasis/images/NAME/ (or $$STASIS_IMAGES); see
# docs/images.md, "Installing".
PREFIX ?= /usr/local
DESTDIR ?=
PROFILE ?= release
# cargo writes the dev profile to target/debug.
OUT_DIR = target/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
SHARE = $(DESTDIR)$(PREFIX)/share/stasis
install: setup guest
	$(CARGO) build --profile $(PROFILE) --bin stasis --bin stasis-agent --bin delay-node
	install -d $(DESTDIR)$(PREFIX)/bin $(SHARE)/guest
	install -m 0755 $(OUT_DIR)/stasis $(OUT_DIR)/stasis-agent $(OUT_DIR)/delay-node $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 target/guest/vmlinuz target/guest/initrd.img $(SHARE)/guest/
	if [ -f target/images/debian-12/disk.qcow2 ]; then \
	    install -d $(SHARE)/images/debian-12 && \
	    install -m 0644 target/images/debian-12/disk.qcow2 target/images/debian-12/vmlinuz \
	        target/images/debian-12/initrd.img target/images/debian-12/kernel-args \
	        target/images/debian-12/image.toml $(SHARE)/images/debian-12/; \
	fi

# The GEC8 demo (docs/demo.md): examples/gec8.ns imported as is, a
# distributed Mandelbrot job, two VMs killed, the experiment restored, the
# image bit-identical to a failure-free run; PNGs in demo-out/.
demo: setup guest build
	target/debug/stasis-demo --out demo-out

# The short walkthrough on examples/lan3.toml (checkpoint under UDP load,
# kill everything, restore, every frame exactly once).
demo-lan3: setup guest build
	bash scripts/demo.sh

# The whole suite: unit and crate tests, then the whole-system tests that boot
# real VMs (they run one at a time: each uses both cores).
test: setup lint guest image garage build
	$(CARGO) test --workspace --exclude stasis-system-tests
	bash scripts/fuzz.sh smoke 5
	$(CARGO) test -p stasis-system-tests -- --test-threads=1 --nocapture

# The lint gate: formatting (rustfmt.toml) and every clippy warning as an error.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: setup guest build
	$(CARGO) bench -p delay-node

# Every fuzz target (fuzz/, cargo-fuzz + libFuzzer on the stable toolchain)
# a few seconds on its seeds; cargo-fuzz installs into .cache/tools once.
fuzz-smoke:
	bash scripts/fuzz.sh smoke 5

# Every fuzz target for 10^6 inputs (README "Fuzzing" reports the counts).
fuzz-bench:
	bash scripts/fuzz.sh bench
