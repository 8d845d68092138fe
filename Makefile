# One script for people and CI alike. `make demo` and `make test` work on a
# bare Debian 12 machine: they install what is missing first.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: setup guest build demo demo-lan3 test unit system bench clean-state

setup:
	bash scripts/setup.sh

guest: setup
	bash guest/build.sh

build:
	$(CARGO) build --bins

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
test: setup guest build
	$(CARGO) test --workspace --exclude stasis-system-tests
	$(CARGO) test -p stasis-system-tests -- --test-threads=1 --nocapture

bench: setup guest build
	$(CARGO) bench -p delay-node
