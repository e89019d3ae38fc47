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

.PHONY: all deps module test test-host test-kernel test-kernel-6.12 test-faults run bench check clean \
	load unload install install-module install-files install-python dkms-install

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
	$(MAKE) test-kernel-6.12
	$(MAKE) test-faults

test-host:
	$(PYTEST) -q tests --ignore=tests/kernel

# ARGS passes pytest arguments, e.g. make test-kernel ARGS="-k dkms".
# KVER=6.12 runs the 6.12 tier instead.
test-kernel:
ifeq ($(KVER),6.12)
	$(MAKE) test-kernel-6.12 KVER=
else
	scripts/kernel-tier $(ARGS)
endif

# The kernel tier on Debian 13's 6.12 LTS.  Kernel and headers come from
# a cached trixie chroot; the module is built there into build/kernel-*/
# so that kernel/abuse.ko (6.1) is never touched.  The DKMS test runs on
# 6.1 only: a DKMS build under TCG takes 15 minutes, and this tier already
# builds for 6.12 (in the chroot) and loads the result.
TIER_612_ARGS ?= tests/kernel --ignore=tests/kernel/faults \
	--deselect tests/kernel/test_install.py::test_dkms_install_builds_and_loads_the_module
test-kernel-6.12:
	kver=$$(scripts/trixie-kernel) && \
	scripts/chroot-module $$kver build/kernel-$$kver && \
	KVER=$$kver ABUSE_KO=$(CURDIR)/build/kernel-$$kver/abuse.ko scripts/kernel-tier $(or $(ARGS),$(TIER_612_ARGS))

# The fault suite, in its own boot (the last step of make test).  SEED=n
# replays a failed run's random choices.
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

# Install for the running kernel (INSTALL_KVER): the module
# (modules_install + depmod), the udev rule, the systemd unit, and
# abusectl in its own venv.  DESTDIR stages it elsewhere.  DKMS instead
# of install-module: make dkms-install.
INSTALL_KVER ?= $(shell uname -r)
UDEVDIR ?= /etc/udev/rules.d
UNITDIR ?= /etc/systemd/system
VENVDIR ?= /opt/abuse
BINDIR ?= /usr/local/bin

install: install-module install-files install-python
	@echo "install: done: write /etc/abuse/NAME.conf, then systemctl enable --now abuse-serve@NAME"

install-module:
	$(MAKE) module KVER=$(INSTALL_KVER)
	$(MAKE) -C /lib/modules/$(INSTALL_KVER)/build M=$(CURDIR)/kernel \
		$(if $(DESTDIR),INSTALL_MOD_PATH=$(DESTDIR)) modules_install
	depmod -a $(if $(DESTDIR),-b $(DESTDIR)) $(INSTALL_KVER)

install-files:
	install -D -m 0644 dist/udev/59-abuse.rules $(DESTDIR)$(UDEVDIR)/59-abuse.rules
	install -D -m 0644 dist/systemd/abuse-serve@.service $(DESTDIR)$(UNITDIR)/abuse-serve@.service
	install -D -m 0644 dist/abuse.conf.example $(DESTDIR)/etc/abuse/NAME.conf.example
	if [ -z "$(DESTDIR)" ]; then \
		udevadm control --reload 2>/dev/null || true; \
		systemctl daemon-reload 2>/dev/null || true; \
	fi

install-python:
	python3 -m venv $(DESTDIR)$(VENVDIR)
	$(DESTDIR)$(VENVDIR)/bin/pip install -q --disable-pip-version-check .
	install -d $(DESTDIR)$(BINDIR)
	ln -sf $(VENVDIR)/bin/abusectl $(DESTDIR)$(BINDIR)/abusectl

dkms-install:
	KVER=$(INSTALL_KVER) scripts/dkms-install

load:
	insmod kernel/abuse.ko

unload:
	rmmod abuse

clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR)/kernel clean
	rm -rf build
