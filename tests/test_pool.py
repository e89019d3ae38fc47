"""Pool supervision with real forked children and fake targets (no kernel).

Each fake target notes its pid in a file once it is ready (its signal
dispositions set), so the tests wait on facts instead of sleeping.  The
pool runs on the test's main thread, as under abusectl, so its signal
handlers are the real ones; a helper thread acts on it and then stops it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from abuse import pool as pool_module
from abuse.backends.base import Backend
from abuse.pool import Pool, WorkerStat


def _note(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def sleeper(path: Path, index: int, backend: Backend, batch: int) -> None:
    """Serve nothing until SIGTERM, then exit 0 (as serve_worker does)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _note(path)
    while True:
        time.sleep(60)


def stubborn(path: Path, index: int, backend: Backend, batch: int) -> None:
    """Ignore SIGTERM: only SIGKILL ends this one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _note(path)
    while True:
        time.sleep(60)


def crasher(path: Path, index: int, backend: Backend, batch: int) -> None:
    """Fail at once, as a worker does when /dev/abuse is missing."""
    _note(path)
    raise SystemExit(1)


def quitter(path: Path, index: int, backend: Backend, batch: int) -> None:
    """Return at once, as a worker does when its disk is destroyed."""
    _note(path)


def first_quits(path: Path, index: int, backend: Backend, batch: int) -> None:
    """Quit (disk gone) if first to start, else sleep until SIGTERM."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _note(path)
    if noted(path)[0] == os.getpid():
        return
    while True:
        time.sleep(60)


def noted(path: Path) -> list[int]:
    """The pids the targets wrote to ``path``, in start order."""
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(0.01)


def wait_started(pool: Pool, notes: Path, count: int) -> None:
    """Every slot's child is ready and the supervisor has recorded it."""
    wait_until(
        lambda: (
            len(noted(notes)) == count
            and sorted(stat.pid for stat in pool.stats() if stat.alive) == sorted(noted(notes))
        )
    )


def make_pool(
    tmp_path: Path, target: Callable[..., None], workers: int, stop_timeout: float = 10.0
) -> tuple[Pool, Path]:
    notes = tmp_path / "notes"
    pool = Pool(7, Backend(), workers, target=functools.partial(target, notes), stop_timeout=stop_timeout)
    return pool, notes


def drive(pool: Pool, action: Callable[[Pool], None], *, stop: bool = True, **run_kwargs: object) -> int:
    """Run ``pool`` here while ``action(pool)`` runs on a helper thread.

    The helper stops the pool when the action ends (or only when it
    fails, if not ``stop``), so a failing test cannot hang.
    """
    errors: list[BaseException] = []

    def helper() -> None:
        try:
            action(pool)
        except BaseException as exc:
            errors.append(exc)
            pool.stop()
        else:
            if stop:
                pool.stop()

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    code = pool.run(**run_kwargs)  # type: ignore[arg-type]
    thread.join(10)
    if errors:
        raise errors[0]
    return code


def watchdog(pool: Pool, seconds: float = 10.0) -> threading.Timer:
    """Stop ``pool`` if a test's own exit condition never comes."""
    timer = threading.Timer(seconds, pool.stop)
    timer.daemon = True
    timer.start()
    return timer


def assert_gone(procs: list[psutil.Process]) -> None:
    """None of ``procs`` runs any more (create_time guards pid reuse)."""
    assert procs
    assert [proc.pid for proc in procs if proc.is_running()] == []


def test_starts_workers_ticks_and_stops_them(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, sleeper, 3)
    ticks: list[int] = []
    procs: list[psutil.Process] = []

    def action(pool: Pool) -> None:
        wait_started(pool, notes, 3)
        stats = pool.stats()
        assert [stat.alive for stat in stats] == [True] * 3
        assert sorted(stat.pid for stat in stats) == sorted(noted(notes))
        assert all(stat.rss > 0 and stat.cpu_percent >= 0 and stat.restarts == 0 for stat in stats)
        procs.extend(psutil.Process(stat.pid) for stat in stats)
        assert all(proc.ppid() == os.getpid() for proc in procs)
        wait_until(lambda: len(ticks) >= 2)

    code = drive(pool, action, on_tick=lambda p: ticks.append(len(p.stats())), tick=0.05)

    assert code == 0
    assert_gone(procs)
    assert ticks[0] == 3
    assert pool.restarts == 0
    assert [stat.alive for stat in pool.stats()] == [False] * 3


def test_sigkilled_worker_is_restarted(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, sleeper, 2)
    procs: list[psutil.Process] = []

    def action(pool: Pool) -> None:
        wait_started(pool, notes, 2)
        victim, other = pool.stats()
        procs.extend([psutil.Process(victim.pid), psutil.Process(other.pid)])
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: pool.restarts == 1 and len(noted(notes)) == 3)
        new, same = pool.stats()
        assert new.alive and new.pid != victim.pid and new.pid == noted(notes)[-1]
        assert new.restarts == 1
        assert same == WorkerStat(other.pid, same.cpu_percent, same.rss, 0, True)
        procs.append(psutil.Process(new.pid))

    assert drive(pool, action) == 0
    assert pool.restarts == 1
    assert_gone(procs)


def test_crash_loop_backs_off_and_gives_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pool, notes = make_pool(tmp_path, crasher, 2)
    timer = watchdog(pool)
    started = time.monotonic()
    code = pool.run()
    elapsed = time.monotonic() - started
    timer.cancel()

    assert code == 1
    # Back-off 0.1 + 0.2 + 0.4 + 0.8 s between the five starts of each
    # slot: a loop without it would have forked hundreds of times.
    assert len(noted(notes)) == 2 * pool.start_failures
    assert pool.restarts == 2 * (pool.start_failures - 1)
    assert 1.4 < elapsed < 6
    gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1
    assert "exited with status 1" in gave_up[0]


def test_worker_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, stubborn, 2, stop_timeout=1.0)
    procs: list[psutil.Process] = []
    stopped: list[float] = []

    def action(pool: Pool) -> None:
        wait_until(lambda: len(noted(notes)) == 2)
        procs.extend(psutil.Process(pid) for pid in noted(notes))
        stopped.append(time.monotonic())

    assert drive(pool, action) == 0
    waited = time.monotonic() - stopped[0]
    assert 0.9 < waited < 4
    assert_gone(procs)


def test_second_stop_kills_without_waiting(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, stubborn, 1, stop_timeout=60.0)
    stopped: list[float] = []

    def action(pool: Pool) -> None:
        wait_until(lambda: len(noted(notes)) == 1)
        stopped.append(time.monotonic())
        pool.stop()
        pool.stop()

    assert drive(pool, action, stop=False) == 0
    assert time.monotonic() - stopped[0] < 4
    assert noted(notes)[0] not in {child.pid for child in psutil.Process().children()}


def test_workers_exiting_zero_end_the_pool(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, quitter, 3)
    timer = watchdog(pool)
    code = pool.run()
    timer.cancel()

    assert code == 0
    assert 1 <= len(noted(notes)) <= 3  # the first exit may stop the others before they note
    assert pool.restarts == 0  # nobody was respawned onto a gone disk


def test_one_worker_exiting_zero_stops_the_others(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, first_quits, 3)
    timer = watchdog(pool)
    started = time.monotonic()
    code = pool.run()
    elapsed = time.monotonic() - started
    timer.cancel()

    assert code == 0
    assert elapsed < 5  # no child missed its SIGTERM (stop_timeout is 10 s)
    assert pool.restarts == 0
    assert len(noted(notes)) >= 1
    assert not set(noted(notes)) & {child.pid for child in psutil.Process().children()}
    assert [stat.alive for stat in pool.stats()] == [False] * 3


def _ignores(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    raise AssertionError("no SigIgn line")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_supervisor_stops_pool(tmp_path: Path, signum: signal.Signals) -> None:
    pool, notes = make_pool(tmp_path, sleeper, 2)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    procs: list[psutil.Process] = []

    def action(pool: Pool) -> None:
        wait_until(lambda: len(noted(notes)) == 2)
        procs.extend(psutil.Process(pid) for pid in noted(notes))
        assert all(_ignores(proc.pid, signal.SIGINT) for proc in procs)  # Ctrl-C is for the supervisor
        os.kill(os.getpid(), signum)

    assert drive(pool, action, stop=False) == 0
    assert_gone(procs)
    assert pool.restarts == 0
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert signal.set_wakeup_fd(-1) == -1


def test_runs_off_the_main_thread(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, sleeper, 2)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(pool.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(noted(notes)) == 2)
        os.kill(noted(notes)[0], signal.SIGKILL)
        wait_until(lambda: pool.restarts == 1 and all(stat.alive for stat in pool.stats()))
        procs = [psutil.Process(stat.pid) for stat in pool.stats()]
    finally:
        pool.stop()
        thread.join(10)
    assert result == [0]
    assert_gone(procs)


def test_stop_before_run_returns_at_once(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, sleeper, 2)
    pool.stop()
    assert pool.run() == 0
    assert noted(notes) == []
    assert pool.stats() == [WorkerStat(0, 0.0, 0, 0, False)] * 2
    with pytest.raises(RuntimeError):
        pool.run()


def test_default_target_without_disk_fails_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No disk has this index, in a VM with the module loaded or not.
    monkeypatch.setattr(pool_module, "_hardening_reported", False)
    pool = Pool(999_999, Backend(), 2)
    pool.start_failures = 2
    timer = watchdog(pool)
    with caplog.at_level(logging.WARNING, logger="abuse.pool"):
        code = pool.run()
    timer.cancel()

    assert code == 1
    hardening = [r for r in caplog.records if "memory-pressure" in r.getMessage()]
    assert len(hardening) == (1 if pool_module._probe_hardening() else 0)


def test_backoff_doubles_for_quick_deaths_and_resets_after_a_longer_life() -> None:
    pool = Pool(0, Backend(), 1)
    pool.start_failures = 100
    slot = pool._slots[0]
    delays = []
    for lived in [0, 0, 0, 0, 0, 0, 0, 0, 3, 0]:
        slot.started = time.monotonic() - lived
        pool._on_exit(slot, -signal.SIGKILL)
        delays.append(slot.delay)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 0.1, 0.2])
    assert slot.failures == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"workers": 0}, {"index": -1}, {"batch": 0}, {"stop_timeout": -1.0}],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    arguments = {"index": 0, "backend": Backend(), "workers": 1, **kwargs}
    with pytest.raises(ValueError):
        Pool(**arguments)  # type: ignore[arg-type]


# --- readiness and liveness -----------------------------------------------------


def heartbeat(path: Path, index: int, backend: Backend, batch: int) -> None:
    """Attach (say ready), then stamp liveness every 20 ms as an idle worker does."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    pool_module.worker_ready()
    _note(path)
    while True:
        pool_module.worker_alive()
        time.sleep(0.02)


def test_on_ready_once_every_worker_attached(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, heartbeat, 3)
    seen: list[list[int]] = []

    def on_ready(pool: Pool) -> None:
        seen.append(sorted(pool.pids()))
        pool.stop()

    watchdog(pool)
    assert pool.run(on_ready=on_ready) == 0
    assert len(seen) == 1 and len(seen[0]) == 3


def test_not_ready_until_the_workers_say_so(tmp_path: Path) -> None:
    pool, notes = make_pool(tmp_path, sleeper, 2)  # never calls worker_ready
    ready: list[bool] = []

    def check(pool: Pool) -> None:
        wait_started(pool, notes, 2)
        ready.append(pool.ready)

    drive(pool, check, on_ready=lambda pool: ready.append(True))
    assert ready == [False]


def test_a_stopped_worker_is_killed_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notes = tmp_path / "notes"
    pool = Pool(7, Backend(), 2, target=functools.partial(heartbeat, notes), alive_timeout=2.0)

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # reaped between any two looks
            return True

    def stop_one(pool: Pool) -> None:
        wait_started(pool, notes, 2)
        wait_until(lambda: pool.ready)
        victim = noted(notes)[0]
        os.kill(victim, signal.SIGSTOP)
        # Only the stopped one is sure to be killed; a starved healthy one
        # on a loaded host may be too, which is what liveness is for.
        wait_until(lambda: gone(victim) and pool.ready and victim not in pool.pids(), timeout=20)
        stats = pool.stats()
        assert sum(stat.hung_kills for stat in stats) == pool.hung_kills >= 1
        assert sum(stat.restarts for stat in stats) >= 1

    with caplog.at_level(logging.WARNING, logger="abuse.pool"):
        assert drive(pool, stop_one) == 0
    assert "stopped answering for" in caplog.text and "; killed" in caplog.text


def test_liveness_off_leaves_a_stopped_worker(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    pool = Pool(7, Backend(), 1, target=functools.partial(heartbeat, notes), alive_timeout=0)
    stamps: list[float] = []

    def stop_it(pool: Pool) -> None:
        wait_started(pool, notes, 1)
        wait_until(lambda: pool.ready)
        (victim,) = noted(notes)
        os.kill(victim, signal.SIGSTOP)
        # Without liveness nothing judges it: a second stamp-free period
        # passes (observed as the stamp not moving) and it is still there.
        stamps.append(pool._stamps[0])
        wait_until(lambda: time.monotonic() - stamps[0] > 0.5)
        assert pool.hung_kills == 0 and pool.stats()[0].alive
        os.kill(victim, signal.SIGCONT)

    assert drive(pool, stop_it) == 0


def test_idle_wait_is_a_sixteenth_of_the_timeout_at_most_5_s() -> None:
    assert pool_module.idle_ms_for(0) == 5000  # no timeout
    assert pool_module.idle_ms_for(30_000) == 1875  # abusectl create's default
    assert pool_module.idle_ms_for(800) == 50
    assert pool_module.idle_ms_for(4) == 1
    assert pool_module.idle_ms_for(600_000) == 5000


def test_bad_alive_timeout() -> None:
    with pytest.raises(ValueError, match="alive_timeout"):
        Pool(0, Backend(), 1, alive_timeout=-1)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_bad_start_timeout(value: float) -> None:
    with pytest.raises(ValueError, match="start_timeout"):
        Pool(0, Backend(), 1, start_timeout=value)


def first_hangs_at_start(path: Path, index: int, backend: Backend, batch: int) -> None:
    """The first child never attaches (a store that does not answer its open); the rest do."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _note(path)
    if noted(path)[0] != os.getpid():
        pool_module.worker_ready()
    while True:
        time.sleep(60)


def test_a_child_hung_at_start_is_killed_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notes = tmp_path / "notes"
    pool = Pool(7, Backend(), 1, target=functools.partial(first_hangs_at_start, notes), start_timeout=1.0)

    def replaced(pool: Pool) -> None:
        wait_until(lambda: pool.ready, timeout=20)
        hung, *later = noted(notes)
        (current,) = pool.pids()
        assert current in later and hung not in pool.pids()
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        # A replacement starved past the timeout on a loaded host is killed too: counted alike.
        assert pool.hung_kills == pool.restarts == len(later) >= 1

    with caplog.at_level(logging.WARNING, logger="abuse.pool"):
        assert drive(pool, replaced) == 0
    assert f"(pid {noted(notes)[0]}) did not attach within 1.0 s; killed" in caplog.text


def test_a_pool_whose_children_all_hang_at_start_gives_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notes = tmp_path / "notes"
    pool = Pool(7, Backend(), 2, target=functools.partial(sleeper, notes), start_timeout=0.2)
    timer = watchdog(pool, 30.0)
    code = pool.run()
    timer.cancel()
    assert code == 1
    assert len(noted(notes)) == 2 * pool.start_failures
    gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1 and "did not attach within 0.2 s" in gave_up[0]


def test_start_timeout_defaults_from_liveness(tmp_path: Path) -> None:
    for alive, expected in ((0.0, 0.0), (2.0, Pool.start_timeout_min), (30.0, 120.0)):
        target = functools.partial(heartbeat, tmp_path / "notes")
        pool = Pool(7, Backend(), 1, target=target, alive_timeout=alive)
        assert drive(pool, lambda pool: wait_until(lambda: pool.ready)) == 0
        assert pool.start_timeout == expected
