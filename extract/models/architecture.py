"""A model's architecture without its weights: its config, its tokenizer when local, and its Linear layers.

The config comes, in order, from a local directory's ``config.json``; the dequantized checkpoint of a GGUF
model (``loading.dequantized_checkpoint``, made once and cached, as extraction does); the local Hugging Face
cache; or the config shipped for each alias in ``extract/configs/<alias>.json`` (the fields of the model's
public ``config.json`` that decide its shapes), so the study's models plan offline. The model is then
built on the ``meta`` device: exact parameter shapes, no memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.arch.moe import LayerExperts
from qcache.extract.models.loading import dequantized_checkpoint
from qcache.extract.models.registry import ALIASES, ModelSource
from qcache.store.errors import BackendUnavailable


@dataclass(frozen=True)
class Linear:
    """One matrix multiply of the model: ``(tokens, n_in) @ (n_in, n_out)``."""

    name: str
    n_in: int
    n_out: int
    quantized: bool  # bitsandbytes replaces it at 8 and 4 bits (the LM head is kept at the compute dtype)
    layer: int | None  # 1-based decoder layer holding it; None outside the decoder stack

    @property
    def numel(self) -> int:
        return self.n_in * self.n_out


@dataclass(frozen=True)
class Architecture:
    """Shapes of a model, as extraction will load it."""

    config_from: str  # where the config was read, for the report
    tokenizer: Any | None  # None when the model's tokenizer is not on this machine
    tokenizer_from: str
    family: str
    n_layers: int
    n_neurons: int  # width of the tap (the MLP's first projection)
    hidden: int
    attn_dim: int  # query heads x head dim
    heads: int
    vocab: int
    linears: tuple[Linear, ...]
    n_params: int  # every parameter once (tied embeddings counted once)
    buffer_bytes: int  # buffers as the model holds them (rotary tables stay float32)
    # the tap structure (extract/arch): array widths per (layer, tap), which taps have a dense array, and
    # the mixture-of-experts layers with their routed experts (3-D weights, not among ``linears``)
    taps: ModelTaps | None = None

    def layer_weights(self, layer: int) -> int:
        """Weights of every Linear in decoder layer ``layer``."""
        return sum(x.numel for x in self.linears if x.layer == layer)

    def tap_consumer_weights(self, layer: int) -> int:
        """Weights of the Linear that reads the tap in ``layer`` (down_proj, fc2, ...)."""
        return sum(x.numel for x in self.linears if x.layer == layer and x.n_in == self.n_neurons)

    @property
    def moe(self) -> dict[int, LayerExperts]:
        return {} if self.taps is None else self.taps.moe

    def expert_weights_per_token(self) -> int:
        """Weights one token goes through in the routed experts of every MoE layer (3-D weights, outside
        ``linears``): ``top_k`` experts of ``hidden x width`` gate, up (gated only) and down matrices each,
        and the router's ``(experts, hidden)`` weight where it is a Parameter rather than a Linear (both occur
        in transformers 5.x; a Linear router is already among ``linears``)."""
        total = 0
        for n, e in self.moe.items():
            linear_router = any(
                x.layer == n and x.n_in == self.hidden and x.n_out == e.n_experts for x in self.linears
            )
            total += self.hidden * (
                e.top_k * e.width * (3 if e.gated else 2) + (0 if linear_router else e.n_experts)
            )
        return total


def shipped_config(alias: str) -> dict[str, Any]:
    """The config shipped for an alias of ``registry.ALIASES``."""
    text = resources.files("qcache.extract").joinpath("configs", f"{alias}.json").read_text()
    return json.loads(text)


def describe_model(source: ModelSource) -> Architecture:
    """Read the config (and tokenizer, when local) of ``source`` and inventory its Linear layers."""
    config, config_from, local = _config(source)
    tokenizer, tokenizer_from = _tokenizer(local)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    taps = ModelTaps(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Architecture(
        config_from=config_from,
        tokenizer=tokenizer,
        tokenizer_from=tokenizer_from,
        family=taps.adapter.family,
        n_layers=taps.n_layers,
        n_neurons=taps.n_neurons,
        hidden=int(config.hidden_size),
        attn_dim=int(config.num_attention_heads) * int(head_dim),
        heads=int(config.num_attention_heads),
        vocab=int(config.vocab_size),
        linears=_linears(model, taps),
        n_params=sum(p.numel() for p in model.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        taps=taps,
    )


def _config(source: ModelSource) -> tuple[Any, str, str | None]:
    """``(config, where it came from, local path or cached Hub id for the tokenizer)``."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if source.gguf_file:
        path = dequantized_checkpoint(source)
        return AutoConfig.from_pretrained(path), f"dequantized GGUF checkpoint {path}", str(path)
    if Path(source.source).is_dir():
        return AutoConfig.from_pretrained(source.source), f"{source.source}/config.json", source.source
    try:
        config = AutoConfig.from_pretrained(source.source, local_files_only=True)
        return config, f"Hugging Face cache ({source.source})", source.source
    except (OSError, ValueError):
        pass
    if source.key in ALIASES:
        fields = shipped_config(source.key)
        config = CONFIG_MAPPING[fields["model_type"]](**fields)
        return config, f"shipped config qcache/extract/configs/{source.key}.json", None
    raise BackendUnavailable(
        f"no config for model {source.source} on this machine (not in the Hugging Face cache, no network): "
        "download it first, pass a local directory, or use an alias (see `qcache models`)"
    )


def _tokenizer(local: str | None) -> tuple[Any | None, str]:
    if local is None:
        return None, "not on this machine"
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local, local_files_only=True), local
    except (OSError, ValueError):
        return None, "not on this machine"


def _linears(model: nn.Module, taps: ModelTaps) -> tuple[Linear, ...]:
    """Every Linear (and GPT-2 Conv1D) and whether bitsandbytes would quantize it."""
    skip = _not_converted(model)
    prefix = taps.adapter.layers + "."
    out = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if type(module) is nn.Linear:
            n_in, n_out = module.in_features, module.out_features
        elif kind == "Conv1D":  # GPT-2: weight is (in, out)
            n_in, n_out = module.weight.shape
        else:
            continue
        layer = int(name[len(prefix) :].split(".")[0]) + 1 if name.startswith(prefix) else None
        out.append(Linear(name, int(n_in), int(n_out), _converts(name, skip), layer))
    return tuple(out)


def _not_converted(model: Any) -> list[str]:  # a transformers PreTrainedModel
    """Module names transformers' bitsandbytes integration leaves unquantized (LM head, tied weights)."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return list(get_keys_to_not_convert(model)) + keep
    except ImportError:  # other transformers versions: the LM head is what they all skip
        head = model.get_output_embeddings()
        return [n for n, m in model.named_modules() if m is head] + keep


def _converts(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return bool(should_convert_module(name, skip))
    except ImportError:
        return not any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in skip)
