"""The ``gram_terms`` table: each layer's own centred Gram norm, computed once and shared by analyses.

Linear CKA (``cka.py``) divides ``||Yc^T Xc||_F^2`` by ``||Xc^T Xc||_F ||Yc^T Yc||_F``; the self terms
``||Xc^T Xc||_F^2`` are products as large as the cross term (half of one, by symmetry), and redundancy
(``redundancy.py``) computes exactly that Gram for its correlations. Whichever of ``qcache analyze
redundancy`` and ``qcache compare`` meets a layer first records its self term here, and the other reuses
it, so ``compare`` after ``analyze all`` computes only the cross products (``benchmarks/compare.py``).

One row per run, layer, tap and product precision: ``n_tokens`` (rows the term summed over: only whole,
finished runs are recorded), ``gram_sq``, the debiased estimator's row sums ``sum_k`` and ``sum_kk``
(null unless a debiased CKA computed them), and ``source`` (the analysis that computed it). A part is
stamped with its run's creation id, so one left over from before ``extract --overwrite`` is never read.
The column means are not stored: they take one cheap pass over the data and are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from qcache.store import Run
from qcache.store.location import StorePath, read_parquet
from qcache.store.tables import part_name, part_state, write_table

TABLE = "gram_terms"
COLUMNS = ("layer", "tap", "n_tokens", "precision", "gram_sq", "sum_k", "sum_kk", "source")


@dataclass(frozen=True)
class Term:
    """One recorded self term (see the module docstring); ``sum_k``/``sum_kk`` None when not computed."""

    layer: int
    tap: str
    n_tokens: int
    precision: str
    gram_sq: float
    sum_k: float | None = None
    sum_kk: float | None = None
    source: str = ""


def _part(run: Run) -> StorePath:
    k = run.key
    return run.store.results / "tables" / TABLE / part_name(k.dataset, k.model, k.quant)


def _usable(run: Run) -> bool:
    """Terms are recorded and read only for finished runs with a creation id (so staleness is known)."""
    return run.complete and run.creation_id is not None


def load(run: Run) -> dict[tuple[int, str, str], Term]:
    """The run's recorded terms keyed ``(layer, tap, precision)``; empty when none are current."""
    path = _part(run)
    if not _usable(run) or part_state(path, run.creation_id) != "current":
        return {}
    table = read_parquet(path)
    out = {}
    for row in table.select(list(COLUMNS)).to_pylist():
        t = Term(**row)
        if t.n_tokens == run.layout.n_tokens:
            out[(t.layer, t.tap, t.precision)] = t
    return out


def find(
    terms: dict[tuple[int, str, str], Term], layer: int, tap: str, precision: str, *, debiased: bool = False
) -> Term | None:
    """The term of one layer among a run's ``load``-ed terms, or None (also when ``debiased`` asks for row
    sums it lacks)."""
    t = terms.get((layer, tap, precision))
    if t is None or (debiased and (t.sum_k is None or t.sum_kk is None)):
        return None
    return t


def record(run: Run, terms: list[Term]) -> None:
    """Add or replace ``terms`` in the run's part (rows of other layers, taps and precisions kept). A
    term without row sums does not replace one that has them. Nothing is written for an unfinished run."""
    if not terms or not _usable(run):
        return
    merged = load(run)
    for t in terms:
        old = merged.get((t.layer, t.tap, t.precision))
        if old is not None and old.sum_k is not None and t.sum_k is None and old.n_tokens == t.n_tokens:
            t = Term(t.layer, t.tap, t.n_tokens, t.precision, t.gram_sq, old.sum_k, old.sum_kk, t.source)
        merged[(t.layer, t.tap, t.precision)] = t
    rows = sorted(merged.values(), key=lambda t: (t.layer, t.tap, t.precision))
    k = run.key
    n = len(rows)
    cols = {c: [getattr(t, c) for t in rows] for c in COLUMNS}
    table = pa.table(
        {"dataset": [k.dataset] * n, "model": [k.model] * n, "quant": [k.quant] * n, **cols},
        schema=SCHEMA,
    )
    write_table(run.store.results, TABLE, part_name(k.dataset, k.model, k.quant), table, run.creation_id)


SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("quant", pa.string()),
        ("layer", pa.int32()),
        ("tap", pa.string()),
        ("n_tokens", pa.int64()),
        ("precision", pa.string()),
        ("gram_sq", pa.float64()),
        ("sum_k", pa.float64()),
        ("sum_kk", pa.float64()),
        ("source", pa.string()),
    ]
)
