"""Backend capabilities default from the methods a class overrides (nbdkit's rule)."""

from __future__ import annotations

from abuse import Backend
from abuse.backends import FileBackend, MemoryBackend, NullBackend, ZeroBackend
from abuse.backends.base import API_VERSION, capabilities


class Plain(Backend):
    def read(self, offset: int, buf: memoryview) -> None:
        pass


class Flushes(Plain):
    def flush(self) -> None:
        pass


class Everything(Flushes):
    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        pass


class SaysNoDiscard(Everything):
    can_discard = False  # explicit wins over the override


class InheritsNo(SaysNoDiscard):
    def discard(self, offset: int, length: int) -> None:  # an ancestor said no: still no
        pass


class SaysFlush(Plain):
    can_flush = True  # explicit without a method: the base flush() is a no-op


def caps(cls: type[Backend]) -> tuple[bool, bool, bool]:
    found = capabilities(cls())
    return found["can_flush"], found["can_discard"], found["can_write_zeroes"]


def test_defaults_from_overrides() -> None:
    assert caps(Plain) == (False, False, False)
    assert caps(Flushes) == (True, False, False)
    assert caps(Everything) == (True, True, True)


def test_explicit_attributes_win() -> None:
    assert caps(SaysNoDiscard) == (True, False, True)
    assert caps(InheritsNo) == (True, False, True)
    assert caps(SaysFlush) == (True, False, False)


def test_builtin_backends() -> None:
    assert (NullBackend.can_flush, NullBackend.can_discard, NullBackend.can_write_zeroes) == (
        True,
        True,
        True,
    )
    assert (ZeroBackend.can_flush, ZeroBackend.can_discard, ZeroBackend.can_write_zeroes) == (
        False,
        False,
        False,
    )
    assert (FileBackend.can_flush, FileBackend.can_discard, FileBackend.can_write_zeroes) == (
        True,
        True,
        True,
    )
    assert MemoryBackend.can_discard


def test_shared_state() -> None:
    assert not Plain.shared_state, "a Python backend is process-local unless it says otherwise"
    assert MemoryBackend.shared_state and FileBackend.shared_state
    assert NullBackend.shared_state and ZeroBackend.shared_state


def test_api_version() -> None:
    assert Plain.api_version == API_VERSION == 1
