"""The kernel log's judge (tests/kernel/bad-log.txt): reports fail a run, a debug kernel's boot does not.

scripts/vm-run greps a whole boot's log with these patterns and the
kernel tests (tests/kernel/kmsg.py) use the same ones.  A pattern too
broad fails every boot of the debug kernel; one too narrow lets a report
pass.  The lines here are copied from real logs of this project's guests
(the benign ones from a 6.1.192-abuse-debug boot of 2026-12-01), or
are the first line of the report as the kernel prints it.
"""

from __future__ import annotations

import pytest

from tests.kernel.kmsg import bad_lines

# Printed by every boot of the debug kernel (PROVE_LOCKING, PROVE_RCU,
# KASAN, kmemleak) or by loading the out-of-tree module.  The first one
# failed the debug tier's kernel-tier boot of 2026-12-01 while the pattern
# was plain "lockdep".
BENIGN = [
    "rcu: \tRCU lockdep checking is enabled.",
    "Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar",
    "... MAX_LOCKDEP_SUBCLASSES:  8",
    "... MAX_LOCKDEP_KEYS:        8192",
    "kasan: KernelAddressSanitizer initialized",
    "... MAX_LOCKDEP_ENTRIES:     32768",
    "kmemleak: Kernel memory leak detector initialized (mem pool available: 38566)",
    "abuse: loading out-of-tree module taints kernel.",
]

# The first line of each kind of report the debug tier must fail on.
REPORTS = [
    "BUG: KASAN: use-after-free in abuse_end_request+0x108/0x110 [abuse]",
    "WARNING: possible circular locking dependency detected",
    "WARNING: possible recursive locking detected",
    "WARNING: inconsistent lock state",
    "INFO: lockdep is turned off.",
    "Disabling lock debugging due to kernel taint",
    "BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580",
    "ODEBUG: free active (active state 0) object type: timer_list hint: abuse_wake_timer_fn+0x0/0x40",
    "list_add corruption. prev->next should be next (ffff888100b8c1e0), but was 0000000000000000.",
    "kmemleak: 3 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
    "unreferenced object 0xffff88810a3c4e00 (size 256):",
    "INFO: task fio:1234 blocked for more than 120 seconds.",
    "BUG: KCSAN: data-race in abuse_get / abuse_put",
    "general protection fault, probably for non-canonical address 0xdead000000000122: 0000 [#1] SMP",
]


@pytest.mark.parametrize("line", BENIGN)
def test_a_debug_kernels_boot_lines_pass(line: str) -> None:
    assert bad_lines([line]) == []


@pytest.mark.parametrize("line", REPORTS)
def test_every_kind_of_report_fails_the_run(line: str) -> None:
    assert bad_lines([line]) == [line]
