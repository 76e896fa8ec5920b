"""The token-string convention of docs/store.md, read back independently of qcache's code."""

from __future__ import annotations

import re

# The convention of docs/store.md, read back: \\ \n \t \r \xNN \uNNNN \UNNNNNNNN \<  and <0xNN> for a byte.
_TOKEN = re.compile(r"\\(\\|n|t|r|<|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})|<0x([0-9A-F]{2})>|(.)", re.DOTALL)


def unescape(shown: str) -> bytes:
    """The bytes a token string stands for, per the documented convention."""
    out = bytearray()
    for m in _TOKEN.finditer(shown):
        esc, byte, char = m.groups()
        if byte is not None:
            out.append(int(byte, 16))
        elif char is not None:
            out += char.encode()
        elif esc in ("\\", "<"):
            out += esc.encode()
        elif esc in ("n", "t", "r"):
            out += {"n": b"\n", "t": b"\t", "r": b"\r"}[esc]
        else:  # \xNN, \uNNNN, \UNNNNNNNN: one character
            out += chr(int(esc[1:], 16)).encode()
    return bytes(out)
