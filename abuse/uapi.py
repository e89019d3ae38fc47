"""Mirror of kernel/abuse.h.

The structs are parsed by cffi from the header itself (shipped as package
data), so there is one definition of every layout.  The numeric
``#define``s become module attributes of the same names, and the ioctl
numbers are computed with ioctl-opt from the cffi struct sizes.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import cffi
import ioctl_opt

__all__ = ["HEADER_TEXT", "constants", "ffi", "ioctls", "lib", "sizeof", "struct_format"]

_TYPES_PRELUDE = """
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32;
typedef uint64_t __u64; typedef int32_t __s32; typedef int64_t __s64;
"""

_DEFINE = re.compile(r"^#define\s+(\w+)\s+(.+?)\s*$")
_IOCTL = re.compile(r"^_IO(R|W|WR)?\(\s*(\w+)\s*,\s*(\w+)\s*,\s*struct\s+(\w+)\s*\)$")
_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|\d+)[uU]?[lL]{0,2}")
_EXPRESSION = re.compile(r"(\s*(0[xX][0-9a-fA-F]+|\d+|<<|\||\(|\))\s*)+")
_IOC_DIRECTION = {
    None: ioctl_opt.IOC_NONE,
    "R": ioctl_opt.IOC_READ,
    "W": ioctl_opt.IOC_WRITE,
    "WR": ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE,
}


def _read_header() -> str:
    return resources.files("abuse").joinpath("abuse.h").read_text()


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _number(expr: str) -> int | None:
    """Value of a constant expression such as ``(1ULL << 3)``, or None."""
    expr = _LITERAL.sub(r"\1", expr)
    if not _EXPRESSION.fullmatch(expr):
        return None
    return int(eval(expr, {"__builtins__": {}}))  # digits, parens, << and | only


def _parse(text: str) -> tuple[str, dict[str, str]]:
    """Split the header into cdef-able C and the ``#define`` table."""
    defines: dict[str, str] = {}
    body: list[str] = []
    for line in _strip_comments(text).splitlines():
        if line.startswith("#"):
            match = _DEFINE.match(line)
            if match:
                defines[match.group(1)] = match.group(2)
            continue
        body.append(line)
    return "\n".join(body), defines


HEADER_TEXT = _read_header()
_body, _defines = _parse(HEADER_TEXT)

ffi = cffi.FFI()
ffi.cdef(_TYPES_PRELUDE + _body + "\nint ioctl(int fd, unsigned long request, ...);")
lib: Any = ffi.dlopen(None)

#: Every numeric ``#define`` of the header, by name.
constants: dict[str, int] = {}
for _name, _value in _defines.items():
    _n = _number(_value)
    if _n is not None:
        constants[_name] = _n

#: Every ioctl number of the header, by name (``ABUSE_IOC_*``).
ioctls: dict[str, int] = {}
for _name, _value in _defines.items():
    _m = _IOCTL.match(_value)
    if _m:
        _dir, _magic, _nr, _struct = _m.groups()
        ioctls[_name] = ioctl_opt.IOC(
            _IOC_DIRECTION[_dir],
            constants[_magic],
            int(_nr, 0),
            ffi.sizeof(f"struct {_struct}"),
        )

globals().update(constants)
globals().update(ioctls)


def sizeof(struct: str) -> int:
    """Size in bytes of ``struct <struct>`` as laid out by the header."""
    return int(ffi.sizeof(f"struct {struct}"))


_STRUCT_CODES = {
    "uint8_t": "B",
    "uint16_t": "H",
    "uint32_t": "I",
    "uint64_t": "Q",
    "int32_t": "i",
    "int64_t": "q",
}


def struct_format(struct: str) -> str:
    """A :mod:`struct` format for ``struct <struct>``, derived from its cffi layout.

    Native byte order, one code per field in order, so that arrays of
    descriptors can be read with ``iter_unpack`` and written with
    ``pack_into`` without a cffi object per field.  Raises ValueError if
    a field is not a plain integer or the struct has implicit padding.
    """
    ctype = ffi.typeof(f"struct {struct}")
    codes = []
    offset = 0
    for name, field in ctype.fields:
        code = _STRUCT_CODES.get(field.type.cname)
        if code is None or field.offset != offset:
            raise ValueError(f"struct {struct}: field {name} has no plain struct code")
        codes.append(code)
        offset += ffi.sizeof(field.type)
    if offset != ffi.sizeof(ctype):
        raise ValueError(f"struct {struct}: trailing padding")
    return "=" + "".join(codes)


def __getattr__(name: str) -> int:
    # Typed access for mypy; values are module globals set above.
    raise AttributeError(name)
