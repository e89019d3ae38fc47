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

__all__ = [
    "DISK_FEATURES",
    "HEADER_TEXT",
    "V1_XFER_FEATURES",
    "XFER_FEATURES",
    "constants",
    "feature_name",
    "feature_names",
    "ffi",
    "ioctls",
    "lib",
    "sizeof",
    "struct_format",
]

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


def _feature_bits(prefix: str) -> dict[str, int]:
    """The single-bit ``#define``s named ``<prefix>*`` (``_ALL`` aside), by name, in bit order."""
    bits = {
        name: value
        for name, value in constants.items()
        if name.startswith(prefix) and name != prefix + "ALL" and value and not value & (value - 1)
    }
    return dict(sorted(bits.items(), key=lambda item: item[1]))


#: Disk features (``ABUSE_F_*``: abuse_config.flags, abuse_version.features), from the header.
DISK_FEATURES: dict[str, int] = _feature_bits("ABUSE_F_")
#: GET/PUT features (``ABUSE_XFER_*``: abuse_xfer.flags, abuse_version.xfer_features).
XFER_FEATURES: dict[str, int] = _feature_bits("ABUSE_XFER_")
#: What a version-1 module accepts, which reports no xfer_features: TIMEOUT
#: and MAPPED came after it without a bit, so only NOWAIT is sure.
V1_XFER_FEATURES = constants["ABUSE_XFER_NOWAIT"]


def feature_name(name: str) -> str:
    """The word of a feature macro: ``ABUSE_F_WRITE_ZEROES`` -> ``write-zeroes``."""
    for prefix in ("ABUSE_F_", "ABUSE_XFER_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.lower().replace("_", "-")


def feature_names(bits: int, table: dict[str, int]) -> list[str]:
    """The words of the bits of ``table`` set in ``bits``; unknown bits as one hex word."""
    words = [feature_name(name) for name, bit in table.items() if bits & bit]
    unknown = bits & ~sum(table.values())
    if unknown:
        words.append(hex(unknown))
    return words


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

    Native byte order, one code per field in order (an array of N
    integers, N codes), so that arrays of
    descriptors can be read with ``iter_unpack`` and written with
    ``pack_into`` without a cffi object per field.  Raises ValueError if
    a field is not a plain integer or the struct has implicit padding.
    """
    ctype = ffi.typeof(f"struct {struct}")
    codes = []
    offset = 0
    for name, field in ctype.fields:
        ftype, count = field.type, 1
        if ftype.kind == "array" and ftype.length is not None:
            ftype, count = ftype.item, ftype.length  # __u64 __reserved[N]: N codes
        code = _STRUCT_CODES.get(ftype.cname)
        if code is None or field.offset != offset:
            raise ValueError(f"struct {struct}: field {name} has no plain struct code")
        codes.append(code * count)
        offset += ffi.sizeof(field.type)
    if offset != ffi.sizeof(ctype):
        raise ValueError(f"struct {struct}: trailing padding")
    return "=" + "".join(codes)


def __getattr__(name: str) -> int:
    # Typed access for mypy; values are module globals set above.
    raise AttributeError(name)
