"""The cffi mirror of kernel/abuse.h agrees with the C compiler."""

from __future__ import annotations

import shutil
import struct as pystruct
import subprocess
from pathlib import Path

import pytest

from abuse import uapi

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "kernel" / "abuse.h"
STRUCTS = sorted(
    name.split()[-1]
    for name in uapi.ffi.list_types()[1]  # struct/union names
    if name.startswith("abuse_")
)


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{HEADER}"', "int main(void) {"]
    for struct in STRUCTS:
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        for field, _ in uapi.ffi.typeof(f"struct {struct}").fields:
            lines.append(f'printf("offsetof {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    for name in list(uapi.constants) + list(uapi.ioctls):
        lines.append(f'printf("value {name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not shutil.which("gcc"):
        pytest.fail("gcc is required for the uapi probe")
    work = tmp_path_factory.mktemp("probe")
    (work / "probe.c").write_text(_probe_source())
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(work / "probe"), str(work / "probe.c")], check=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for _, key, value in (line.split() for line in out.splitlines())}


def test_every_struct_is_mirrored() -> None:
    assert set(STRUCTS) == {
        "abuse_config",
        "abuse_counters",
        "abuse_info",
        "abuse_target",
        "abuse_version",
        "abuse_request",
        "abuse_reply",
        "abuse_xfer",
    }


@pytest.mark.parametrize("struct", STRUCTS)
def test_layout_matches_c(struct: str, compiled: dict[str, int]) -> None:
    ctype = uapi.ffi.typeof(f"struct {struct}")
    assert uapi.ffi.sizeof(ctype) == compiled[struct]
    assert uapi.ffi.sizeof(ctype) % 8 == 0
    for field, info in ctype.fields:
        assert info.offset == compiled[f"{struct}.{field}"], field


def test_constants_and_ioctl_numbers_match_c(compiled: dict[str, int]) -> None:
    for name, value in {**uapi.constants, **uapi.ioctls}.items():
        assert value == compiled[name], name
    assert len(uapi.ioctls) == 9
    assert uapi.ABUSE_IOC_PUT == uapi.ioctls["ABUSE_IOC_PUT"]


def test_header_is_shipped_with_the_package() -> None:
    assert uapi.HEADER_TEXT == HEADER.read_text()


@pytest.mark.parametrize("struct", ["abuse_request", "abuse_reply"])
def test_struct_format_matches_layout(struct: str) -> None:
    import struct as pystruct

    fmt = uapi.struct_format(struct)
    fields = uapi.ffi.typeof(f"struct {struct}").fields
    assert pystruct.calcsize(fmt) == uapi.sizeof(struct)
    assert len(fmt) - 1 == len(fields)
    values = list(range(1, len(fields) + 1))
    cdata = uapi.ffi.new(f"struct {struct} *", dict(zip([name for name, _ in fields], values)))
    assert pystruct.unpack(fmt, uapi.ffi.buffer(cdata)) == tuple(values)


def test_struct_format_spreads_integer_arrays() -> None:
    # __u64 __reserved[N] is N codes, so every struct of the header has a
    # format (the fuzzer's layouts come from here).
    for name in STRUCTS:
        if name == "abuse_info":
            continue  # nested structs: no flat format
        assert pystruct.calcsize(uapi.struct_format(name)) == uapi.sizeof(name), name
    assert uapi.struct_format("abuse_target") == "=IIQQ"
    with pytest.raises(ValueError, match="config"):
        uapi.struct_format("abuse_info")
