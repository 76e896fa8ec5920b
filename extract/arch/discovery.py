"""Where the taps of a decoder-only model are, found from its module structure (no weights needed).

For each decoder layer we look for its feed-forward block the way its modeling code builds it, without
a table of module names:

* the decoder layers are the ``nn.ModuleList`` with ``num_hidden_layers`` items holding the most
  parameters (the text stack, not a vision tower);
* the down (out) projection is a Linear (or GPT-2 ``Conv1D``) of the layer mapping a width ``W`` to the
  hidden size, whose parent module (the MLP block; the layer itself for OPT-style layers) has, as direct
  children, only Linears reading the hidden size: two of width ``W`` (gated, ``act(gate) * up``), one of
  width ``W`` (plain, ``act(fc_in)``) or one of width ``2W`` (fused, phi3's ``gate_up_proj``, whose
  activation sees one half), and is not an attention module;
* the activation candidates are the leaf modules among that block's children that are not Linears,
  dropout or norms. Which one is the activation, and which Linear is the gate, is not guessed from names: the
  probe (``probe.py``) settles it on one forward pass, or the ``act`` tap is refused. When the MLP width
  equals the hidden size every Linear of the block maps hidden -> hidden and each could be the down
  projection: each reading is kept (``LayerMLP.alternatives``) and the probe keeps the one it confirms.

Works on the ``meta`` device, so an unsupported model is refused from its config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qcache.store.errors import InvalidName

from .moe import LayerExperts, find_experts


@dataclass
class LayerMLP:
    """The feed-forward block of one decoder layer; paths are relative to the layer module.

    ``kind`` is ``gated``, ``plain`` or ``fused``; ``act`` is None when the activation is applied as a
    function (``act_reason`` says why), else the path of the activation module, confirmed by the probe
    when weights are loaded (before that, ``candidates`` lists what it may be).
    """

    block: str  # "" when the Linears are direct children of the layer (OPT, XGLM, BioGPT)
    down: str
    ups: tuple[str, ...]  # the Linears reading the hidden size: (fc_in,), (gate, up) or (gate_up,)
    kind: str
    width: int  # W: the down projection's input width, the tap's number of neurons
    candidates: tuple[str, ...]  # parameter-free leaf modules of the block: activation candidates
    act: str | None = None
    act_reason: str | None = None
    gate: str | None = None  # for gated MLPs, the Linear whose output the activation reads (from the probe)
    confirmed: bool = False  # the probe checked it on a forward pass
    flat: bool = False  # the MLP sees (batch*tokens, width), e.g. OPT (from the probe)
    # other readings of the same block when several of its Linears could be the down projection (an MLP
    # whose width equals the hidden size: every Linear maps hidden -> hidden); the probe keeps the one
    # the forward confirms
    alternatives: tuple[LayerMLP, ...] = ()


@dataclass
class LayerTaps:
    """One decoder layer: its path from the model root, its dense MLP and its routed experts.

    A mixture-of-experts layer has ``experts``; its ``mlp``, if any, is its shared expert (a dense MLP
    every token goes through, e.g. Qwen2-MoE's ``shared_expert``).
    """

    index: int  # 1-based
    path: str
    mlp: LayerMLP | None
    no_mlp: str | None = None  # the reason when ``mlp`` is None (refused experts, no feed-forward)
    experts: LayerExperts | None = None


@dataclass
class Structure:
    """The decoder layers of a model and their taps."""

    model_type: str
    layers_path: str
    hidden: int
    layers: list[LayerTaps] = field(default_factory=list)


def text_config(config: object) -> object:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(n_in, n_out)`` of a Linear (bitsandbytes' included), hqq's ``HQQLinear`` or a GPT-2 ``Conv1D``;
    None otherwise."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "HQQLinear":
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":  # weight is (in, out)
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of ``n_layers`` decoder layers holding the most parameters (ties: shortest path)."""
    found = []
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) == n_layers:
            size = sum(p.numel() for p in module.parameters())
            found.append((-size, len(name), name, module))
    if not found:
        raise InvalidName(
            f"architecture {model.config.model_type!r} has no list of {n_layers} decoder layers "
            "(num_hidden_layers) that qcache can find: it is not a decoder-only stack qcache supports"
        )
    _, _, name, module = min(found, key=lambda x: x[:3])
    return name, module


def _is_attention(module: nn.Module) -> bool:
    # Every attention class of transformers carries "Attention" in its class name; an attention block
    # with fused qkv plus an output projection can otherwise look like a plain MLP.
    return "Attention" in type(module).__name__


def _candidates(block: nn.Module) -> tuple[str, ...]:
    """Leaf children of ``block`` that may be its activation: not a Linear, dropout, identity or norm.

    Parameters are allowed (xIELU, some gated units learn theirs); the probe decides.
    """
    out = []
    for name, child in block.named_children():
        if isinstance(child, (nn.Dropout, nn.Identity, nn.Embedding)) or linear_shape(child) is not None:
            continue
        if any(True for _ in child.children()) or "Norm" in type(child).__name__:
            continue
        out.append(name)
    return tuple(out)


def _weighted_others(layer: nn.Module, mlp: LayerMLP) -> int:
    """Children of the MLP block, other than its Linears, that hold weights."""
    block = layer.get_submodule(mlp.block) if mlp.block else layer
    linears = {mlp.down, *mlp.ups}
    prefix = mlp.block + "." if mlp.block else ""
    return sum(
        1
        for name, child in block.named_children()
        if prefix + name not in linears and any(True for _ in child.parameters())
    )


def find_mlp(layer: nn.Module, hidden: int) -> LayerMLP | None:
    """The feed-forward block of ``layer`` (see the module docstring), or None when there is none."""
    modules = dict(layer.named_modules())
    found = []
    for name, module in modules.items():
        shape = linear_shape(module)
        if shape is None or shape[1] != hidden:
            continue
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        if _is_attention(parent):
            continue
        width = shape[0]
        others = {
            n: linear_shape(c) for n, c in parent.named_children() if c is not module and linear_shape(c)
        }
        reading = {n: s for n, s in others.items() if s[0] == hidden}
        if len(reading) != len(others):
            continue
        outs = sorted(s[1] for s in reading.values())
        if outs == [width, width]:
            kind = "gated"
        elif outs == [width]:
            kind = "plain"
        elif outs == [2 * width]:
            kind = "fused"
        else:
            continue
        prefix = parent_name + "." if parent_name else ""
        found.append(
            LayerMLP(
                block=parent_name,
                down=name,
                ups=tuple(prefix + n for n in reading),
                kind=kind,
                width=width,
                candidates=tuple(prefix + n for n in _candidates(parent)),
            )
        )
    if not found:
        return None
    # an MLP block with an activation module beats one without (e.g. a plain-looking attention block),
    # and one whose other children hold no weights beats a recurrent block with Linears around a
    # convolution or recurrence (RecurrentGemma's temporal block)
    found.sort(key=lambda m: (not m.candidates, _weighted_others(layer, m), m.block.count(".")))
    mlp = found[0]
    mlp.alternatives = tuple(m for m in found[1:] if m.block == mlp.block)
    for m in (mlp, *mlp.alternatives):
        _guess_act(m)
    return mlp


def _guess_act(mlp: LayerMLP) -> None:
    """The activation before the probe: the block's only candidate, if it has one."""
    if len(mlp.candidates) == 1:  # a guess until the probe confirms it
        mlp.act = mlp.candidates[0]
    if not mlp.candidates:
        mlp.act_reason = (
            f"its MLP ({mlp.block or 'the layer'}) applies the activation as a function, not a module, "
            "so it cannot be hooked"
        )


def _stray_down(layer: nn.Module, hidden: int) -> str | None:
    """A Linear of ``layer`` mapping to the hidden size inside a block of Linears only (no attention, no
    convolution or recurrence weights: a Mamba mixer's out_proj is not one), or None. Beside fused experts,
    which hold no Linears, such a block can only be a shared expert."""
    modules = dict(layer.named_modules())
    for name, module in modules.items():
        shape = linear_shape(module)
        if shape is None or shape[1] != hidden:
            continue
        parent = modules[name.rpartition(".")[0]]
        if _is_attention(parent) or any(True for _ in parent.parameters(recurse=False)):
            continue
        weighted = [c for c in parent.children() if any(True for _ in c.parameters())]
        if all(linear_shape(c) is not None for c in weighted):
            return name
    return None


def discover(model: nn.Module) -> Structure:
    """The decoder layers of ``model`` (real or on the meta device) and the MLP of each.

    Raises ``InvalidName`` when there is no decoder stack, or no layer has a feed-forward block or
    experts qcache can tap (a refused mixture-of-experts model gets the reason ``moe.py`` gives).
    """
    cfg = text_config(model.config)
    n_layers = int(cfg.num_hidden_layers)
    hidden = int(cfg.hidden_size)
    path, layers = find_layers(model, n_layers)
    structure = Structure(str(model.config.model_type), path, hidden)
    for i, layer in enumerate(layers):
        experts, refused = find_experts(layer, f"{path}.{i}", hidden, cfg)
        # an MoE layer's dense MLP, if any, is its shared expert
        mlp = None if refused else find_mlp(layer, hidden)
        if experts is not None and mlp is None and (stray := _stray_down(layer, hidden)) is not None:
            # a shared expert qcache cannot recognise would silently go untapped: refuse the layer
            experts, refused = (
                None,
                (
                    f"{path}.{i} is a mixture-of-experts layer with a dense block beside its experts that "
                    f"qcache cannot recognise as an MLP ({path}.{i}.{stray} maps to the hidden size)"
                ),
            )
        if experts is not None:
            reason = None if mlp else f"{path}.{i} is a mixture-of-experts layer without a shared expert"
        else:
            reason = refused or (None if mlp else f"no feed-forward block found in {path}.{i}")
        structure.layers.append(LayerTaps(i + 1, f"{path}.{i}", mlp, reason, experts))
    if all(t.mlp is None and t.experts is None for t in structure.layers):
        raise InvalidName(
            f"architecture {structure.model_type!r} is not supported by qcache: {structure.layers[0].no_mlp}"
        )
    return structure
