"""Confirm the structure ``discovery.py`` found with one forward pass on a few tokens.

For each layer's MLP the probe records the down projection's input ``d``, the outputs of the Linears
reading the hidden size and the input/output of each activation candidate ``a``, then requires:

* plain  (``act(fc_in)``):        ``d == a(fc_in(x))``, i.e. ``d == a_out`` and ``a_in == fc_in_out``;
* gated  (``act(gate) * up``):    ``a_in == gate_out`` and ``d == a_out * up_out``;
* fused  (phi3's ``gate_up``):    ``a_in`` is one contiguous half of ``gate_up_out`` and
  ``d == a_out * other half``.

Each hooked module must run exactly once per forward. For a mixture-of-experts layer the experts module's
inputs (hidden states, top-k ids and weights) and output are recorded, and the per-expert down-projection
inputs qcache recomputes (``experts.py``), through the down weights and the routing weights, must add up
to that output, or the layer is refused naming the module. A candidate that fits becomes the ``act`` tap; when
a layer had candidates and none fits, extraction is refused naming the module paths tried (a silent wrong
tap is worse than none). Tolerance: the relation is the same floating-point product the model computes,
so it holds to rounding (relative 1e-3 of the largest value, loose enough for float16 and bitsandbytes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qcache.store.errors import InvalidName

from .discovery import LayerMLP, LayerTaps, Structure
from .experts import expert_values, reconstruct, routing_inputs

N_TOKENS = 8
# what a refusal says: qcache keeps no per-architecture adapters, it finds the taps from the structure
UNSUPPORTED = "its taps are found from the module structure and confirmed on one forward, which failed here"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to rounding where finite, and non-finite at the same places (a model with inf weights)."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return False
    if not finite.any():
        return True
    a, b = a[finite], b[finite]
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return bool((a - b).abs().max() <= 1e-3 * scale)


class _Recorder:
    """Inputs and outputs of hooked modules on one forward, and how often each ran."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.routing: dict[str, tuple[torch.Tensor, ...]] = {}
        self.handles: list[Any] = []

    def watch(self, path: str, module: nn.Module) -> None:
        def hook(_m: nn.Module, args: tuple, out: Any) -> None:
            self.calls[path] = self.calls.get(path, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                self.inputs[path] = args[0].detach()
            if isinstance(out, torch.Tensor):
                self.outputs[path] = out.detach()

        self.handles.append(module.register_forward_hook(hook))

    def watch_experts(self, path: str, module: nn.Module) -> None:
        """Record the routing inputs and the output of an experts module (``experts.py``)."""

        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.calls[path] = self.calls.get(path, 0) + 1
            self.routing[path] = tuple(t.detach() for t in routing_inputs(m, args, kwargs))
            if isinstance(out, torch.Tensor):
                self.outputs[path] = out.detach()

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def probe(model: nn.Module, structure: Structure) -> None:
    """Run one forward of ``N_TOKENS`` tokens and settle each layer's ``act`` and ``gate`` in place.

    Raises ``InvalidName`` naming the module paths tried when a layer's structure does not hold.
    """
    layers = [t for t in structure.layers if t.mlp is not None and (t.mlp.candidates or t.mlp.alternatives)]
    moe = [t for t in structure.layers if t.experts is not None]
    if not layers and not moe:
        for t in structure.layers:
            if t.mlp is not None:
                t.mlp.confirmed = True
        return
    rec = _Recorder()
    for t in moe:
        rec.watch_experts(f"{t.path}.{t.experts.module}", model.get_submodule(f"{t.path}.{t.experts.module}"))
    for t in layers:
        mlp = t.mlp
        assert mlp is not None
        watched = {rel for m in (mlp, *mlp.alternatives) for rel in (m.down, *m.ups, *m.candidates)}
        if mlp.alternatives and mlp.block:
            watched.add(mlp.block)  # its input: what the up projections read, and the down one does not
        for rel in sorted(watched):
            rec.watch(f"{t.path}.{rel}", model.get_submodule(f"{t.path}.{rel}"))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    device = model.get_input_embeddings().weight.device
    ids = (torch.arange(N_TOKENS, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)  # (1, tokens)
    # the base model (no LM head): cheaper, and hooks a caller put on the full model see no extra forward
    body = getattr(model, "base_model", None) or model
    try:
        with torch.inference_mode():
            body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InvalidName(
            f"the probe forward of {structure.model_type!r} ({N_TOKENS} tokens, to confirm its MLP "
            f"structure) failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    finally:
        rec.remove()
    for t in layers:
        _settle(t.path, t.mlp, rec)  # type: ignore[arg-type]
    for t in moe:
        _settle_experts(model, t, rec)
    for t in structure.layers:
        if t.mlp is not None:
            t.mlp.confirmed = True


def _settle(path: str, mlp: LayerMLP, rec: _Recorder) -> None:
    """Settle ``mlp`` (``act``, ``gate``, ``flat``) from the probe forward, trying each reading of its block
    (``mlp.alternatives``: which Linear is the down projection) in turn and keeping the first that holds.

    Raises ``InvalidName`` naming the module paths when none holds."""
    options = (mlp, *mlp.alternatives)
    for option in options:
        if _settle_one(path, option, rec, single=len(options) == 1):
            if option is not mlp:
                for name in ("down", "ups", "kind", "width", "act", "act_reason", "gate", "flat"):
                    setattr(mlp, name, getattr(option, name))
            mlp.alternatives = ()
            return
    where = f"{path}{'.' + mlp.block if mlp.block else ''}"
    if len(options) > 1:
        downs = ", ".join(f"{path}.{m.down}" for m in options)
        raise InvalidName(
            f"the probe forward does not confirm the {mlp.kind} MLP qcache found in {where}: every Linear "
            f"there maps the hidden size to itself, and taking any of {downs} as the down projection, its "
            f"input is not what the activation candidate(s) "
            f"{', '.join(f'{path}.{c}' for c in mlp.candidates) or '(none)'} give ({_relation(mlp.kind)}); "
            f"qcache does not support this architecture ({UNSUPPORTED})"
        )
    raise InvalidName(
        f"the probe forward does not confirm the {mlp.kind} MLP qcache found in {where}: the input of "
        f"{path}.{mlp.down} is not what activation candidate(s) "
        f"{', '.join(f'{path}.{c}' for c in mlp.candidates)} give ({_relation(mlp.kind)}); qcache does not "
        f"support this architecture ({UNSUPPORTED})"
    )


def _settle_one(path: str, mlp: LayerMLP, rec: _Recorder, *, single: bool) -> bool:
    """Whether the probe confirms this reading of the block (and settle it in place); with ``single`` (the
    only reading), a down projection that did not run exactly once is refused at once."""
    down = f"{path}.{mlp.down}"
    if rec.calls.get(down) != 1:
        if not single:
            return False
        raise InvalidName(
            f"cannot tap {down}: the probe forward ran it {rec.calls.get(down, 0)} times, not once; "
            f"qcache does not support this architecture ({UNSUPPORTED})"
        )
    d = rec.inputs[down]
    if not mlp.candidates:  # no activation to check against: the structure alone must single it out
        return _reads_inside(path, mlp, rec)
    ups = {u: rec.outputs.get(f"{path}.{u}") for u in mlp.ups}
    for cand in mlp.candidates:
        key = f"{path}.{cand}"
        if rec.calls.get(key) != 1 or key not in rec.outputs or key not in rec.inputs:
            continue
        a_in, a_out = rec.inputs[key], rec.outputs[key]
        gate = _fits(mlp.kind, d, a_in, a_out, ups)
        if gate is not False:
            mlp.act, mlp.gate, mlp.flat = cand, gate, d.dim() == 2
            return True
    shared = [c for c in mlp.candidates if rec.calls.get(f"{path}.{c}", 0) > 1]
    if shared and mlp.kind == "plain" and (single or _reads_inside(path, mlp, rec)):
        # one activation instance shared by every layer (e.g. OpenAI GPT's ACT_FNS): a hook on it
        # cannot tell the layers apart, so act is refused; down-in reads the same values per layer
        mlp.act, mlp.gate = None, None
        mlp.act_reason = (
            f"its activation module {path}.{shared[0]} is one instance shared by several layers (it ran "
            f"{rec.calls[f'{path}.{shared[0]}']} times in one forward), so a hook cannot tell them apart"
        )
        mlp.flat = d.dim() == 2
        return True
    return False


def _reads_inside(path: str, mlp: LayerMLP, rec: _Recorder) -> bool:
    """Whether the up projections of ``mlp`` read the block's input and its down projection does not (its
    input is made inside the block). Without the block's input (the Linears are children of the layer, or
    the block was not watched) the up projections must read one tensor, which the down one does not."""
    d = rec.inputs.get(f"{path}.{mlp.down}")
    ins = [rec.inputs.get(f"{path}.{u}") for u in mlp.ups]
    x = rec.inputs.get(f"{path}.{mlp.block}") if mlp.block else None
    if d is None or any(i is None for i in ins):
        return False
    if x is None:
        if len(ins) < 2 and mlp.alternatives:
            return False  # one up projection and nothing to tell the block's input by
        x = ins[0]
    return all(_same(i, x) for i in ins) and not _same(d, x)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _relation(kind: str) -> str:
    return {
        "plain": "expected down-in == act(fc_in(x))",
        "gated": "expected down-in == act(gate(x)) * up(x)",
        "fused": "expected down-in == act(half of gate_up(x)) * other half",
    }[kind]


def _fits(
    kind: str, d: torch.Tensor, a_in: torch.Tensor, a_out: torch.Tensor, ups: dict[str, Any]
) -> str | bool | None:
    """The gate Linear's path when the relation holds (None for plain MLPs), False when it does not."""
    if any(u is None for u in ups.values()):
        return False
    if kind == "plain":
        (u,) = ups.values()
        return None if _close(d, a_out) and _close(a_in, u) else False
    if kind == "gated":
        for g, gv in ups.items():
            (uv,) = [v for k, v in ups.items() if k != g]
            if _close(a_in, gv) and _close(d, a_out * uv):
                return g
        return False
    (both,) = ups.values()
    first, second = both.chunk(2, dim=-1)
    for mine, other in ((first, second), (second, first)):
        if _close(a_in, mine) and _close(d, a_out * other):
            return next(iter(ups))
    return False


def _settle_experts(model: nn.Module, t: LayerTaps, rec: _Recorder) -> None:
    """Confirm the experts of layer ``t``: run once, ``top_k`` slots per token, and the recomputed
    down-projection inputs give the module's output back (``experts.reconstruct``)."""
    info = t.experts
    assert info is not None
    path = f"{t.path}.{info.module}"
    calls = rec.calls.get(path, 0)
    if calls != 1 or path not in rec.outputs:
        raise InvalidName(
            f"cannot tap the experts {path}: the probe forward ran them {calls} times, not once; "
            f"qcache does not support this architecture ({UNSUPPORTED})"
        )
    hidden, ids, weights = rec.routing[path]
    if ids.dim() != 2 or ids.shape[1] != info.top_k or hidden.dim() != 2:
        raise InvalidName(
            f"cannot tap the experts {path}: they received top-k ids of shape {tuple(ids.shape)} and hidden "
            f"states of shape {tuple(hidden.shape)}, not (tokens, {info.top_k}) and (tokens, hidden)"
        )
    module = model.get_submodule(path)
    with torch.inference_mode():
        down_in = expert_values(module, info, hidden, ids, act=False, down=True)["down-in"]
        rebuilt = reconstruct(module, info, down_in, ids, weights)
    if not _close(rebuilt, rec.outputs[path].reshape(rebuilt.shape)):
        raise InvalidName(
            f"the probe forward does not confirm the experts of {path} ({type(module).__name__}): the "
            "per-expert down-projection inputs qcache recomputes, through down_proj and the routing "
            f"weights, do not add up to the module's output; qcache does not support this architecture "
            f"({UNSUPPORTED})"
        )
    info.confirmed = True
