"""A ``Plan`` as the readable table ``qcache plan`` prints, ending with one verdict line."""

from __future__ import annotations

from qcache.extract.plan.estimate import Plan
from qcache.store.space import fmt_bytes


def render(plan: Plan) -> str:
    """The plan as text: run, tokens, per-array disk, memory, time, verdict."""
    return "\n".join(
        [*_head(plan), "", *_disk(plan), "", *_memory(plan), "", *_time(plan), "", verdict(plan)]
    )


def _head(plan: Plan) -> list[str]:
    m, t = plan.model, plan.tokens
    ig = plan.attributions
    lines = [
        f"qcache plan: {plan.key}",
        f"  model      {m['source']}: {m['family']}, {m['parameters'] / 1e9:.3g} B parameters, "
        f"{m['layers']} layers x {m['neurons']} neurons",
        f"             config: {m['config']}",
        f"  tokens     {t.n_tokens:,} in {t.n_examples:,} examples (longest {t.longest}, "
        f"{t.n_truncated} truncated at --max-length)",
        f"             {t.how}",
        f"  layers     {', '.join(map(str, plan.layers))}; taps {', '.join(plan.taps)}; attributions "
        + ("no" if ig is None else f"{ig['steps']} {ig['method']} steps"),
    ]
    if plan.batching is not None:
        b = plan.batching
        lines.append(f"  batches    {b['mode']}, --batch-size {b['batch_size']} ({b['from']})")
    return lines


def _disk(plan: Plan) -> list[str]:
    d = plan.disk
    small = "predictions, markers (approx.)"
    width = max(len(small), *(len(a.path) for a in d.arrays))
    rows = [f"disk at {d.store} (uncompressed bytes of every array; {d.existing})"]
    for a in d.arrays:
        shape = "(" + ", ".join(f"{n:,}" for n in a.shape) + ")"
        rows.append(f"  {a.path:<{width}}  {shape:>22}  {a.dtype:<8} {fmt_bytes(a.nbytes):>10}")
    rows.append(f"  {small:<{width}}  {'':>22}  {'':<8} {fmt_bytes(d.predictions):>10}")
    rows.append(f"  {'total':<{width}}  {'':>22}  {'':<8} {fmt_bytes(d.total):>10}")
    note = "; attributions counted uncompressed" if plan.attributions is not None else ""
    rows.append(
        f"  typically ~{fmt_bytes(d.typical)} after Blosc (ratios measured on SmolLM2 activations{note})"
    )
    free = "unknown" if d.free is None else fmt_bytes(d.free)
    rows.append(
        f"  to write: {d.units_pending} of {d.units_total} units, at most {fmt_bytes(d.pending)}; "
        f"free: {free}"
    )
    return rows


def _memory(plan: Plan) -> list[str]:
    mem = plan.memory
    w, ws = mem.weights, mem.working
    quant = plan.key.rsplit("/", 1)[-1]
    rows = [
        f"memory on {mem.device} (estimate)",
        f"  weights ({quant})          {fmt_bytes(w.total):>10}  parameters {fmt_bytes(w.params)}, "
        f"quantization state {fmt_bytes(w.quant_state)}, buffers {fmt_bytes(w.buffers)}",
        f"  forward working set    {fmt_bytes(ws.forward):>10}  a batch of {ws.rows} x {ws.seq} tokens "
        f"(the longest), {ws.hooked} captured taps",
    ]
    if plan.attributions is not None:
        rows.append(
            f"  attributions           {fmt_bytes(ws.attribution):>10}  replay caches + a step batch of "
            f"{ws.step_tokens} tokens ({ws.step_tokens_from})"
        )
    if ws.overhead:
        rows.append(f"  CUDA context           {fmt_bytes(ws.overhead):>10}  assumed")
    have = "not on this machine" if mem.available is None else f"of {fmt_bytes(mem.available)}"
    rows.append(f"  total                  {fmt_bytes(mem.total):>10}  {have}")
    return rows


def _time(plan: Plan) -> list[str]:
    t = plan.time
    rows = [
        "time (estimate: matrix-multiply FLOPs / rate)",
        f"  forward passes         {fmt_flops(t.forward_flops):>10}  {t.padded_tokens:,} tokens with padding",
    ]
    if plan.attributions is not None:
        rows.append(f"  attributions           {fmt_flops(t.ig_flops):>10}  baseline forwards + IG steps")
    rows.append(f"  rate                   {fmt_flops(t.rate) + '/s':>10}  {t.rate_from}")
    rows.append(f"  total                  {duration(t.seconds):>10}")
    return rows


def verdict(plan: Plan) -> str:
    """One line: will the run start, fit, and about how long will it take."""
    d, mem = plan.disk, plan.memory
    about = f"about {duration(plan.time.seconds)}"
    if d.conflict:
        return (
            f"verdict: extract will refuse: {plan.key} exists in {d.store} with other arguments "
            "(rerun with the stored ones to resume, or pass --overwrite to start over)"
        )
    if plan.disk_ok is False:
        return (
            f"verdict: extract will refuse to start: it needs up to {fmt_bytes(d.pending)} on disk and "
            f"{fmt_bytes(d.free or 0)} is free at {d.store} (free space, choose another --store, reduce "
            "--limit or --layers, or pass --no-disk-check)"
        )
    if plan.memory_ok is False:
        return (
            f"verdict: will not fit in memory: needs ~{fmt_bytes(mem.total)} on {mem.device}, which has "
            f"{fmt_bytes(mem.available or 0)} (lower --batch-size, --bits, or --ig-batch-tokens)"
        )
    disk = "disk unknown" if d.free is None else f"disk {fmt_bytes(d.pending)} of {fmt_bytes(d.free)} free"
    if mem.available is None:
        need = f"needs a {mem.device} device with at least ~{fmt_bytes(mem.total)}"
        return f"verdict: ok on {disk}; {need}; {about}"
    return f"verdict: ok: {disk}, memory ~{fmt_bytes(mem.total)} of {fmt_bytes(mem.available)}; {about}"


def fmt_flops(n: float) -> str:
    """``fmt_flops(3.2e15) == '3.2 PFLOP'``."""
    for unit in ("", "k", "M", "G", "T", "P"):
        if n < 1000:
            return f"{n:.3g} {unit}FLOP"
        n /= 1000
    return f"{n:.3g} EFLOP"


def duration(seconds: float) -> str:
    """``duration(5400) == '1.5 h'``."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size or (unit == "h" and seconds >= size):
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
