"""The quantization methods qcache knows, and run keys to methods and back.

``--bits 32|16|8|4`` is the paper's shorthand for ``fp32``, ``fp16``, ``int8`` (LLM.int8) and ``nf4``;
``--quant`` names any method or a full run key (``int8-t4.0``). Importing this module imports no torch.
"""

from __future__ import annotations

import functools
from typing import Any

from qcache.store.errors import InvalidOption
from qcache.store.keys import BITS_TO_QUANT

from . import ao, bnb, fp8_emulation, gguf_emulation, halfquadratic, native
from .method import Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *native.METHODS,
        *bnb.METHODS,
        *ao.METHODS,
        *halfquadratic.METHODS,
        *gguf_emulation.METHODS,
        *fp8_emulation.METHODS,
    )
}
# Setting name -> its command-line option (the options `qcache extract` and `qcache plan` take).
OPTIONS = {s.name: s.option for m in METHODS.values() for s in m.options}


def all_methods() -> list[Method]:
    """Every method at its default settings, in listing order."""
    return list(METHODS.values())


def for_bits(bits: int) -> Method:
    """The paper's method of ``--bits``; ``InvalidOption`` for other widths."""
    if bits not in BITS_TO_QUANT:
        raise InvalidOption(f"--bits {bits} is not supported: use 32, 16, 8 (LLM.int8) or 4 (NF4)")
    return METHODS[BITS_TO_QUANT[bits]]


@functools.lru_cache(maxsize=256)
def parse_key(text: str) -> Method:
    """The method a run key component names (``nf4``, ``int8-t4.0``, ``hqq4-g64``); ``InvalidOption``
    when no method has that name, a token is not one of its settings, or the key is not spelled the
    one way ``Method.key`` spells it."""
    base, values = _spelled(text)
    resolved = METHODS[base].with_settings(**values)
    if resolved.key != text:
        raise InvalidOption(f"quantization key {text!r} is spelled {resolved.key!r}: use that")
    return resolved


def _spelled(text: str) -> tuple[str, dict[str, Any]]:
    """The method name ``text`` starts with, and the settings its ``-`` tokens spell."""
    base = max((n for n in METHODS if text == n or text.startswith(n + "-")), key=len, default=None)
    if base is None:
        raise InvalidOption(
            f"quantization method {text!r} is unknown: use one of {', '.join(METHODS)} (see `qcache methods`)"
        )
    method = METHODS[base]
    values: dict[str, Any] = {}
    for token in text[len(base) :].split("-")[1:]:
        matches = [(s, s.parse(token)) for s in method.options if s.parse(token) is not None]
        if not matches or matches[0][0].name in values:
            raise InvalidOption(
                f"{text!r}: {token!r} is not a setting of {base} "
                f"({method.option_names()}; see `qcache methods`)"
            )
        values[matches[0][0].name] = matches[0][1]
    return base, values


def resolve(quant: str | None, bits: int | None, given: dict[str, Any] | None = None) -> Method:
    """The method of ``--quant`` (a name or run key) or ``--bits`` (not both; neither: fp16) with the
    ``given`` settings (name -> value, only those given on the command line).

    Raises ``InvalidOption`` for both ``quant`` and ``bits``, for a setting the method does not take, and
    for a setting that contradicts the one ``quant``'s key already spells.
    """
    if quant is not None and bits is not None:
        raise InvalidOption(
            f"--quant {quant!r} and --bits {bits} are exclusive: --bits 32/16/8/4 is shorthand for "
            "--quant fp32/fp16/int8/nf4; give one"
        )
    text = None if quant is None else quant.strip().lower()
    if text is None:
        method = for_bits(16 if bits is None else bits)
    else:  # a method's name (its defaults) or a full key
        method = METHODS[text] if text in METHODS else parse_key(text)
    in_key = _spelled(text)[1] if text is not None else {}
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for name, value in given.items():
        setting = next((s for s in method.options if s.name == name), None)
        if setting is None:
            raise InvalidOption(
                f"{OPTIONS.get(name, name)} does not apply to {method.name} ({method.peer}): it takes "
                f"{method.option_names()}"
            )
        if name in in_key and in_key[name] != setting.check(value, method.name):
            raise InvalidOption(
                f"--quant {quant!r} already sets {setting.option.split('/')[0]} to {in_key[name]!r}, "
                f"not {value!r}: give it one way"
            )
    return method.with_settings(**given)


def listing(device: str = "auto") -> list[dict[str, Any]]:
    """One row per method for ``qcache methods``: key at its defaults, bits, kind, kernel, peer name,
    settings options, whether Integrated Gradients can run, and ``available`` (None) or why not on
    ``device`` (cpu, cuda, or auto: cuda when a GPU is visible, else cpu)."""
    where = device.split(":")[0]
    if where == "auto":
        try:
            import torch

            where = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            where = "cpu"
    return [
        {
            "method": m.name,
            "key": m.key,
            "bits": m.bits,
            "kind": m.kind,
            "kernel": m.kernel,
            "peer": m.peer,
            "library": m.library,
            "options": [s.option for s in m.options],
            "compute_dtype": m.compute_dtype,
            "gradients": m.gradients,
            "device": where,
            "unavailable": m.available(where),
        }
        for m in all_methods()
    ]
