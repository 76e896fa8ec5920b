"""Tap points of a loaded model: where each decoder layer's MLP activation, down-projection input and
output hidden state live.

The paper's tap point (``act``) is the output of the MLP's activation module. For gated MLPs (Llama,
Mistral, Qwen, Gemma) that is ``act_fn(gate_proj(x))``; the input of the down projection,
``act_fn(gate_proj(x)) * up_proj(x)`` (TransformerLens's ``mlp.hook_post``), is the ``down-in`` tap; the
decoder layer's output hidden state (TransformerLens's ``hook_resid_post``) is the ``resid`` tap. The
module paths are found from the model's structure (``extract/arch``), not from a table of names, and
checked on one probe forward once weights are loaded.

A mixture-of-experts layer (``extract/arch/moe.py``) has the ``act`` and ``down-in`` taps per expert: its
experts module is hooked and each routed token's values are recomputed there (``experts.py``); its shared
expert, if any, is its ordinary dense tap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcache.extract.arch import Structure, discover, probe
from qcache.extract.arch.moe import LayerExperts
from qcache.store.errors import InvalidOption

TAPS = ("act", "down-in", "resid")


@dataclass(frozen=True)
class Adapter:
    """Module paths of a model, as discovered (the first layer with an MLP stands for all of them)."""

    family: str  # the config's model_type
    layers: str  # path from the model root to the ModuleList of decoder layers
    act: str | None  # path inside a layer to the activation module (None: applied as a function)
    down: str  # path inside a layer to the down projection
    flattens_tokens: bool = False  # the MLP sees (batch*tokens, hidden), e.g. OPT


@dataclass(frozen=True)
class TapPoint:
    """One hooked module of one layer; ``output`` says whether its output (else its input) is the tap."""

    layer: int  # 1-based, as in the paper
    tap: str
    module: nn.Module
    output: bool = True


class ModelTaps:
    """The decoder layers of a model and their tap modules.

    ``probe`` (default: when the weights are real, not on the meta device) runs one short forward to
    confirm the discovered structure. Raises ``InvalidName`` when the model has no decoder stack or no
    tappable MLP, or the probe disagrees (see ``extract/arch``).
    """

    def __init__(self, model: nn.Module, *, probe_forward: bool | None = None) -> None:
        self.model = model
        self.structure: Structure = discover(model)
        if self.moe and hasattr(model, "set_experts_implementation"):
            # transformers runs fused experts through grouped_mm / batched_mm kernels by default; the eager
            # loop is the one whose ops experts.py repeats, so the per-expert values qcache recomputes are
            # the model's own bit for bit (other kernels round the same products differently)
            model.set_experts_implementation("eager")
        if probe_forward is None:
            probe_forward = next(model.parameters()).device.type != "meta"
        if probe_forward:
            probe(model, self.structure)
        self.decoder_layers: nn.ModuleList = model.get_submodule(self.structure.layers_path)
        dense = [t for t in self.structure.layers if t.mlp is not None]
        if dense:
            first = dense[0].mlp
            assert first is not None
            self.adapter = Adapter(
                self.structure.model_type, self.structure.layers_path, first.act, first.down, first.flat
            )
            self.activation = self._activation_name(model.config, dense[0].index - 1, first.act)
            self.n_neurons = first.width
        else:  # every layer is mixture-of-experts without a shared expert: an expert's width stands in
            experts = next(iter(self.moe.values()))
            self.adapter = Adapter(
                self.structure.model_type, self.structure.layers_path, None, experts.module
            )
            self.activation = self._activation_name(model.config, 0, None)
            self.n_neurons = experts.width
        self.hidden = self.structure.hidden

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def moe(self) -> dict[int, LayerExperts]:
        """The tappable mixture-of-experts layers (1-based) and their experts."""
        return {t.index: t.experts for t in self.structure.layers if t.experts is not None}

    def experts_module(self, layer: int) -> nn.Module:
        """The fused experts module of MoE ``layer`` (1-based)."""
        info = self.structure.layers[layer - 1]
        assert info.experts is not None, f"layer {layer} is not mixture-of-experts"
        return self.model.get_submodule(f"{info.path}.{info.experts.module}")

    def _activation_name(self, cfg: object, index: int, act: str | None) -> str:
        # the config names the function (hidden_act: Llama family; activation_function: GPT-2, OPT)
        for attr in ("hidden_act", "activation_function", "hidden_activation"):
            value = getattr(cfg, attr, None)
            if isinstance(value, str):
                return value
        if act is not None:
            return type(self.decoder_layers[index].get_submodule(act)).__name__
        return "unknown"

    def width(self, layer: int, tap: str) -> int:
        """Columns of ``tap``'s array at ``layer``: the MLP width, or the hidden size for ``resid``."""
        if tap == "resid":
            return self.hidden
        mlp = self.structure.layers[layer - 1].mlp
        return self.n_neurons if mlp is None else mlp.width

    def has_dense(self, layer: int, tap: str) -> bool:
        """Whether ``tap`` at ``layer`` has a dense ``(token, width)`` array: always, except ``act`` and
        ``down-in`` of an MoE layer without a shared expert (stored per expert only)."""
        info = self.structure.layers[layer - 1]
        return tap == "resid" or info.experts is None or info.mlp is not None

    def tap(self, layer: int, tap: str) -> TapPoint | None:
        """The module hooked for ``tap`` at ``layer``; ``InvalidOption`` when the model has none there.

        At a mixture-of-experts layer ``act`` and ``down-in`` are taken per expert (``hooks.py`` hooks the
        experts module); the point returned is the shared expert's dense one, None when there is none.
        """
        if tap not in TAPS:
            raise InvalidOption(f"unknown tap {tap!r}: use one of {', '.join(TAPS)}")
        info = self.structure.layers[layer - 1]
        block = self.decoder_layers[layer - 1]
        if tap == "resid":
            return TapPoint(layer, tap, block)
        family = self.structure.model_type
        if info.experts is not None:
            reason = info.experts.act_reason if tap == "act" else info.experts.down_reason
            if reason is not None:
                other = "down-in (the down projection's input)" if tap == "act" else "act"
                raise InvalidOption(
                    f"--tap {tap} is not available at layer {layer} of {family}: {reason}; use --tap {other}"
                )
            if info.mlp is None:
                return None
        if info.mlp is None:
            raise InvalidOption(
                f"--tap {tap} is not available at layer {layer} of {family}: {info.no_mlp}; "
                "use --tap resid or other --layers"
            )
        mlp = info.mlp
        if tap == "act":
            if mlp.act is None:
                reason = mlp.act_reason or f"the probe found no activation module in {info.path}"
                raise InvalidOption(
                    f"--tap act is not available for {family}: {reason}; use --tap down-in (the down "
                    "projection's input)"
                )
            return TapPoint(layer, tap, block.get_submodule(mlp.act))
        # unconfirmed (the meta device, before weights load): refused from the structure when the block has
        # one activation module of its own; if the probe later finds it is not the activation, everything
        # is refused anyway. One instance shared by the layers (OpenAI GPT) leaves down-in as the only tap.
        if mlp.kind == "plain" and mlp.act is not None and (mlp.confirmed or self._own_act(layer)):
            raise InvalidOption(
                f"--tap down-in needs a gated MLP; {family} has none (its down projection reads the "
                "activation output itself): use --tap act"
            )
        return TapPoint(layer, tap, block.get_submodule(mlp.down), output=False)

    def _own_act(self, layer: int) -> bool:
        """Whether ``layer``'s MLP has a single activation candidate that no other decoder layer shares."""
        mlp = self.structure.layers[layer - 1].mlp
        if mlp is None or mlp.act is None or len(mlp.candidates) != 1 or mlp.alternatives:
            return False
        mine = self.decoder_layers[layer - 1].get_submodule(mlp.act)
        for i, block in enumerate(self.decoder_layers):
            if i != layer - 1 and any(m is mine for m in block.modules()):
                return False
        return True

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
