"""Result tables: Parquet under ``<store>/tables/<name>/``, queried read-only through DuckDB.

Each analysis writes one file per run (``<dataset>--<model>--<quant>.parquet``, or per model for cross-run
tables), atomically, so re-running one run replaces only its file. ``sql`` loads every table into an
in-memory DuckDB, then switches off file-system access and locks the configuration: a query can read the
tables and nothing else, and cannot write anything anywhere. Only read statements are accepted. Beside the
tables, the views ``runs``, ``examples`` and ``tokens`` (views.py) show the runs themselves; each is built
only when a query names it.

This is the only module that speaks SQL.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .bookkeeping import TABLES, ensure_placeholder
from .errors import InvalidOption, SQLError
from .location import StorePath, read_parquet, remote_errors, write_file
from .views import VIEWS

if TYPE_CHECKING:
    from .store import Store

# Documented schemas (docs/analysis.md). Every table carries dataset, model, quant; per-layer ones, layer.
SCHEMAS: dict[str, str] = {
    "predictions": "dataset, model, quant, example_id, gold, gold_label, pred_label, pred_word, confidence, "
    "correct, "
    "label_prob, label_prob_norm, label_scoring, top_token_id, top_token, top_token_prob, correct_vocab",
    "metrics": "dataset, model, quant, reading, metric, value",
    "reliability": "dataset, model, quant, reading, bin_lo, bin_hi, count, confidence, accuracy",
    # expert: the 0-based expert of a mixture-of-experts layer's row, null for a dense tap (docs/analysis.md)
    "neuron_stats": "dataset, model, quant, layer, neuron, min, max, mean, std, frac_near_zero, dead, "
    "n_nonfinite, expert, tap",
    "dead_neurons": "dataset, model, quant, layer, activation, bound, n_tokens, n_neurons, n_dead, pct_dead, "
    "expert, tap",
    "redundancy": "dataset, model, quant, layer, layer_b, unit, bin_lo, bin_hi, pairs, expert, tap",
    "redundancy_summary": "dataset, model, quant, layer, layer_b, unit, n_neurons, n_constant, n_pairs, "
    "threshold, pairs_above, pct_above, expert, n_tokens, tap",
    "redundancy_top_pairs": "dataset, model, quant, layer, layer_b, unit, rank, neuron_a, neuron_b, abs_r, "
    "expert, tap",
    # qcache compare: one part per dataset, model and baseline; quant is the method compared with baseline
    "method_comparison": "dataset, model, baseline, quant, rank, skipped, n_examples, n_tokens, n_layers, "
    "accuracy_base, accuracy, accuracy_change, flip_share, ace_base, ace, ace_change, ece_change, "
    "brier_change, cka_mean, cka_min, cka_min_layer, cka_debiased_mean, r_median, share_r_below_0_9, "
    "dead_jaccard, salient_jaccard, reading, tap, precision, base_run_id, run_id",
    # each layer's own centred Gram norm ||Xc^T Xc||_F^2, shared by redundancy and compare (linear CKA)
    "gram_terms": "dataset, model, quant, layer, tap, n_tokens, precision, gram_sq, sum_k, sum_kk, source",
    "method_comparison_layers": "dataset, model, baseline, quant, layer, n_tokens, n_neurons, cka, "
    "cka_debiased, r_median, share_r_below_0_9, n_r_undefined, dead_jaccard, n_dead_base, n_dead, "
    "salient_jaccard, n_salient_base, n_salient",
}
READ_STATEMENTS = {"SELECT", "EXPLAIN"}
T = TypeVar("T")


def part_name(dataset: str, model: str, quant: str | None = None, variant: str | None = None) -> str:
    """``<dataset>--<model>[--<quant>][--<variant>].parquet``; ``variant`` names rows of a run that live
    beside its main part (e.g. redundancy over per-example means), so writing one keeps the other."""
    return "--".join(p for p in (dataset, model, quant, variant) if p) + ".parquet"


def run_parts(root: StorePath, name: str, dataset: str, model: str, quant: str) -> list[StorePath]:
    """Every part of table ``name`` written for one run: its main part and its variants."""
    stem = part_name(dataset, model, quant).removesuffix(".parquet")
    parts = table_parts(root, name)
    return [p for p in parts if p.name == f"{stem}.parquet" or p.name.startswith(f"{stem}--")]


# Schema metadata of a per-run part: the creation id (the run's ``_created``) of the run it was computed from,
# so a part left over from before ``extract --overwrite`` recreated the run is known to be stale...
RUN_ID_KEY = b"qcache.run_id"
# ...and the run's committed token rows it was computed on, so a part computed with ``--allow-partial`` is
# known to be out of date once the extraction has committed more rows (``part_state``: "partial").
N_TOKENS_KEY = b"qcache.n_tokens"
# ...and the options that shaped its rows (JSON), so rows of other layers are only kept beside new ones
# computed the same way (``part_options``)
OPTIONS_KEY = b"qcache.options"


def write_table(
    root: StorePath,
    name: str,
    part: str,
    table: pa.Table,
    run_id: str | None = None,
    n_tokens: int | None = None,
    options: str | None = None,
) -> StorePath:
    """Atomically write ``table`` as ``<root>/tables/<name>/<part>`` (``root``: a store's ``results``),
    stamped with ``run_id``, the creation id of the run it comes from, ``n_tokens``, the committed token
    rows of the run it was computed on (``Run.tokens_done``), and ``options`` (a JSON text of the analysis
    options its rows depend on), when given."""
    path = root / TABLES / name / part
    if (root / "zarr.json").exists():  # tables beside a store's runs: mark the directory for Zarr readers
        ensure_placeholder(root, TABLES)
    stamps = {}
    if run_id is not None:
        stamps[RUN_ID_KEY] = run_id.encode()
    if n_tokens is not None:
        stamps[N_TOKENS_KEY] = str(int(n_tokens)).encode()
    if options is not None:
        stamps[OPTIONS_KEY] = options.encode()
    if stamps:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **stamps})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_file(path, sink.getvalue())
    return path


def _part_schema(path: StorePath) -> pa.Schema:
    if isinstance(path, Path):
        return pq.read_schema(path)
    with remote_errors(path), path.open("rb") as fh:
        return pq.read_schema(fh)


def part_run_id(path: StorePath) -> str | None:
    """The run creation id a part was stamped with (None: unstamped, or written before stamps existed)."""
    value = (_part_schema(path).metadata or {}).get(RUN_ID_KEY)
    return value.decode() if value is not None else None


def part_stamps(path: StorePath) -> dict[str, str]:
    """The stamps a part was written with: ``run_id``, ``n_tokens``, ``options`` (those it has)."""
    meta = _part_schema(path).metadata or {}
    keys = {RUN_ID_KEY: "run_id", N_TOKENS_KEY: "n_tokens", OPTIONS_KEY: "options"}
    return {name: meta[key].decode() for key, name in keys.items() if key in meta}


def part_n_tokens(path: StorePath) -> int | None:
    """The committed token rows of its run a part was computed on: its ``n_tokens`` stamp, else (parts
    written before the stamp) the largest ``n_tokens`` of its dense rows (``expert`` null) where the table
    has that column (dead_neurons, redundancy_summary, activation_drift); None when neither says."""
    schema = _part_schema(path)
    value = (schema.metadata or {}).get(N_TOKENS_KEY)
    if value is not None:
        return int(value.decode())
    if "n_tokens" not in schema.names:
        return None
    table = read_parquet(path, columns=[c for c in ("n_tokens", "expert") if c in schema.names])
    counts = table["n_tokens"]
    if "expert" in table.column_names:
        counts = counts.filter(table["expert"].is_null())
    top = pc.max(counts).as_py() if len(counts) else None
    return None if top is None else int(top)


def part_state(path: StorePath, run_id: str | None, n_tokens: int | None = None) -> str:
    """``missing``; ``stale`` (from an earlier creation of its run, or unstamped); ``partial`` (computed on
    fewer committed token rows than the ``n_tokens`` its run has now: ``--allow-partial`` before the
    extraction finished); else ``current`` (any part is, for a run without an id)."""
    if not path.exists():
        return "missing"
    if run_id is not None and part_run_id(path) != run_id:
        return "stale"
    if n_tokens is not None:
        done = part_n_tokens(path)
        if done is not None and done < n_tokens:
            return "partial"
    return "current"


def table_parts(root: StorePath, name: str) -> list[StorePath]:
    """The Parquet files of one table, sorted."""
    base = root / "tables" / name
    return sorted(base.glob("*.parquet"), key=str) if base.exists() else []


def table_names(root: StorePath) -> list[str]:
    base = root / "tables"
    if not base.exists():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and any(d.glob("*.parquet")))


def connect(
    root: StorePath, store: Store | None = None, views: tuple[str, ...] = tuple(VIEWS)
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one table per result table and no file-system access left.

    Local tables are scanned by DuckDB itself; remote ones are fetched through fsspec, one file at a time.
    With ``store``, each of ``views`` (``runs``, ``examples``, ``tokens``: views.py) that no result table
    shadows is a view over that table of the store's runs.
    """
    con = duckdb.connect(":memory:")
    names = table_names(root)
    if store is not None:
        for view in views:
            if view in names:
                continue
            con.register(f"_view_{view}", VIEWS[view](store))
            con.execute(f'CREATE VIEW "{view}" AS SELECT * FROM "_view_{view}"')
    for name in names:
        if isinstance(root, Path):
            pattern = str(root / "tables" / name / "*.parquet").replace("'", "''")
            source = f"read_parquet('{pattern}', union_by_name=true)"
        else:
            parts = [read_parquet(f) for f in table_parts(root, name)]
            parts = [p for p in parts if p.num_rows] or parts[:1]
            con.register("_part", pa.concat_tables(parts, promote_options="permissive"))
            source = "_part"
        con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM {source}')
        if source == "_part":
            con.unregister("_part")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def named_views(query: str) -> tuple[str, ...]:
    """The views (``runs``, ``examples``, ``tokens``) whose name occurs in ``query`` as a word: a superset of
    those it reads (a column or string spelled the same builds one for nothing), without parsing SQL."""
    return tuple(v for v in VIEWS if re.search(rf"\b{v}\b", query, flags=re.IGNORECASE))


def run_sql(
    root: StorePath, query: str, store: Store | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only query; returns ``(columns, rows)``. With ``store``, the views it names are there."""

    def fetch(con: duckdb.DuckDBPyConnection) -> tuple[list[str], list[tuple[Any, ...]]]:
        cur = con.execute(query)
        return [d[0] for d in cur.description or []], cur.fetchall()

    return _checked(root, query, fetch, store)


def sql_table(root: StorePath, query: str, store: Store | None = None) -> pa.Table:
    """Run one read-only query; returns its result as an Arrow table (column types kept, also when empty).
    With ``store``, the views it names (``runs``, ``examples``, ``tokens``) are there.

    Raises ``SQLError`` when DuckDB rejects the query or it would write, ``InvalidOption`` when it is empty.
    """

    def fetch(con: duckdb.DuckDBPyConnection) -> pa.Table:
        rel = con.sql(query)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()  # DuckDB 2 : 1

    return _checked(root, query, fetch, store)


def _checked(
    root: StorePath, query: str, fetch: Callable[[duckdb.DuckDBPyConnection], T], store: Store | None
) -> T:
    """Accept only read statements in ``query``, then ``fetch`` its result from the tables under ``root``."""
    con = connect(root, store, named_views(query))
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise SQLError(f"SQL error: {_message(exc)}") from exc
    if not statements:
        raise InvalidOption("empty query: pass a SELECT statement")
    if len(statements) > 1:  # DuckDB would run them all and return the last result only
        raise SQLError(
            f"the query holds {len(statements)} statements: qcache sql runs one at a time (only the last "
            "result would be shown); pass each SELECT on its own, or combine them with UNION ALL"
        )
    for st in statements:
        kind = str(st.type).rsplit(".", 1)[-1]
        if kind not in READ_STATEMENTS:
            raise SQLError(f"qcache sql is read-only: only SELECT queries are allowed (got {kind})")
    try:
        return fetch(con)
    except duckdb.Error as exc:
        have = ", ".join(table_names(root)) or "none yet (run `qcache analyze all`)"
        views = f"; views: {', '.join(VIEWS)}" if store is not None else ""
        raise SQLError(f"SQL error: {_message(exc)} (tables: {have}{views})") from exc


def _message(exc: Exception, limit: int = 1000) -> str:
    """DuckDB's message on one line, its hints kept ("Did you mean ...?", "Candidate bindings: ...").

    DuckDB puts the error on the first line, its hints on the next ones, then a ``LINE n:`` excerpt of the
    query with a caret under the fault; the caret means nothing once joined, so that excerpt is dropped.
    """
    lines = []
    for line in str(exc).strip().splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."
