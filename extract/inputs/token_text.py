"""Token strings: what each vocabulary entry writes, shown so that no two texts look alike.

The convention (docs/store.md, "Token strings"), applied to the text a token adds when a sequence is decoded:

- leading spaces are kept: SentencePiece ``"▁the"`` and byte-level BPE ``"Ġthe"`` are both ``" the"``; a lone
  space token is ``" "``;
- a backslash, newline, tab and carriage return are written ``\\\\``, ``\\n``, ``\\t``, ``\\r``; any other
  character Python does not print (controls, no-break and zero-width spaces, ...) as its Python escape
  (``\\xa0``, ``\\u200b``);
- a byte that is no whole UTF-8 character on its own (a byte-level BPE token holding part of a character)
  and every SentencePiece byte-fallback token are written ``<0xNN>`` (``<0x0A>`` is the byte token of a
  newline), and a literal ``<0xNN>`` in text gets a backslash (``\\<0x0A>``) so the two never meet;
- special and added tokens (``<s>``, ``<|im_end|>``) are their text, escaped the same way.

So ``"\\n"`` and ``" "`` are ``\\n`` and `` `` (never both ``""``, as ``decode(...).strip()`` made them).
Each string unescapes to the token's bytes on its own, so unescaping the strings of a sequence's
non-special tokens one by one and joining the bytes gives back what the sequence decodes to, but for the
space a SentencePiece decoder strips from the start of a sequence (joining the strings first would not
do: ``"<"``, ``"0x0A"``, ``">"`` would read as one byte token).
TransformerLens' ``to_str_tokens`` decodes each token alone, which loses both the difference between
``"\\n"``-as-text and its byte token and every partial UTF-8 byte (all become ``"\\ufffd"``).

Needs only the tokenizer (no torch): the store keeps these strings so that reading never needs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np

# Recorded in the manifest (``tokenization.token_strings``): which convention a run's strings follow.
CONVENTION = "qcache-1: decoded text, spaces kept, backslash/newline/tab/unprintables escaped, bytes <0xNN>"

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_LITERAL_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def escape(text: str) -> str:
    """``text`` with backslashes, whitespace other than the space, and unprintable characters escaped, and
    literal ``<0xNN>`` marked with a backslash (the convention above)."""
    out = "".join(c if c.isprintable() and c != "\\" else _python_escape(c) for c in text)
    return _LITERAL_BYTE.sub(lambda m: "\\" + m.group(0), out)


def _python_escape(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii")


def bytes_text(data: bytes) -> str:
    """``data`` as UTF-8 text, escaped; bytes that are no whole character become ``<0xNN>``."""
    out: list[str] = []
    while data:
        try:
            out.append(escape(data.decode("utf-8")))
            break
        except UnicodeDecodeError as exc:
            out.append(escape(data[: exc.start].decode("utf-8")))
            out += [f"<0x{b:02X}>" for b in data[exc.start : exc.end]]
            data = data[exc.end :]
    return "".join(out)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable stand-in of each byte in byte-level BPE vocabs
    (printable Latin-1 bytes stand for themselves, the others map to U+0100 upwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_spec(tokenizer: Any) -> tuple[str, str, bool]:
    """How the tokenizer's pieces become text: ``("byte-level" | "metaspace" | "decode", replacement,
    byte_fallback)``, read from a fast tokenizer's decoder; anything else decodes token by token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return "decode", "", False
    spec = json.loads(backend.decoder.__getstate__())
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = {p.get("type") for p in parts}
    fallback = bool(getattr(backend.model, "byte_fallback", False)) or "ByteFallback" in types
    if "ByteLevel" in types:
        return "byte-level", "", fallback
    for p in parts:
        if p.get("type") == "Metaspace":
            return "metaspace", str(p.get("replacement", "\u2581")), fallback
        if p.get("type") == "Replace" and p.get("content") == " ":
            return "metaspace", str((p.get("pattern") or {}).get("String", "\u2581")), fallback
    return "decode", "", fallback


def token_strings(tokenizer: Any, ids: Iterable[int]) -> np.ndarray:
    """The string of each token id in ``ids`` (the convention above): ``(n,)`` object array of ``str``.

    Each distinct id is converted once, so a run's whole token axis costs one pass over the vocabulary
    entries it uses.
    """
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
    unique, inverse = np.unique(ids, return_inverse=True)
    table = vocab_strings(tokenizer, [int(i) for i in unique])
    out = np.empty(len(unique), dtype=object)
    out[:] = [table[int(i)] for i in unique]
    return out[inverse.reshape(-1)] if len(ids) else np.empty(0, dtype=object)


def vocab_strings(tokenizer: Any, ids: list[int]) -> dict[int, str]:
    """``{id: string}`` of the given vocabulary entries (the convention above)."""
    kind, replacement, fallback = _decoder_spec(tokenizer)
    added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out: dict[int, str] = {}
    for i, piece in zip(ids, pieces, strict=True):
        if i in added:  # special and added tokens: their text as written
            out[i] = escape(added[i])
        elif piece is None:  # an id the vocabulary does not have
            out[i] = f"<unknown id {i}>"
        elif fallback and (m := _BYTE_PIECE.fullmatch(piece)):
            out[i] = f"<0x{int(m.group(1), 16):02X}>"
        elif kind == "byte-level":
            table = _byte_decoder()
            if all(c in table for c in piece):
                out[i] = bytes_text(bytes(table[c] for c in piece))
            else:  # a piece outside the byte alphabet (an added word): its text as written
                out[i] = escape(piece)
        elif kind == "metaspace":
            out[i] = escape(piece.replace(replacement, " "))
        else:
            out[i] = escape(_decode_one(tokenizer, i))
    return out


def _decode_one(tokenizer: Any, i: int) -> str:
    """The text token ``i`` adds after another token (decoders strip the space that starts a sequence)."""
    anchor = tokenizer.convert_tokens_to_ids("a")
    if isinstance(anchor, int) and anchor >= 0 and anchor != getattr(tokenizer, "unk_token_id", None):
        kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
        head = tokenizer.decode([anchor], **kw)
        both = tokenizer.decode([anchor, i], **kw)
        if both.startswith(head):
            return str(both[len(head) :])
    return str(tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
