# abuse: build the module, run the tests, run the demo.
#
#   make test    install what is missing, build, run host + kernel tiers
#   make run     install what is missing, build, serve a 10G memory disk
#   make bench   abuse beside loop and nbdkit, in one guest boot (slow)
#
# The kernel tier runs in a TCG guest (virtme-ng) when the running
# kernel cannot load modules.  KVER names the kernel to build for.

KVER ?= $(shell scripts/guest-kernel 2>/dev/null)
KDIR ?= /lib/modules/$(KVER)/build
PYTHON := .venv/bin/python
PYTEST := $(PYTHON) -m pytest -p no:cacheprovider

.PHONY: all deps module test test-host test-kernel test-faults run bench check clean load unload

all: module

deps:
	scripts/bootstrap

module:
	@test -n "$(KVER)" || { echo "no guest kernel: run make deps" >&2; exit 1; }
	$(MAKE) -C $(KDIR) M=$(CURDIR)/kernel modules

# Recursive so that KVER is read after deps has installed the kernel.
test: deps
	$(MAKE) module
	$(MAKE) check
	$(MAKE) test-host
	$(MAKE) test-kernel
	$(MAKE) test-faults

test-host:
	$(PYTEST) -q tests --ignore=tests/kernel

test-kernel:
	scripts/kernel-tier

# The fault suite alone, in its own boot.  SEED=n replays a failed run.
test-faults:
	OUT=$(CURDIR)/build/faults ABUSE_SEED=$(SEED) scripts/kernel-tier tests/kernel/faults

run: deps
	$(MAKE) module
	scripts/kernel-tier --run

# Not part of test: slow and timing-based.  BENCH_RUNTIME=s per fio job.
bench:
	bench/run

check:
	scripts/check

load:
	insmod kernel/abuse.ko

unload:
	rmmod abuse

clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR)/kernel clean
	rm -rf build
