"""Architecture adapters: where each decoder layer's post-activation MLP output lives.

The paper's tap point is the output of the MLP's first projection after its activation function. For
gated MLPs (Llama, Mistral, Qwen) that is ``act_fn(gate_proj(x))``; the input of the down projection,
``act_fn(gate_proj(x)) * up_proj(x)``, is offered as a second tap (``down-in``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcache.store.errors import InvalidName, InvalidOption


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family."""

    family: str
    layers: str  # path from the model root to the ModuleList of decoder layers
    act: str  # path inside a layer to the activation module
    down: str | None  # path inside a layer to the down projection (gated MLPs only)
    activation_attr: str  # config attribute naming the activation function
    flattens_tokens: bool = False  # the MLP sees (batch*tokens, hidden), e.g. OPT


_GATED = dict(layers="model.layers", act="mlp.act_fn", down="mlp.down_proj", activation_attr="hidden_act")
ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_GATED),
    "mistral": Adapter("mistral", **_GATED),
    "qwen2": Adapter("qwen2", **_GATED),
    "qwen3": Adapter("qwen3", **_GATED),
    "phi": Adapter("phi", "model.layers", "mlp.activation_fn", None, "hidden_act"),
    "opt": Adapter("opt", "model.decoder.layers", "activation_fn", None, "activation_function", True),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers", "mlp.act", None, "hidden_act"),
    "gpt2": Adapter("gpt2", "transformer.h", "mlp.act", None, "activation_function"),
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise InvalidName(
            f"architecture {model_type!r} has no qcache adapter (supported: {', '.join(sorted(ADAPTERS))}); "
            "add one in qcache/extract/adapters.py"
        )
    return ADAPTERS[model_type]


@dataclass(frozen=True)
class TapPoint:
    """One hooked module of one layer; ``kind`` is ``act`` (forward output) or ``down-in`` (input)."""

    layer: int  # 1-based, as in the paper
    tap: str
    module: nn.Module


class ModelTaps:
    """The decoder layers of a loaded model and their tap modules."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.decoder_layers: nn.ModuleList = model.get_submodule(self.adapter.layers)
        cfg = model.config
        self.activation = str(getattr(cfg, self.adapter.activation_attr, "unknown"))
        self.n_neurons = self._n_neurons(cfg)

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    def _act(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer - 1].get_submodule(self.adapter.act)

    @staticmethod
    def _n_neurons(cfg: object) -> int:
        for attr in ("intermediate_size", "ffn_dim", "n_inner"):
            value = getattr(cfg, attr, None)
            if value:
                return int(value)
        return 4 * int(cfg.hidden_size)  # type: ignore[attr-defined]  # GPT-2 with n_inner=None

    def tap(self, layer: int, tap: str) -> TapPoint:
        if tap == "act":
            return TapPoint(layer, tap, self._act(layer))
        if tap == "down-in":
            if self.adapter.down is None:
                raise InvalidOption(
                    f"--tap down-in needs a gated MLP; {self.adapter.family} has none: use --tap act"
                )
            return TapPoint(layer, tap, self.decoder_layers[layer - 1].get_submodule(self.adapter.down))
        raise InvalidOption(f"unknown tap {tap!r}: use act or down-in")

    def as_tokens(self, t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """Restore ``(batch, tokens, neurons)`` where the architecture flattened it."""
        return t.reshape(batch, seq, t.shape[-1]) if t.dim() == 2 else t


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``paper`` -> [1, 15, L] (the authors' choice for every model), ``all``, or ``1,15,32``.

    >>> parse_layers("paper", 30)
    [1, 15, 30]
    """
    spec = spec.strip().lower()
    if spec == "paper":
        return sorted({1, min(15, n_layers), n_layers})
    if spec == "all":
        return list(range(1, n_layers + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise InvalidOption(f"--layers {spec!r} is not 'paper', 'all' or a comma list like 1,15,32") from None
    if not layers:
        raise InvalidOption("--layers is empty: use 'paper', 'all' or a comma list like 1,15,32")
    bad = [n for n in layers if not 1 <= n <= n_layers]
    if bad:
        raise InvalidOption(
            f"layer(s) {bad} outside 1..{n_layers} for this model: layers are numbered from 1"
        )
    return layers
