"""Result tables: Parquet under ``<store>/tables/<name>/``, queried read-only through DuckDB.

Each analysis writes one file per run (``<dataset>--<model>--<quant>.parquet``, or per model for cross-run
tables), atomically, so re-running one run replaces only its file. ``sql`` loads every table into an
in-memory DuckDB, then switches off file-system access and locks the configuration: a query can read the
tables and nothing else, and cannot write anything anywhere. Only read statements are accepted.

This is the only module that speaks SQL.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InvalidOption, QCacheError
from .progress import atomic_write

# Documented schemas (docs/analysis.md). Every table carries dataset, model, quant; per-layer ones, layer.
SCHEMAS: dict[str, str] = {
    "predictions": "dataset, model, quant, example_id, gold, gold_label, pred_label, confidence, correct, "
    "label_prob, label_prob_norm, top_token_id, top_token, top_token_prob, correct_vocab",
    "metrics": "dataset, model, quant, reading, metric, value",
    "reliability": "dataset, model, quant, reading, bin_lo, bin_hi, count, confidence, accuracy",
    "neuron_stats": "dataset, model, quant, layer, neuron, min, max, mean, std, frac_near_zero, dead, "
    "n_nonfinite",
    "dead_neurons": "dataset, model, quant, layer, activation, bound, n_tokens, n_neurons, n_dead, pct_dead",
    "redundancy": "dataset, model, quant, layer, layer_b, unit, bin_lo, bin_hi, pairs",
    "redundancy_summary": "dataset, model, quant, layer, layer_b, unit, n_neurons, n_constant, n_pairs, "
    "threshold, pairs_above, pct_above",
    "redundancy_top_pairs": "dataset, model, quant, layer, layer_b, unit, rank, neuron_a, neuron_b, abs_r",
}
READ_STATEMENTS = {"SELECT", "EXPLAIN"}


class SQLError(QCacheError, ValueError):
    """A query DuckDB rejected, or one that would write."""


def part_name(dataset: str, model: str, quant: str | None = None) -> str:
    return "--".join(p for p in (dataset, model, quant) if p) + ".parquet"


def write_table(root: Path, name: str, part: str, table: pa.Table) -> Path:
    """Atomically write ``table`` as ``<root>/tables/<name>/<part>``."""
    path = root / "tables" / name / part
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue())
    return path


def table_names(root: Path) -> list[str]:
    base = root / "tables"
    if not base.exists():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and any(d.glob("*.parquet")))


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one table per result table and no file-system access left."""
    con = duckdb.connect(":memory:")
    for name in table_names(root):
        pattern = str(root / "tables" / name / "*.parquet").replace("'", "''")
        con.execute(f"CREATE TABLE \"{name}\" AS SELECT * FROM read_parquet('{pattern}', union_by_name=true)")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_sql(root: Path, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only query; returns ``(columns, rows)``."""
    con = connect(root)
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise SQLError(f"SQL error: {_first_line(exc)}") from exc
    if not statements:
        raise InvalidOption("empty query: pass a SELECT statement")
    for st in statements:
        kind = str(st.type).rsplit(".", 1)[-1]
        if kind not in READ_STATEMENTS:
            raise SQLError(f"qcache sql is read-only: only SELECT queries are allowed (got {kind})")
    try:
        cur = con.execute(query)
        return [d[0] for d in cur.description or []], cur.fetchall()
    except duckdb.Error as exc:
        have = ", ".join(table_names(root)) or "none yet (run `qcache analyze all`)"
        raise SQLError(f"SQL error: {_first_line(exc)} (tables: {have})") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300]
