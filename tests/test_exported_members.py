"""The public surface of ``abuse`` is exactly ``abuse.__all__`` (httpx's test)."""

from __future__ import annotations

import abuse


def test_all_is_exactly_the_public_names() -> None:
    public = {name for name in dir(abuse) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(abuse, name)).__name__ == "module"}
    assert set(abuse.__all__) - {"__version__"} == public - modules - {"annotations"}  # the __future__ import


def test_every_exported_member_says_it_is_from_abuse() -> None:
    for name in abuse.__all__:
        member = getattr(abuse, name)
        if isinstance(member, type) and issubclass(member, abuse.AbuseError):
            assert member.__module__ == "abuse", name


def test_all_is_sorted_and_unique() -> None:
    names = [name for name in abuse.__all__ if name != "__version__"]
    assert names == sorted(set(names))
