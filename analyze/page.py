"""The report's HTML page: sections of HTML parts, figures embedded as base64 PNG, tables as CSV files.

``Page`` writes every figure to ``figures/<name>.png`` and every table to ``tables/<name>.csv`` as it is
added, and collects the pieces a store lacks so the page can list them at the top.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from qcache.store import Store
from qcache.store.keys import QUANTS
from qcache.store.location import StorePath, read_parquet
from qcache.store.tables import table_parts

MAX_HTML_ROWS = 60  # longer tables are in their CSV only


def load_table(root: StorePath, name: str) -> pa.Table | None:
    """All Parquet parts of one result table under ``root`` (a store's ``results``), or None.

    Per-label columns (``label_prob``) are fixed-size lists whose size is the run's number of labels, so
    runs with different label sets are read as plain lists to be concatenated.
    """
    parts = [_variable_lists(read_parquet(f)) for f in table_parts(root, name)]
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts, promote_options="default") if parts else None


def _variable_lists(table: pa.Table) -> pa.Table:
    """``table`` with every fixed-size list column cast to a list of the same values."""
    for i, field in enumerate(table.schema):
        if pa.types.is_fixed_size_list(field.type):
            plain = pa.list_(field.type.value_type)
            table = table.set_column(i, field.with_type(plain), table.column(i).cast(plain))
    return table


def quant_key(q: str) -> tuple[int, str]:
    """Sort order of quantizations: fp32, fp16, int8, nf4, then anything else."""
    return (QUANTS.index(q) if q in QUANTS else len(QUANTS), q)


def rows_of(table: pa.Table | None) -> list[dict[str, Any]]:
    return table.to_pylist() if table is not None else []


def run_order(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["dataset"], r["model"], quant_key(r.get("quant", "")))


def pivot(
    rows: list[dict[str, Any]],
    column: str,
    value: str,
    *,
    prefix: str = "L",
    total: bool = False,
    order: tuple[str, ...] = (),
) -> pa.Table:
    """One row per (dataset, model, quant), one column per value of ``column`` (``L<n>`` for layers), those
    in ``order`` first, and optionally a Total."""
    groups: dict[tuple[str, str, str], dict[Any, Any]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["quant"]), {})[r[column]] = r[value]
    present = {r[column] for r in rows}
    layers = [c for c in order if c in present] + sorted(present - set(order))
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], quant_key(k[2]))):
        row: dict[str, Any] = dict(zip(("dataset", "model", "quant"), key, strict=True))
        row.update({f"{prefix}{n}": groups[key].get(n) for n in layers})
        if total:
            row["Total"] = sum(v for v in groups[key].values() if v is not None)
        out.append(row)
    return pa.Table.from_pylist(out)


class Page:
    """The report being written: collects HTML parts, writes each figure and table file once."""

    def __init__(self, out: Path, store: Store) -> None:
        self.out, self.store = out, store
        self.sections: list[tuple[str, str, list[str]]] = []  # (id, title, html parts)
        self.missing: list[str] = []
        self.figures: list[Path] = []
        self.tables: list[Path] = []
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "tables").mkdir(parents=True, exist_ok=True)

    def section(self, sid: str, title: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((sid, title, parts))
        return parts

    def figure(self, name: str, png: bytes, caption: str) -> str:
        path = self.out / "figures" / f"{name}.png"
        path.write_bytes(png)
        self.figures.append(path)
        data = base64.b64encode(png).decode("ascii")
        img = f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        return (
            f'<figure id="fig-{name}">{img}'
            f'<figcaption>{html.escape(caption)} <span class="file">figures/{name}.png</span>'
            "</figcaption></figure>"
        )

    def table(self, name: str, table: pa.Table, caption: str, *, show: bool = True) -> str:
        path = self.out / "tables" / f"{name}.csv"
        pacsv.write_csv(table, path)
        self.tables.append(path)
        note = f'<p class="caption">{html.escape(caption)} <span class="file">tables/{name}.csv</span>'
        if not show or table.num_rows > MAX_HTML_ROWS:
            return note + f" ({table.num_rows} rows, in the CSV only)</p>"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row.values()) + "</tr>"
            for row in table.to_pylist()
        )
        return note + f'</p><table class="data" id="tab-{name}"><tr>{head}</tr>{rows}</table>'

    def gap(self, text: str) -> str:
        """Name a missing piece: in the section, and in the summary at the top."""
        self.missing.append(text)
        return f'<p class="missing">Missing: {html.escape(text)}</p>'

    def notes(self, models: set[str]) -> str:
        """Weights notes (e.g. a GGUF baseline that is dequantized) for the models a section shows."""
        seen = {}
        for k in self.store.runs():
            note = self.store.run(k).manifest.get("weights_note")
            if k.model in models and note:
                seen[k.model] = note
        return "".join(
            f'<p class="note"><b>{html.escape(m)}</b>: {html.escape(n)}</p>' for m, n in seen.items()
        )


def cell(v: Any) -> str:
    if isinstance(v, float):
        return "NaN" if v != v else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
 color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav ol{columns:2} figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption,.caption{font-size:.9em;color:#444} .file{font-family:monospace;color:#888;font-size:.85em}
table.data{border-collapse:collapse;font-size:.82em;margin:.5em 0 1.5em}
table.data td,table.data th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.data th{background:#f3f3f3} table.data td:nth-child(-n+3){text-align:left}
.missing{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em}
.note{background:#eef5ff;border-left:4px solid #3b82f6;padding:.4em .8em}
.runs{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:.8em}
.run{border:1px solid #ddd;border-radius:6px;padding:.2em .8em;font-size:.82em}
.run h3{font-size:1.05em;margin:.4em 0}
.run dl{display:grid;grid-template-columns:auto 1fr;gap:0 .8em;margin:0}
.run dt{color:#666} .run dd{margin:0;word-break:break-word}
"""


def render(page: Page, *, reading: str) -> str:
    """The whole HTML document: header, contents, missing pieces, sections."""
    runs = page.store.runs()
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    toc = "".join(f'<li><a href="#{sid}">{html.escape(t)}</a></li>' for sid, t, _ in page.sections)
    gaps = "".join(f"<li>{html.escape(m)}</li>" for m in page.missing)
    missing = (
        f'<section id="missing"><h2>What this store lacks</h2><ul class="missing">{gaps}</ul></section>'
        if page.missing
        else '<p id="missing">Every piece of the report is present.</p>'
    )
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'
        for sid, title, parts in page.sections
    )
    meta = json.dumps({"store": str(page.store.root), "reading": reading, "runs": [str(k) for k in runs]})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>qcache report: {html.escape(str(page.store.root))}</title>"
        f'<meta name="qcache-report" content="{html.escape(meta)}"><style>{CSS}</style></head><body>'
        f"<h1>qcache report</h1><p>Store <code>{html.escape(str(page.store.root))}</code>, "
        f"{len(runs)} run(s); "
        f"generated {when}; calibration reading <b>{html.escape(reading)}</b>. Reproduces the figures and "
        "tables of <i>The Price of Efficiency</i> from what this store holds, and adds comparisons the paper "
        f"lacks (set overlaps, activation drift).</p><nav><ol>{toc}</ol></nav>{missing}{body}</body></html>\n"
    )


def groups(store: Store) -> dict[tuple[str, str], list[str]]:
    """(dataset, model) -> its quantizations, in order."""
    out: dict[tuple[str, str], list[str]] = {}
    for k in store.runs():
        out.setdefault((k.dataset, k.model), []).append(k.quant)
    return {g: sorted(q, key=quant_key) for g, q in out.items()}


def lacking(page: Page, table: pa.Table | None, what: str, command: str) -> str:
    """Name the runs that have no rows in ``table``."""
    have = {(r["dataset"], r["model"], r["quant"]) for r in rows_of(table)}
    lack = [str(k) for k in page.store.runs() if (k.dataset, k.model, k.quant) not in have]
    return page.gap(f"no {what} for {', '.join(lack)}: run {command}") if lack and table is not None else ""


def values(rows: list[dict[str, Any]], name: str) -> str:
    """The distinct values of a parameter column, for a caption: ``0.1`` or ``0.1, 0.2``."""
    return ", ".join(cell(v) for v in sorted({r[name] for r in rows}))
