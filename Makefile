# abuse: build the module, run the tests, run the demo.
#
#   make test    install what is missing, build, run host + kernel tiers
#   make run     install what is missing, build, serve a 10G memory disk
#   make bench   abuse beside loop and nbdkit, in one guest boot (slow)
#
# The kernel tier runs in a TCG guest (virtme-ng) when the running
# kernel cannot load modules.  KVER names the kernel to build for: by
# default the running kernel when its headers are installed, else the
# test guest's.  The test targets always name the guest's kernel.

GUEST_KVER := $(shell scripts/guest-kernel 2>/dev/null)
RUNNING_KVER := $(shell uname -r)
ifneq ($(origin KVER),undefined)
KVER_WHY := KVER=$(KVER)
else ifneq ($(wildcard /lib/modules/$(RUNNING_KVER)/build/Makefile),)
KVER := $(RUNNING_KVER)
KVER_WHY := the running kernel
else
KVER := $(GUEST_KVER)
KVER_WHY := the test guest's kernel: no headers for the running $(RUNNING_KVER)
endif
KDIR ?= /lib/modules/$(KVER)/build
# The kernel the test targets build for and boot: KVER if given, else the guest's.
TEST_KVER := $(if $(filter command line environment,$(origin KVER)),$(KVER),$(GUEST_KVER))
# The 6.1 tiers load kernel/abuse.ko: built first (a no-op if it is up to
# date), so that they also run from a fresh clone.
TEST_MODULE = $(MAKE) -s module KVER=$(TEST_KVER)
PYTHON := .venv/bin/python
PYTEST := $(PYTHON) -m pytest -p no:cacheprovider

.PHONY: all deps module module-guest test test-host test-kernel test-kernel-6.12 test-faults test-ceph test-faults-ceph run bench check clean \
	debug-kernel test-debug test-detectors \
	load unload install install-module install-files install-python dkms-install

all: module

deps:
	scripts/timed deps scripts/bootstrap

module:
	@test -n "$(KVER)" || { echo "module: no kernel headers for $(RUNNING_KVER) and no guest kernel: run make deps" >&2; exit 1; }
	@echo "module: building abuse.ko for $(KVER) ($(KVER_WHY))"
	$(MAKE) -C $(KDIR) M=$(CURDIR)/kernel modules

# The module for the test guest's kernel, whatever the running one is.
module-guest:
	@test -n "$(GUEST_KVER)" || { echo "no guest kernel: run make deps" >&2; exit 1; }
	$(MAKE) module KVER=$(GUEST_KVER)

# Recursive so that GUEST_KVER is read after deps has installed the kernel.
# Each step says how long it took (scripts/timed).
test: deps
	scripts/timed module-guest $(MAKE) module-guest
	scripts/timed check $(MAKE) check
	scripts/timed test-host $(MAKE) test-host
	scripts/timed test-kernel $(MAKE) test-kernel
	scripts/timed test-kernel-6.12 $(MAKE) test-kernel-6.12
	scripts/timed test-faults+ceph $(MAKE) test-faults-ceph

test-host:
	$(PYTEST) -q tests --ignore=tests/kernel

# ARGS passes pytest arguments, e.g. make test-kernel ARGS="-k dkms".
# KVER=6.12 runs the 6.12 tier instead.
# The DKMS test's build runs first, on the host (tests/kernel/dkms-prebuild).
test-kernel:
ifeq ($(KVER),6.12)
	$(MAKE) test-kernel-6.12 KVER=
else
	$(TEST_MODULE)
	unshare -m tests/kernel/dkms-prebuild $(TEST_KVER) build/dkms-$(TEST_KVER)
	KVER=$(TEST_KVER) scripts/kernel-tier $(ARGS)
endif

# The kernel tier on Debian 13's 6.12 LTS.  Kernel and headers come from
# a cached trixie chroot; the module is built there into build/kernel-*/
# so that kernel/abuse.ko (6.1) is never touched.  The DKMS test runs on
# 6.1 only (this tier already builds for 6.12 in the chroot and loads the
# result), and so do the tests of the CLI and pool that reach the driver
# only through calls the other tests make here too (unit command, the
# unit under systemd, readiness, capabilities, privileges, liveness):
# their behaviour does not depend on the kernel, and they would cost
# 6 minutes of TCG.
OPS_612_SKIP := test_install.py::test_dkms_install_builds_and_loads_the_module \
	test_install.py::test_unit_command_serves_the_same_disk_after_a_crash \
	test_install.py::test_unit_serves_the_disk_when_systemctl_start_returns \
	test_install.py::test_unit_command_refuses_a_served_disk \
	test_install.py::test_unit_file_verifies \
	test_operators.py::test_capabilities_set_the_created_disk_flags \
	test_operators.py::test_serving_a_disk_that_advertises_more_is_refused \
	test_operators.py::test_four_workers_refused_for_a_process_local_backend \
	test_operators.py::test_sd_notify_ready_once_every_worker_attached \
	test_operators.py::test_run_serves_for_the_command_and_returns_its_status \
	test_operators.py::test_list_and_status_as_nobody \
	test_operators.py::test_liveness_kills_a_stopped_worker_before_the_disk_timeout
TIER_612_ARGS ?= tests/kernel --ignore=tests/kernel/faults --ignore=tests/kernel/test_rbd.py $(foreach t,$(OPS_612_SKIP),--deselect tests/kernel/$(t))
test-kernel-6.12:
	kver=$$(scripts/trixie-kernel) && \
	scripts/chroot-module $$kver build/kernel-$$kver && \
	KVER=$$kver ABUSE_KO=$(CURDIR)/build/kernel-$$kver/abuse.ko scripts/kernel-tier $(or $(ARGS),$(TIER_612_ARGS))

# The fault suite, in its own boot (the last step of make test).  SEED=n
# replays a failed run's random choices.
test-faults:
	$(TEST_MODULE)
	KVER=$(TEST_KVER) OUT=$(CURDIR)/build/faults ABUSE_SEED=$(SEED) scripts/kernel-tier tests/kernel/faults

# The Ceph tier (tests/kernel/test_rbd.py), in its own boot: a
# single-node cluster in the guest (scripts/ceph-cluster), rbd: disks
# against it, krbd beside them.  About 13 minutes beside another guest;
# make test runs it in the fault suite's boot (test-faults-ceph below).
test-ceph:
	$(TEST_MODULE)
	KVER=$(TEST_KVER) OUT=$(CURDIR)/build/ceph scripts/kernel-tier tests/kernel/test_rbd.py

# make test's last step: the fault suite, then the Ceph tier, in one boot
# (a boot, the module's load and the guest's Python start-up saved).
test-faults-ceph:
	$(TEST_MODULE)
	KVER=$(TEST_KVER) OUT=$(CURDIR)/build/faults ABUSE_SEED=$(SEED) scripts/kernel-tier tests/kernel/faults tests/kernel/test_rbd.py

# The debug kernel (KASAN, lockdep, kmemleak, debug objects: see
# RELIABILITY.md), built once into /var/cache/abuse (13 min on a fresh
# 2-core machine, 2026-12-01).  Not part of test: see RELIABILITY.md.
debug-kernel:
	scripts/debug-kernel

# The kernel tier, then the fault suite, on the debug kernel; fails on
# any detector report.  QUICK=1: a reduced subset; SEED=n as test-faults.
test-debug:
	DEBUG_QUICK=$(QUICK) ABUSE_SEED=$(SEED) scripts/debug-tier

# The deliberate bugs of the selftest build: KASAN and lockdep must
# report them (tests/kernel/detectors).
test-detectors:
	scripts/debug-tier --detectors

run: deps
	$(MAKE) module-guest
	KVER=$(GUEST_KVER) scripts/kernel-tier --run

# Not part of test: slow and timing-based.  BENCH_RUNTIME=s per fio job.
bench:
	bench/run

check:
	KVER=$(TEST_KVER) scripts/check

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
	install -D -m 0644 dist/abuse-rbd.conf.example $(DESTDIR)/etc/abuse/NAME-rbd.conf.example
	install -D -m 0644 dist/systemd/abuse-serve-ceph.conf $(DESTDIR)/usr/share/abuse/abuse-serve-ceph.conf
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

# Works without any kernel headers: Kbuild's clean when they exist, else by hand.
clean:
	if [ -f $(KDIR)/Makefile ]; then $(MAKE) -C $(KDIR) M=$(CURDIR)/kernel clean; fi
	cd kernel && rm -rf *.o *.ko *.mod *.mod.c *.mod.o .*.cmd modules.order Module.symvers .tmp_versions
	rm -rf build
