"""The report's figures: matplotlib, headless, each returned as PNG bytes.

``matplotlib.figure.Figure`` is used directly (never pyplot), so no display and no global backend state
are involved; matplotlib is imported inside each function so the rest of ``analyze`` works without it.
Each function takes plain data already read from the result tables.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qcache.store.errors import BackendUnavailable

# One colour per quantization, the same in every figure.
COLORS = {"fp32": "#222222", "fp16": "#1f77b4", "int8": "#ff7f0e", "nf4": "#d62728"}
Panels = Mapping[str, Mapping[str, Any]]  # panel title -> series label -> data


def _figure(
    n_panels: int, *, width: float = 4.2, height: float = 3.2, cols: int = 3
) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # base installs may not carry matplotlib
        raise BackendUnavailable("qcache report needs matplotlib: pip install matplotlib") from exc
    cols = max(1, min(cols, n_panels))
    rows = math.ceil(max(n_panels, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(n_panels, 1))]
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # legends placed beside the axes included
    return buf.getvalue()


def _color(label: str) -> str | None:
    return COLORS.get(label.rsplit(" ", 1)[-1]) or COLORS.get(label)


def reliability(panels: Panels) -> bytes:
    """Reliability diagrams: per panel (dataset/model), accuracy against mean confidence per bin, per quant.

    ``panels[title][quant] = (confidence, accuracy, count)`` arrays over the non-empty bins.
    """
    fig, axes = _figure(len(panels), width=3.8, height=3.6)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
        for quant, (conf, acc, count) in series.items():
            size = 12 + 60 * np.asarray(count) / max(float(np.max(count)), 1.0)
            ax.plot(conf, acc, color=_color(quant), lw=1)
            ax.scatter(conf, acc, s=size, color=_color(quant), label=quant, alpha=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean confidence in bin")
        ax.set_ylabel("accuracy in bin")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def bin_bars(panels: Panels, edges: Sequence[float], *, xlabel: str, ylabel: str) -> bytes:
    """Grouped bars per panel: counts per bin, one bar per quant, log scale (the paper's Figures 4-5).

    ``panels[title][quant] = counts`` with ``len(edges) - 1`` entries.
    """
    fig, axes = _figure(len(panels), cols=1, width=9.0, height=3.4)
    labels = [f"{lo:.1f}-{hi:.1f}" for lo, hi in itertools.pairwise(edges)]
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(labels))
        for i, (quant, counts) in enumerate(series.items()):
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width,
                np.maximum(counts, 0),
                width,
                label=quant,
                color=_color(quant),
            )
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def layer_bars(panels: Panels, *, ylabel: str) -> bytes:
    """Bars per layer, one bar per quant, per panel (dataset/model): Tables 3 and 4 as pictures.

    ``panels[title][quant] = {layer: value}``.
    """
    fig, axes = _figure(len(panels), cols=2, width=5.0)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        layers = sorted({layer for values in series.values() for layer in values})
        x = np.arange(len(layers))
        width = 0.8 / max(len(series), 1)
        for i, (quant, values) in enumerate(series.items()):
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width,
                [values.get(n, 0.0) for n in layers],
                width,
                label=quant,
                color=_color(quant),
            )
        ax.set_xticks(x, [f"L{n}" for n in layers])
        ax.set_ylim(bottom=0)
        if not any(v for values in series.values() for v in values.values()):
            ax.text(0.5, 0.5, "zero in every run", transform=ax.transAxes, ha="center", color="grey")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def drift_hist(panels: Panels) -> bytes:
    """Distribution of per-neuron Pearson r (baseline vs quantized) per panel (dataset/model/layer).

    ``panels[title][quant] = r`` values; NaN (constant neurons) are left out and counted in the legend. The
    x range starts at the panel's 1st percentile of r (values below it land in the first bin).
    """
    fig, axes = _figure(len(panels), width=4.0, height=3.0)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        every = np.concatenate([np.asarray(r, dtype=float) for r in series.values()])
        every = every[np.isfinite(every)]
        low = float(np.quantile(every, 0.01)) if every.size else 0.0
        low = max(-1.0, min(np.floor(low * 100) / 100, 0.99))
        bins = np.linspace(low, 1.0, 41)
        for quant, r in series.items():
            r = np.asarray(r, dtype=float)
            finite = r[np.isfinite(r)]
            label = f"{quant} (median {np.median(finite):.3f})" if finite.size else f"{quant} (no finite r)"
            if finite.size < r.size:
                label += f", {r.size - finite.size} constant"
            ax.hist(
                np.clip(finite, low, 1.0),
                bins=bins,
                histtype="step",
                lw=1.5,
                color=_color(quant),
                label=label,
            )
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel(f"per-neuron Pearson r with the baseline (< {low:g} in first bin)", fontsize=8)
        ax.set_ylabel("neurons")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def quant_bars(
    panels: Panels,
    quants: Sequence[str],
    *,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    intervals: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]] | None = None,
    baselines: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> bytes:
    """Grouped bars from 0 per panel (a dataset): x = quantization, one bar per model (Figures 1-3).

    ``panels[dataset][model][quant] = value``; ``intervals`` (same keys) ``= (low, high)`` drawn as error
    bars; ``baselines`` (same keys) ``= value`` drawn as a dashed segment across the bar (e.g. the
    majority-class accuracy).
    """
    fig, axes = _figure(len(panels), cols=2, width=5.0)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        x = np.arange(len(quants))
        width = 0.8 / max(len(series), 1)
        marked = False
        for i, (model, values) in enumerate(series.items()):
            at = [j for j, q in enumerate(quants) if q in values]
            xs = x[at] + (i - (len(series) - 1) / 2) * width
            ys = np.array([values[quants[j]] for j in at], dtype=float)
            bars = ax.bar(xs, ys, width, label=model)
            ci = (intervals or {}).get(title, {}).get(model, {})
            if ci:
                lo = np.array([ci.get(quants[j], (np.nan, np.nan))[0] for j in at])
                hi = np.array([ci.get(quants[j], (np.nan, np.nan))[1] for j in at])
                ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], fmt="none", ecolor="black", capsize=3, lw=1)
            base = (baselines or {}).get(title, {}).get(model, {})
            for xb, j in zip(xs, at, strict=True):
                if quants[j] in base:
                    label = None if marked else "majority class"
                    ax.hlines(
                        base[quants[j]],
                        xb - width / 2,
                        xb + width / 2,
                        colors="black",
                        linestyles="--",
                        label=label,
                    )
                    marked = True
            ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center")  # clear of the error bars
        ax.set_xticks(x, list(quants))
        ax.set_title(title)
        ax.set_xlabel("quantization")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def mass_boxes(panels: Panels) -> bytes:
    """Box plots per panel (a dataset): per run, the distribution over examples of the probability the
    label words hold together (0..1). ``panels[dataset][run label] = values``."""
    fig, axes = _figure(len(panels), cols=2, width=5.0)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        labels = list(series)
        ax.boxplot([np.asarray(series[k], dtype=float) for k in labels], whis=(5, 95), showfliers=True)
        ax.set_xticks(np.arange(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=7)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("label words' probability (sum)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def layer_lines(panels: Panels, *, ylabel: str) -> bytes:
    """One line per method over the layers, per panel (dataset/model/baseline).

    ``panels[title][method] = {layer: value}``. Past ``FEW`` methods the legend moves beside the axes and
    methods without a fixed colour take tab20's colours and cycle line styles, so no two look alike.
    """
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    fig, axes = _figure(len(panels), cols=2, width=5.0)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        many = len(series) > FEW
        for i, (method, values) in enumerate(series.items()):
            layers = sorted(values)
            ax.plot(
                layers,
                [values[n] for n in layers],
                marker="o",
                ms=3,
                lw=1.2,
                label=method,
                color=(_color(method) if not many else None) or palette(i % 20),
                ls=("-", "--", ":")[i // 20 % 3] if many else "-",
            )
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.legend(fontsize=7)
    return _png(fig)


FEW = 8  # methods in one panel whose legend fits inside it


def method_bars(panels: Panels, *, ylabel: str) -> bytes:
    """One bar per method (in the panel's order: ranked), per panel; a line at zero, values labelled.

    ``panels[title][method] = value`` (None or NaN: no bar).
    """
    fig, axes = _figure(len(panels), cols=2, width=5.0)
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        names = list(series)
        vals = np.array([np.nan if series[m] is None else float(series[m]) for m in names])
        bars = ax.bar(
            np.arange(len(names)), np.nan_to_num(vals), color=[_color(m) or "#7f7f7f" for m in names]
        )
        ax.bar_label(bars, labels=[f"{v:.4g}" if np.isfinite(v) else "n/a" for v in vals], fontsize=7)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)
