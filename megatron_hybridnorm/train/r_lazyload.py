"""Character vectors out of an R package's lazy-load database (``data/Rdata.rdb`` + ``.rdx``).

A second corpus ships as R data (see ``corpora.py``). Reading it needs only a small part of R's
serialization format (XDR, R's "Writing R Extensions" and ``serialize.c``): character, integer,
logical and real vectors, lists, pairlists of attributes, symbols and references to them. Anything
else is refused by name rather than guessed at; a general reader would pull pandas and xarray in.
"""

from __future__ import annotations

import gzip
import struct
import zlib

# SEXP types
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
LATIN1 = 1 << 14  # CHARSXP encoding flags (levels << 12)


class RDataError(ValueError):
    """Bytes that are not the part of R's serialization this reader knows."""


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"truncated: wanted {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise RDataError("not R's XDR serialization (expected 'X\\n')")
        version = self.int()
        self.take(8)  # writer's and minimal reader's R versions
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"serialization version {version} (2 and 3 are known)")

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self.take(n).decode(
                "latin-1" if flags & LATIN1 else "utf-8")
        if kind == LISTSXP:  # a pairlist: here only attributes, read as a dict
            if flags & HAS_ATTR:
                self.item()
            tag = self.item() if flags & HAS_TAG else None
            out = {tag: self.item()}
            rest = self.item()
            return {**out, **rest} if isinstance(rest, dict) else out
        if kind in (STRSXP, VECSXP, INTSXP, LGLSXP, REALSXP):
            n = self.int()
            if kind in (STRSXP, VECSXP):
                values = [self.item() for _ in range(n)]
            else:
                code, size = ("d", 8) if kind == REALSXP else ("i", 4)
                values = list(struct.unpack(f">{n}{code}", self.take(size * n)))
            attrs = self.item() if flags & HAS_ATTR else None
            if isinstance(attrs, dict) and "names" in attrs:
                return dict(zip(attrs["names"], values))
            return values
        raise RDataError(f"R object of SEXP type {kind} at offset {self.pos - 4}: not supported")


def unserialize(data: bytes):
    """One serialized R object: a list, a dict (a named vector) or None."""
    r = _Reader(data)
    r.header()
    return r.item()


def _chunk(rdb: bytes, offset: int, length: int) -> bytes:
    """One object of the .rdb: a 4-byte big-endian size, then zlib (R's default compression)."""
    raw = rdb[offset : offset + length]
    if len(raw) != length or length < 5:
        raise RDataError(f"the .rdb has no object at offset {offset}, length {length}")
    size = struct.unpack(">I", raw[:4])[0]
    try:
        out = zlib.decompress(raw[4:])
    except zlib.error as e:
        raise RDataError(f"object at offset {offset}: not zlib-compressed ({e}); bzip2 and xz "
                         "lazy-load databases are not supported") from None
    if len(out) != size:
        raise RDataError(f"object at offset {offset}: {len(out)} bytes, its header says {size}")
    return out


def lazyload_strings(rdx: bytes, rdb: bytes) -> dict[str, list[str | None]]:
    """Every variable of a lazy-load database, each a character vector (one string per line)."""
    index = unserialize(gzip.decompress(rdx))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError("the .rdx holds no 'variables' index")
    out = {}
    for name, (offset, length) in index["variables"].items():
        value = unserialize(_chunk(rdb, offset, length))
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            raise RDataError(f"variable {name!r} is not a character vector")
        out[name] = value
    return out
