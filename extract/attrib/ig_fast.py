"""Layer Integrated Gradients that re-runs only what the interpolation changes.

Plain Captum re-runs the whole model for each of the n interpolation steps. Everything below the
attributed layer L, and the parts of layer L computed before its tap (attention, the gate/fc1
projection, the up projection), are the same for every step, so they are taken from the one ordinary
forward pass the extraction makes anyway:

* decoder layers 1..L-1 are swapped for pass-throughs and layer L's input is replaced by the cached
  hidden states (a forward pre-hook);
* layer L's attention and up projection return their cached outputs, its pre-activation projection
  returns nothing, and its tap module returns the interpolated activation ``a0 + alpha (a - a0)``;
* the LM head sees only each row's last real token.

Rows of a step batch are (example, step) pairs, example-major, so a chunk of rows holds few examples
and is cut to their longest length. Gradients are taken with ``torch.autograd.grad`` w.r.t. the
interpolated tensor only (no weight gradients). On a CPU, float16 matmuls of the steps run in float32
(``cpu_half``): same values up to summation order, many times faster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.quant.cpu_half import half_matmuls_in_float32
from qcache.extract.run.hooks import head_at

# Modules inside a decoder layer whose outputs do not depend on the tap: (replayed, skipped).
# Replayed modules return their cached output; skipped ones only feed the tap and return a dummy.
_GATED = (("self_attn", "mlp.up_proj"), ("mlp.gate_proj",))
REPLAY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "phi": (("self_attn",), ("mlp.fc1",)),
    "opt": (("self_attn",), ("fc1",)),
    "gpt_neox": (("attention",), ("mlp.dense_h_to_4h",)),
    "gpt2": (("attn",), ("mlp.c_fc",)),
}

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows, vocab) logits, (rows,) target


@dataclass
class LayerCache:
    """What one ordinary forward leaves behind for one layer: its input and the replayed outputs."""

    hidden_in: torch.Tensor | None = None  # (B, S, H) input of decoder layer L
    outputs: dict[str, Any] = field(default_factory=dict)  # module path -> output (tensor or tuple)


@contextmanager
def recording(taps: ModelTaps, layers: list[int], caches: dict[int, LayerCache]) -> Iterator[None]:
    """Record each layer's input and the outputs of its replayed modules during one forward."""
    replayed, _ = REPLAY[taps.adapter.family]
    handles = []
    for n in layers:
        cache = caches.setdefault(n, LayerCache())
        layer = taps.decoder_layers[n - 1]

        def on_input(_m: nn.Module, args: tuple, kwargs: dict, c: LayerCache = cache) -> None:
            c.hidden_in = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(layer.register_forward_pre_hook(on_input, with_kwargs=True))
        for path in replayed:

            def on_output(_m: nn.Module, _a: Any, out: Any, c: LayerCache = cache, p: str = path) -> None:
                c.outputs[p] = tuple(_detach(o) for o in out) if isinstance(out, tuple) else out.detach()

            handles.append(layer.get_submodule(path).register_forward_hook(on_output))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _rows(t: torch.Tensor, idx: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Gather example rows ``idx`` of a cached tensor, cut to ``seq`` tokens; keeps a flattened layout."""
    if t.dim() == 2 and t.shape[0] != batch:  # (B*S_full, X), e.g. OPT's MLP
        full = t.shape[0] // batch
        return t.view(batch, full, -1)[idx, :seq].reshape(len(idx) * seq, -1)
    return t[idx, :seq]


class _Const(nn.Module):
    """Stands in for a module and returns a fixed value, ignoring its inputs."""

    def __init__(self, value: Any, like: nn.Module | None = None) -> None:
        super().__init__()
        self.value = value
        for attr in ("attention_type",):  # read by some model loops (Qwen, Mistral sliding windows)
            if like is not None and hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.value is _PASS:
            return args[0] if args else kwargs["hidden_states"]
        return self.value


_PASS = object()


@contextmanager
def _swapped(root: nn.Module, stubs: dict[str, nn.Module]) -> Iterator[None]:
    """Replace submodules of ``root`` by path for the duration of the block."""
    saved = []
    for path, stub in stubs.items():
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        saved.append((parent, name, getattr(parent, name) if not name.isdigit() else parent[int(name)]))
        if name.isdigit():
            parent[int(name)] = stub
        else:
            setattr(parent, name, stub)
    try:
        yield
    finally:
        for parent, name, module in reversed(saved):
            if name.isdigit():
                parent[int(name)] = module
            else:
                setattr(parent, name, module)


@dataclass
class LayerIGResult:
    grad_sum: torch.Tensor  # (E, S, D) float32: sum_k w_k dF/da at a0 + alpha_k (a - a0)
    f_start: torch.Tensor  # (E,) objective with the tap at a0 (alpha = 0)


def layer_steps(
    taps: ModelTaps,
    layer: int,
    cache: LayerCache,
    *,
    a: torch.Tensor,  # (B, S, D) tap output of the input
    a0: torch.Tensor,  # (B, S, D) tap output of the baseline
    ids: torch.Tensor,  # (B, S) input ids (only their shape and mask matter below layer L)
    mask: torch.Tensor,  # (B, S)
    lengths: torch.Tensor,  # (B,) real tokens per example
    target: torch.Tensor,  # (B,) token id the objective reads
    examples: list[int],  # indices into the batch that need attributions
    alphas: list[float],
    weights: list[float],
    objective: Objective,
    batch_tokens: int,
) -> LayerIGResult:
    """Integrate dF/da over the straight path from a0 to a for the chosen examples of a batch."""
    replayed, skipped = REPLAY[taps.adapter.family]
    batch, seq_full, d = a.shape
    device = a.device
    # alpha = 0 first (weight 0): gives F at the path's start for the completeness check
    path = [(0.0, 0.0), *zip(alphas, weights, strict=True)]
    rows = [(e, k) for e in examples for k in range(len(path))]
    e_pos = {e: i for i, e in enumerate(examples)}
    grad_sum = torch.zeros(len(examples), seq_full, d, dtype=torch.float32, device=device)
    f_start = torch.zeros(len(examples), dtype=torch.float32, device=device)
    layer_mod = taps.decoder_layers[layer - 1]
    prefix = f"{taps.adapter.layers}.{layer - 1}."
    max_len = int(lengths.max())
    per_chunk = max(1, batch_tokens // max_len)
    for c0 in range(0, len(rows), per_chunk):
        chunk = rows[c0 : c0 + per_chunk]
        idx = torch.tensor([e for e, _ in chunk], device=device)
        seq = int(lengths[idx].max())
        alpha = torch.tensor([path[k][0] for _, k in chunk], device=device, dtype=a.dtype)
        base, top = a0[idx, :seq], a[idx, :seq]
        interp = (base + alpha[:, None, None] * (top - base)).requires_grad_(True)  # (R, seq, D)
        tap_out = interp.reshape(-1, d) if taps.adapter.flattens_tokens else interp
        stubs: dict[str, nn.Module] = {
            f"{taps.adapter.layers}.{i}": _Const(_PASS, taps.decoder_layers[i]) for i in range(layer - 1)
        }
        for p in replayed:
            out = cache.outputs[p]
            value = (
                (_rows(out[0], idx, batch, seq), *(None for _ in out[1:]))
                if isinstance(out, tuple)
                else _rows(out, idx, batch, seq)
            )
            stubs[prefix + p] = _Const(value)
        for p in skipped:
            stubs[prefix + p] = _Const(torch.empty(0, device=device))
        stubs[prefix + taps.adapter.act] = _Const(tap_out)
        assert cache.hidden_in is not None
        hidden = _rows(cache.hidden_in, idx, batch, seq)

        def inject(_m: nn.Module, args: tuple, kwargs: dict, h: torch.Tensor = hidden) -> tuple:
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        with ExitStack() as stack, torch.enable_grad():
            stack.enter_context(half_matmuls_in_float32(device, a.dtype))
            stack.enter_context(_swapped(taps.model, stubs))
            stack.enter_context(head_at(taps.model, lengths[idx] - 1))
            stack.enter_context(_handle(layer_mod.register_forward_pre_hook(inject, with_kwargs=True)))
            logits = taps.model(
                input_ids=ids[idx, :seq], attention_mask=mask[idx, :seq], use_cache=False
            ).logits
            values = objective(logits[:, -1].float(), target[idx])  # (R,)
            (grad,) = torch.autograd.grad(values.sum(), interp)
        w = torch.tensor([path[k][1] for _, k in chunk], device=device, dtype=torch.float32)
        pos = torch.tensor([e_pos[e] for e, _ in chunk], device=device)
        weighted = grad.float() * w[:, None, None]  # (R, seq, D)
        if device.type == "cuda":  # CUDA's index_add_ adds repeated indices atomically, in any order
            segment_add(grad_sum[:, :seq], [e_pos[e] for e, _ in chunk], weighted)
        else:
            grad_sum[:, :seq].index_add_(0, pos, weighted)
        start = torch.tensor([k == 0 for _, k in chunk], device=device)
        f_start.index_add_(0, pos[start], values.detach()[start])
    return LayerIGResult(grad_sum, f_start)


def segment_add(out: torch.Tensor, index: list[int], values: torch.Tensor) -> None:
    """``out[index[r]] += values[r]`` for every row ``r``, in a fixed order on every run and device.

    Rows with the same index must be consecutive (a chunk's rows are example after example); each run of
    them is summed with one reduction (a fixed tree on CUDA) and added once, so repeated IG runs on a
    GPU give bit-identical sums, unlike ``index_add_``. ``out`` (N, ...), ``values`` (R, ...).
    """
    r0 = 0
    for r in range(1, len(index) + 1):
        if r == len(index) or index[r] != index[r0]:
            out[index[r0]] += values[r0:r].sum(dim=0)
            r0 = r


@contextmanager
def _handle(handle: Any) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()
