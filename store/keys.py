"""Run keys: (dataset, model, quant) and the names that are safe to use as store paths."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from .errors import InvalidName, InvalidOption

# The paper's four quantizations (listed first); any method of `qcache methods` also names runs: its key is
# the method's name and its non-default settings, e.g. bf16, fp4, int8-t4.0, hqq4-g64, gguf-q4_0.
QUANTS = ("fp32", "fp16", "int8", "nf4")
BITS_TO_QUANT = {32: "fp32", 16: "fp16", 8: "int8", 4: "nf4"}
TAPS = ("act", "down-in", "resid")
# Array name inside a layer group for each tap point (resid: the decoder layer's output hidden state,
# hidden-size wide; the others are MLP-width).
TAP_ARRAYS = {"act": "activations", "down-in": "down_in", "resid": "resid"}
ATTRIBUTIONS = "attributions"

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_QUANT = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")  # lower case: one key per method and settings


def safe_name(value: str, what: str) -> str:
    """Return ``value`` if it can be one path component of the store, else raise ``InvalidName``.

    >>> safe_name("llama2-7b", "model")
    'llama2-7b'
    """
    if not _SAFE.match(value) or ".." in value:
        raise InvalidName(
            f"{what} name {value!r} cannot be a store key: use letters, digits, '.', '_', '+', '-' "
            "(no '/', no '..', at most 128 characters)"
        )
    return value


def key_for_source(source: str) -> str:
    """A store-safe key for a model id or path: its parts joined by ``--``, ``.``/``..`` parts dropped.

    >>> key_for_source("meta-llama/Llama-2-7b-hf")
    'meta-llama--Llama-2-7b-hf'
    """
    parts = [re.sub(r"[^A-Za-z0-9._+-]+", "-", p) for p in re.split(r"[/\\]+", source)]
    parts = [p.strip("-.") for p in parts if p not in ("", ".", "..")]
    key = "--".join(p for p in parts if p) or "model"
    key = re.sub(r"\.{2,}", ".", key)[-128:].lstrip("-.") or "model"
    return safe_name(key, "model")


@dataclass(frozen=True, order=True)
class RunKey:
    """Address of one extraction run in a store."""

    dataset: str
    model: str
    quant: str

    def __post_init__(self) -> None:
        safe_name(self.dataset, "dataset")
        safe_name(self.model, "model")
        # no "--": it separates the parts of table file names (tables.part_name)
        if not _QUANT.match(self.quant) or ".." in self.quant or "--" in self.quant:
            raise InvalidName(
                f"quant {self.quant!r} cannot be a store key: use a method key such as "
                f"{', '.join(QUANTS)} or another of `qcache methods` (lower case letters, digits, '.', '_', "
                "'+', '-')"
            )

    @property
    def path(self) -> str:
        return f"runs/{self.dataset}/{self.model}/{self.quant}"

    def __str__(self) -> str:
        return f"{self.dataset}/{self.model}/{self.quant}"

    @classmethod
    def parse(cls, text: str) -> RunKey:
        parts = text.strip("/").split("/")
        if len(parts) != 3:
            raise InvalidName(f"run key {text!r} must be DATASET/MODEL/QUANT, e.g. boolq/smollm2-135m/nf4")
        return cls(*parts)


def layer_name(layer: int) -> str:
    """Group name of a 1-based layer number (zero-padded so listings sort)."""
    return f"L{check_layer(layer):03d}"


def check_layer(layer: object) -> int:
    """``layer`` as an int, or ``InvalidOption`` naming it with ``repr`` when it is not an integer (a bool,
    a float such as ``15.0`` or a string such as ``'15'`` are refused, not silently taken for a layer)."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise InvalidOption(
            f"layer must be an int (1-based, as in run.layers), got {layer!r} of type {type(layer).__name__}"
        )
    return int(layer)


# Mixture-of-experts layers (docs/store.md): one group per expert, and the routing
ROUTER_IDS, ROUTER_WEIGHTS = "topk_ids", "topk_weights"


def expert_array_path(layer: int, expert: int, tap: str) -> str:
    """``layers/L{layer:03d}/experts/E{expert:03d}/<tap's array>``: one expert's ``(token, neuron)`` tap."""
    return f"layers/{layer_name(layer)}/experts/E{int(expert):03d}/{TAP_ARRAYS[tap]}"


def router_array_path(layer: int, which: str) -> str:
    """``layers/L{layer:03d}/router/<which>``, ``which`` one of ``ROUTER_IDS``, ``ROUTER_WEIGHTS``."""
    return f"layers/{layer_name(layer)}/router/{which}"
