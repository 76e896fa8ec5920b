"""Integrated-Gradients attributions of the tap neurons, computed beside the activations.

The defaults follow the authors' public code: Captum ``LayerIntegratedGradients`` on the post-activation
tap, the target is the token the model itself predicts after the prompt, the objective is its
log-softmax, the baseline is every input token replaced by id 0, 50 Gauss-Legendre steps, attributions
multiplied by (a - a0). The per-example numbers the user needs to judge convergence are returned as
prediction columns (see ``Attributor.__call__``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from qcache.extract.arch.adapters import ModelTaps
from qcache.extract.attrib.ig_fast import REPLAY, LayerCache, layer_steps, recording
from qcache.extract.run.hooks import Capture, capturing
from qcache.extract.run.readout import LabelTokens
from qcache.store.errors import InvalidOption

TARGETS = ("predicted", "gold")
OUTPUTS = ("logprob", "prob", "logit")
BASELINES = ("zero-id", "pad", "eos")
METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")


@dataclass(frozen=True)
class IGConfig:
    """How attributions are computed; everything but ``batch_tokens`` lands in the manifest."""

    target: str = "predicted"
    output: str = "logprob"
    baseline: str = "zero-id"
    steps: int = 50
    method: str = "gausslegendre"
    batch_tokens: int | None = None  # rows*tokens per step batch; None picks from free memory

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("target", self.target, TARGETS),
            ("output", self.output, OUTPUTS),
            ("baseline", self.baseline, BASELINES),
            ("method", self.method, METHODS),
        ):
            if value not in valid:
                close = difflib.get_close_matches(value, valid, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise InvalidOption(f"--ig-{name} {value!r} is unknown: {hint}use one of {', '.join(valid)}")
        if self.steps < 1:
            raise InvalidOption(f"--ig-steps {self.steps} must be at least 1")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise InvalidOption(f"--ig-batch-tokens {self.batch_tokens} must be positive")

    def manifest(self, baseline_id: int) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self).items() if k != "batch_tokens"}
        return {
            **settings,
            "algorithm": "captum LayerIntegratedGradients, multiply_by_inputs",
            "tap": "act",
            "interpolation": "tap activation space: a0 + alpha (a - a0), rest of the input fixed",
            "baseline_token_id": baseline_id,
            "dtype": "float32",
            "delta": "ig_delta = sum(attr) - (F(x) - F(x; tap = a0)); "
            "ig_captum_delta = sum(attr) - (F(x) - F(baseline ids)), Captum's definition",
        }


def objective_fn(output: str) -> Any:
    """``(rows, vocab) float32 logits, (rows,) target -> (rows,)`` objective."""

    def pick(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return values.gather(1, target[:, None].to(values.device))[:, 0]

    if output == "logprob":
        return lambda logits, t: pick(torch.log_softmax(logits, dim=-1), t)
    if output == "prob":
        return lambda logits, t: pick(torch.softmax(logits, dim=-1), t)
    return lambda logits, t: pick(logits, t)


def baseline_token(cfg: IGConfig, tokenizer: Any) -> int:
    if cfg.baseline == "zero-id":
        return 0
    value = tokenizer.pad_token_id if cfg.baseline == "pad" else tokenizer.eos_token_id
    if value is None:
        raise InvalidOption(f"--ig-baseline {cfg.baseline}: the tokenizer has no such token; use zero-id")
    return int(value)


def approximation(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Captum's own step positions and weights on [0, 1]."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters(method)
    return list(alphas(steps)), list(step_sizes(steps))


# Rows x tokens per step batch of methods whose values depend on the batch (LLM.int8 picks its outlier
# columns over each step batch, so its attributions change with the step batch): this on every device, never
# sized from free memory, so resumed units and runs on other machines attribute with the same step batches.
# 512 is what auto_batch_tokens picks on a CPU with the memory to spare, so CPU int8 runs are unchanged.
FIXED_STEP_TOKENS = 512


def auto_batch_tokens(taps: ModelTaps, device: torch.device, dtype: torch.dtype) -> int:
    """Rows x tokens per step batch.

    On a GPU: as many as let the autograd graph of the whole stack fill ~1/3 of free memory. On a CPU:
    512, capped by ~1/4 of free memory; larger step batches were slower there (cache misses), measured
    on SmolLM2 with 2 cores: 512 tokens ~25-33 s, 2723 tokens ~48 s for the same work.
    """
    cfg = taps.model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    per_token = taps.n_layers * (14 * hidden + 6 * taps.n_neurons) * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(max(free // 3 // per_token, 256), 1 << 17))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 8 << 30
    return int(min(max(free // 4 // per_token, 64), 512))


@dataclass
class IGBatch:
    """Attributions of some examples of one forward batch."""

    examples: list[int]  # indices into the batch
    attributions: dict[int, np.ndarray]  # layer -> (E, S, D) float32
    columns: dict[str, np.ndarray]  # per example: ig_target, ig_objective, ... (see ``Attributor``)


class Attributor:
    """Computes the attributions of every selected layer for examples of a forward batch."""

    def __init__(
        self,
        cfg: IGConfig,
        taps: ModelTaps,
        layers: list[int],
        tokenizer: Any,
        labels: LabelTokens,
        device: torch.device,
        *,
        batch_dependent: bool = False,
    ) -> None:
        """``batch_dependent``: the model's values depend on the batch (``run.batch_size.batch_dependent``):
        step batches of ``FIXED_STEP_TOKENS`` unless ``--ig-batch-tokens`` is given."""
        if taps.adapter.family not in REPLAY:
            raise InvalidOption(
                f"--attributions is not implemented for {taps.adapter.family!r}: the Integrated-Gradients "
                f"steps replay a decoder layer's modules, written for {', '.join(REPLAY)} only; extract "
                "without --attributions"
            )
        self.cfg, self.taps, self.layers, self.device = cfg, taps, layers, device
        self.labels = labels
        self.baseline_id = baseline_token(cfg, tokenizer)
        self.alphas, self.weights = approximation(cfg.method, cfg.steps)
        self.objective = objective_fn(cfg.output)
        dtype = next(taps.model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float16
        fixed = FIXED_STEP_TOKENS if batch_dependent else None
        self.batch_tokens = cfg.batch_tokens or fixed or auto_batch_tokens(taps, device, dtype)

    def recording(self, caches: dict[int, LayerCache]) -> Any:
        """Context manager to wrap the ordinary forward with, so it leaves what the steps replay."""
        return recording(self.taps, self.layers, caches)

    def targets(self, logits: torch.Tensor, gold: np.ndarray) -> torch.Tensor:
        """``(B,)`` target token: the argmax, or the gold label's most likely spelling."""
        if self.cfg.target == "predicted":
            return logits.argmax(dim=-1)
        out = []
        for row, g in zip(logits, gold, strict=True):
            ids = torch.tensor(self.labels.ids[int(g)], device=logits.device)
            out.append(ids[row[ids].argmax()])
        return torch.stack(out)

    def __call__(
        self,
        *,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        logits: torch.Tensor,
        acts: dict[int, torch.Tensor],
        caches: dict[int, LayerCache],
        gold: np.ndarray,
        examples: list[int],
    ) -> IGBatch:
        """Attribute ``examples`` (indices into the batch) at every layer.

        ``logits`` (B, V) at each last real token and ``acts`` (B, S, D) per layer come from the
        ordinary forward of ``ids`` (B, S) that ran inside ``self.recording(caches)``.
        """
        batch, seq = ids.shape
        target = self.targets(logits.float(), gold)
        f_x = self.objective(logits.float(), target)
        base_ids = torch.where(mask.bool(), torch.full_like(ids, self.baseline_id), ids)
        base = Capture()
        base.last_index = lengths - 1
        points = [(n, "act") for n in self.layers]
        with torch.no_grad(), capturing(self.taps, points, base):
            base_logits = self.taps.model(input_ids=base_ids, attention_mask=mask, use_cache=False).logits[
                :, -1
            ]
        f_x0 = self.objective(base_logits.float(), target)
        sel = torch.tensor(examples, device=ids.device)
        attributions, sums, gaps = {}, [], []
        for n in self.layers:
            a = self.taps.as_tokens(acts[n], batch, seq)
            a0 = self.taps.as_tokens(base.tensors[(n, "act")], batch, seq)
            res = layer_steps(
                self.taps,
                n,
                caches[n],
                a=a,
                a0=a0,
                ids=ids,
                mask=mask,
                lengths=lengths,
                target=target,
                examples=examples,
                alphas=self.alphas,
                weights=self.weights,
                objective=self.objective,
                batch_tokens=self.batch_tokens,
            )
            attr = res.grad_sum * (a[sel] - a0[sel]).float()  # (E, S, D)
            attributions[n] = attr.cpu().numpy()
            sums.append(attr.sum(dim=(1, 2)))
            gaps.append(f_x[sel] - res.f_start)
        s, g = torch.stack(sums, 1), torch.stack(gaps, 1)  # (E, layers)
        captum_gap = (f_x - f_x0)[sel][:, None]
        columns = {
            "ig_target": target[sel].cpu().numpy().astype(np.int32),
            "ig_objective": f_x[sel].cpu().numpy().astype(np.float32),
            "ig_objective_baseline": f_x0[sel].cpu().numpy().astype(np.float32),
            "ig_sum": s.cpu().numpy().astype(np.float32),
            "ig_gap": g.cpu().numpy().astype(np.float32),
            "ig_delta": (s - g).cpu().numpy().astype(np.float32),
            "ig_captum_delta": (s - captum_gap).cpu().numpy().astype(np.float32),
        }
        return IGBatch(examples, attributions, columns)
