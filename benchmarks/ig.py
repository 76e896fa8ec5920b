"""Integrated-Gradients speed: qcache's replaying, batched path against a plain per-example Captum call.

    .venv/bin/python benchmarks/ig.py --quick            # SmolLM2-135M fp32 on CPU, 2 examples
    .venv/bin/python benchmarks/ig.py --model llama2-7b --device cuda --bits 16

Both sides get the same examples, layers, target (the predicted token), objective (log-softmax),
baseline (token id 0), 50 Gauss-Legendre steps, and both compute the convergence delta. The plain
side is ``LayerIntegratedGradients(forward, layer=tap).attribute`` once per example and layer, as the
authors' code does. Printed: examples/s of each, the ratio, and the largest difference between the two
attributions relative to the largest attribution. All figures are measured in this run.

Beside each measured speed-up is its FLOP bound: Captum's matrix-multiply FLOPs over qcache's for the same
examples (``extract.throughput``'s counting). On a CPU both sides run the same GEMM-bound kernels (the
profile shows ~87% of qcache's time in ``aten::mm``), so no exact method can beat that ratio by much:
what is left to skip is the part below the tap and Captum's full-sequence LM head.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch


def flop_bound(arch: Any, lengths: np.ndarray, layer: int, steps: int) -> tuple[float, float]:
    """(Captum's, qcache's) FLOPs for attributing ``layer`` of examples of ``lengths`` tokens.

    Captum: ``steps`` forwards of the whole model with the LM head at every position, each with a backward
    to the tap (the head's input gradient covers every position too), plus five single forwards (the
    target, the tap under input and baseline, and the two ends of the convergence delta). qcache: its
    step batches (``ig_flops``) plus two forwards (the ordinary one and the baseline's), each at the
    examples' own lengths.
    """
    from qcache.extract.plan.throughput import forward_flops, ig_flops, ig_row_flops

    # Captum's head covers every position, in the forward and in the input gradient: n - 1 more than ours
    extra_head = (lengths - 1) * 2.0 * arch.hidden * arch.vocab
    forward = np.array([forward_flops(arch, [(1, int(n))]) for n in lengths]) + extra_head
    backward = ig_row_flops(arch, lengths, layer) + extra_head
    captum = float((steps * (forward + backward) + 5 * forward).sum())
    ours = ig_flops(arch, lengths, [layer], steps) + 2 * float(forward.sum() - extra_head.sum())
    return captum, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--layers", default="paper", help="'paper' = first, middle (15), last")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64, help="Keep prompts up to this many tokens.")
    ap.add_argument("--repeat", type=int, default=2, help="Time each side this often, keep the fastest.")
    ap.add_argument("--quick", action="store_true", help="2 examples, one timing per side")
    args = ap.parse_args()
    n_examples = 2 if args.quick else args.examples
    if args.quick:
        args.repeat = 1

    from captum.attr import LayerIntegratedGradients

    from qcache.extract.arch.adapters import ModelTaps, parse_layers
    from qcache.extract.attrib.attribution import Attributor, IGConfig
    from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
    from qcache.extract.models.architecture import describe_model
    from qcache.extract.models.loading import load_model
    from qcache.extract.models.registry import resolve_model
    from qcache.extract.quant.quantization import quant_key
    from qcache.extract.run.hooks import Capture, capturing
    from qcache.extract.run.readout import label_tokens

    torch.manual_seed(0)
    loaded = load_model(
        resolve_model(args.model), quant_key(args.bits), device=args.device, for_gradients=True
    )
    model, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    taps = ModelTaps(model)
    layers = parse_layers(args.layers, taps.n_layers)
    data = load_dataset(DatasetRequest(name="boolq", limit=200))
    seqs = [s for s in (tok(p).input_ids for p in data.prompts) if len(s) <= args.max_tokens][:n_examples]
    lengths = np.array([len(s) for s in seqs])
    print(
        f"model {args.model} {loaded.quant} on {dev}; {len(seqs)} examples of "
        f"{lengths.min()}-{lengths.max()} tokens; layers {layers}; {args.steps} steps; "
        f"torch threads {torch.get_num_threads()}"
    )

    def fast(layer: int) -> tuple[float, dict[int, np.ndarray], dict[str, np.ndarray]]:
        """One ordinary forward (as extraction does), then the replaying steps of one layer."""
        att = Attributor(
            IGConfig(steps=args.steps, batch_tokens=args.batch_tokens),
            taps,
            [layer],
            tok,
            label_tokens(tok, data.labels),
            dev,
        )
        t0 = time.perf_counter()
        ids = torch.full((len(seqs), int(lengths.max())), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        ids, mask, lens = ids.to(dev), mask.to(dev), torch.tensor(lengths, device=dev)
        cap, caches = Capture(), {}
        cap.last_index = lens - 1
        with torch.no_grad(), capturing(taps, [(layer, "act")], cap), att.recording(caches):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        res = att(
            ids=ids,
            mask=mask,
            lengths=lens,
            logits=logits,
            acts={layer: cap.tensors[(layer, "act")]},
            caches=caches,
            gold=data.gold[: len(seqs)],
            examples=list(range(len(seqs))),
        )
        _sync(dev)
        fast.batch_tokens = att.batch_tokens  # type: ignore[attr-defined]
        return time.perf_counter() - t0, res.attributions, res.columns

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=x).logits[:, -1].float(), dim=-1)

    def plain(layer: int) -> tuple[float, list[np.ndarray], list[float]]:
        """Plain Captum, one call per example."""
        t0 = time.perf_counter()
        out, deltas = [], []
        for s in seqs:
            x = torch.tensor([s], device=dev)
            with torch.no_grad():
                target = int(forward(x).argmax())
            lig = LayerIntegratedGradients(forward, taps.tap(layer, "act").module, multiply_by_inputs=True)
            attr, delta = lig.attribute(
                x,
                baselines=torch.zeros_like(x),
                target=target,
                n_steps=args.steps,
                method="gausslegendre",
                return_convergence_delta=True,
            )
            out.append(attr.reshape(len(s), -1).float().detach().cpu().numpy())
            deltas.append(abs(float(delta)))
        _sync(dev)
        return time.perf_counter() - t0, out, deltas

    # Other processes share the machine: each layer is timed for both sides back to back, --repeat
    # times, and the fastest of each is kept.
    arch = describe_model(resolve_model(args.model))
    t_fast = t_plain = 0.0
    f_captum = f_ours = 0.0
    worst, deltas, ours, integ = 0.0, [], 0.0, 0.0
    for n in layers:
        best_f = best_p = float("inf")
        for _ in range(args.repeat):
            tf_, attrs, cols = fast(n)
            tp_, refs, ds = plain(n)
            best_f, best_p = min(best_f, tf_), min(best_p, tp_)
        for e, ref in enumerate(refs):
            got = attrs[n][e, : len(ref)]
            worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
        deltas += ds
        ours = max(ours, float(np.abs(cols["ig_captum_delta"]).max()))
        integ = max(integ, float(np.abs(cols["ig_delta"]).max()))
        fc, fo = flop_bound(arch, lengths, n, args.steps)
        f_captum, f_ours = f_captum + fc, f_ours + fo
        print(
            f"layer {n:>3}: qcache {best_f:7.1f} s  captum {best_p:7.1f} s  speed-up {best_p / best_f:5.2f}x"
            f"  (FLOP bound {fc / fo:5.2f}x)"
        )
        t_fast, t_plain = t_fast + best_f, t_plain + best_p

    k = len(seqs)
    print(
        f"qcache  {k / t_fast:8.3f} examples/s over all layers ({t_fast:.1f} s, "
        f"batch tokens {fast.batch_tokens})"
    )  # type: ignore[attr-defined]
    print(f"captum  {k / t_plain:8.3f} examples/s over all layers ({t_plain:.1f} s)")
    print(f"speed-up {t_plain / t_fast:.2f}x (FLOP bound {f_captum / f_ours:.2f}x)")
    print(f"max |qcache - captum| / max |captum| = {worst:.2e}")
    print(
        f"max |captum delta|: captum {max(deltas):.3e}, qcache {ours:.3e}; "
        f"max |integration delta| qcache {integ:.3e}"
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


if __name__ == "__main__":
    main()
