"""parse_size and format_size (abuse.sizes)."""

from __future__ import annotations

import pytest

from abuse.sizes import format_size, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("1", 1),
        ("512K", 512 * K),
        ("512k", 512 * K),
        ("64M", 64 * M),
        ("10G", 10 * G),
        ("1T", T),
        ("2P", 2 << 50),
        ("512KB", 512 * K),
        ("512KiB", 512 * K),
        ("512kib", 512 * K),
        ("10gb", 10 * G),
        ("4096B", 4096),
        (" 10 G ", 10 * G),
    ],
)
def test_parse_size_accepts(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["0", "0K", "-1", "-10G", "ten", "", "G", "1.5G", "10X", "10 GG", "10iB", "0x10", "1_000", "1e6", "20E"],
)
def test_parse_size_rejects_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (1, "1B"),
        (512, "512B"),
        (4096, "4K"),
        (1536, "1.5K"),
        (64 * M, "64M"),
        (10 * G, "10G"),
        (T, "1T"),
        (M - 1, "1.0M"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [1, 512, 4096, 512 * K, 64 * M, 10 * G, 3 * T])
def test_format_then_parse_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size
