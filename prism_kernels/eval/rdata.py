"""A minimal reader for R's serialization format (XDR, version 2/3) and lazy-load
databases (`*.rdb` / `*.rdx`), enough to read data packages such as Debian's
r-cran-janeaustenr without R: character/integer/real/logical vectors, lists,
pairlists, symbols and attributes. Environments, closures and bytecode are not
supported (a data package's character vectors need none of them).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

NILVALUE, REFSXP, SYMSXP, LISTSXP, CHARSXP = 254, 255, 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19
NA_INT = -2147483648
_SPECIAL_ENVS = {242: "emptyenv", 241: "baseenv", 253: "globalenv",
                 250: "basenamespace", 251: "missingarg", 252: "unboundvalue"}


class RObject:
    """A vector with attributes (names, class, ...)."""

    def __init__(self, rtype: int, value, attributes: dict | None = None):
        self.rtype, self.value, self.attributes = rtype, value, attributes or {}

    def __repr__(self):
        return f"RObject(type={self.rtype}, len={len(self.value) if hasattr(self.value, '__len__') else '?'})"


class _Reader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def bytes(self, n: int) -> bytes:
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def header(self):
        fmt = self.bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"only XDR serialization is supported, got {fmt!r}")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding
        elif version != 2:
            raise ValueError(f"unsupported serialization version {version}")

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == NILVALUE:
            return None
        if t in _SPECIAL_ENVS:
            return _SPECIAL_ENVS[t]
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if t == LISTSXP:  # pairlist -> dict (tag -> value) or list
            items = []
            while True:
                attrs = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                items.append((tag, self.item()))
                flags = self.int()
                t = flags & 0xFF
                if t == NILVALUE:
                    break
                if t != LISTSXP:
                    raise ValueError("improper pairlist")
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            return items
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = self.bytes(n)
            levels = flags >> 12
            return raw.decode("latin-1" if levels & 4 else "utf-8", errors="replace")
        if t in (LGLSXP, INTSXP):
            n = self.int()
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            v = [None if x == NA_INT else (bool(x) if t == LGLSXP else x) for x in v]
        elif t == REALSXP:
            n = self.int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t == STRSXP:
            n = self.int()
            v = [self.item() for _ in range(n)]
        elif t == VECSXP:
            n = self.int()
            v = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R type {t}")
        attrs = {}
        if has_attr:
            for tag, val in self.item():
                attrs[tag] = val
        return RObject(t, v, attrs)


def unserialize(data: bytes):
    r = _Reader(data)
    r.header()
    return r.item()


def read_rds(path) -> object:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return unserialize(raw)


def _named(obj: RObject) -> dict:
    return dict(zip(obj.attributes["names"].value, obj.value))


def read_lazyload_db(prefix) -> dict:
    """Read every variable of an R lazy-load database `prefix.rdb/.rdx`.

    Returns {name: RObject}. Only zlib-compressed databases (compression 1,
    R's default for data) are supported.
    """
    prefix = str(prefix)
    index = _named(read_rds(prefix + ".rdx"))
    variables = _named(index["variables"])
    blob = Path(prefix + ".rdb").read_bytes()
    out = {}
    for name, loc in variables.items():
        off, length = loc.value
        chunk = blob[off:off + length]
        n = struct.unpack(">I", chunk[:4])[0]
        payload = zlib.decompress(chunk[4:])
        if len(payload) != n:
            raise ValueError(f"{name}: expected {n} bytes, got {len(payload)}")
        out[name] = unserialize(payload)
    return out
