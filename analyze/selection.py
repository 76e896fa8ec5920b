"""What every ``qcache analyze`` command shares: its options, the runs and layers they select, and how a
run's rows are written to its part of a result table."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from qcache.store import Run, Store, open_store
from qcache.store.errors import InvalidOption, RunNotFound
from qcache.store.keys import BITS_TO_QUANT
from qcache.store.location import StorePath, read_parquet
from qcache.store.tables import part_name, part_stamps, write_table

Log = Callable[[str], None]
# Part-name variant of the redundancy tables over per-example means (``unit`` = "example")
REDUNDANCY_VARIANT = "per-example"


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options shared by every ``qcache analyze`` command."""

    store: Store | str | Path  # a Store, or a directory or URL to open
    dataset: str | None = None
    model: str | None = None
    bits: int | None = None
    layers: tuple[int, ...] | None = None
    tap: str = "act"
    scheduler: str | None = None
    memory_limit: int | None = None
    allow_partial: bool = False
    # calibration
    reading: str = "paper"
    n_ranges: int = 10
    # dead neurons
    dead_threshold: float = 0.1
    relu_eps: float = 0.0
    # redundancy
    corr_threshold: float = 0.8
    per_example: bool = False
    cross_layer: bool = False
    top_pairs: int = 0

    def __post_init__(self) -> None:
        """Refuse thresholds no analysis can use, before any run is read (``InvalidOption``)."""
        for option, value in (("--dead-threshold", self.dead_threshold), ("--relu-eps", self.relu_eps)):
            check_threshold(option, value, upper=None)
        check_threshold("--r-threshold", self.corr_threshold, upper=1.0)
        if isinstance(self.top_pairs, bool) or not isinstance(self.top_pairs, int) or self.top_pairs < 0:
            raise InvalidOption(f"--top-pairs {self.top_pairs!r} must be an int >= 0 (0: keep none)")


def check_threshold(option: str, value: object, upper: float | None) -> None:
    """``InvalidOption`` unless ``value`` is a finite number in ``[0, upper]`` (``[0, inf)`` without
    ``upper``): |activation| bounds and |Pearson r| thresholds are never negative or NaN."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (upper is not None and value > upper):  # type: ignore[operator]
        span = f"in [0, {upper:g}]" if upper is not None else "a finite number >= 0"
        raise InvalidOption(f"{option} {value!r} must be {span}")


def select_runs(cfg: AnalyzeConfig) -> list[Run]:
    s = open_store(cfg.store)
    keys = s.select(dataset=cfg.dataset, model=cfg.model, quant=selected_quant(cfg))
    if not keys:
        have = ", ".join(str(k) for k in s.runs()) or "none"
        raise RunNotFound(f"no run matches the filters in {s.root} (runs here: {have})")
    runs = [s.run(k) for k in keys]
    for run in runs:
        run.require_complete(cfg.allow_partial)
    return runs


def selected_quant(cfg: AnalyzeConfig) -> str | None:
    """The quantization ``--bits`` selects (None: all)."""
    if cfg.bits is not None and cfg.bits not in BITS_TO_QUANT:
        raise InvalidOption(f"--bits {cfg.bits} is not supported: use 32, 16, 8 or 4")
    return BITS_TO_QUANT[cfg.bits] if cfg.bits is not None else None


def chosen_layers(run: Run, cfg: AnalyzeConfig) -> list[int]:
    if cfg.layers is None:
        return run.layers
    missing = [n for n in cfg.layers if n not in run.layers]
    if missing:
        raise InvalidOption(f"layer(s) {missing} are not cached in {run.key} (cached: {run.layers})")
    return list(cfg.layers)


# Types of columns that may hold nulls (a dense row's expert, an expert's counts with too few tokens): set
# so that a part whose rows are all null keeps the column's type.
NULLABLE = {
    "expert": pa.int32(),
    "n_tokens": pa.int64(),
    "n_dead": pa.int64(),
    "pct_dead": pa.float64(),
    "n_constant": pa.int64(),
    "n_pairs": pa.int64(),
    "pairs_above": pa.int64(),
    "pct_above": pa.float64(),
}


def keyed(run: Run, columns: dict[str, object]) -> pa.Table:
    k = run.key
    n = len(next(iter(columns.values())))  # type: ignore[arg-type]
    typed = {
        name: pa.array(v, NULLABLE[name]) if name in NULLABLE and isinstance(v, list) else v
        for name, v in columns.items()
    }
    return pa.table({"dataset": [k.dataset] * n, "model": [k.model] * n, "quant": [k.quant] * n, **typed})


def key_parts(run: Run) -> tuple[str, str, str]:
    return run.key.dataset, run.key.model, run.key.quant


def tap_variant(tap: str, variant: str | None = None) -> str | None:
    """The part-name variant of a tap's rows: the paper's ``act`` keeps the run's main part (and the parts
    written before taps were recorded), other taps get ``tap-<tap>`` beside it, so analysing ``--tap
    resid`` never replaces the ``act`` rows."""
    if tap == "act":
        return variant
    return "--".join(v for v in (f"tap-{tap}", variant) if v)


def write_part(
    run: Run,
    name: str,
    table: pa.Table,
    variant: str | None = None,
    *,
    layers: list[int] | None = None,
    options: dict[str, object] | None = None,
) -> None:
    """One run's part of a result table, stamped with the creation of the run it was computed from and its
    committed token rows (so a part computed under ``--allow-partial`` reads as out of date once the run
    has more); ``variant`` writes a part beside the run's main one (see ``part_name``).

    ``layers``: the layers ``table`` holds (per-layer tables). The part's rows of other layers are kept
    when it comes from the same creation of the run, the same committed rows and the same ``options``
    (stamped: e.g. tap and thresholds), so analysing ``--layers 15`` does not drop layer 1's rows; a row
    pairing a kept layer with one of ``layers`` (``layer_b``, cross-layer redundancy) is replaced."""
    tap = None if options is None else options.get("tap")
    if tap is not None:  # analyses of a tap: a column saying which, and a part per tap (act: the main one)
        table = table.append_column("tap", pa.array([str(tap)] * table.num_rows, pa.string()))
        variant = tap_variant(str(tap), variant)
    part = part_name(*key_parts(run), variant)
    stamp = None if options is None else json.dumps(options, sort_keys=True)
    if layers is not None:
        table = _with_other_layers(run.store.results / "tables" / name / part, table, layers, run, stamp)
    write_table(run.store.results, name, part, table, run.creation_id, run.tokens_done, stamp)


def _with_other_layers(
    path: StorePath, table: pa.Table, layers: list[int], run: Run, options: str | None
) -> pa.Table:
    """``table`` plus the rows of other layers of the part at ``path``, when that part is current for the
    run and was computed with the same ``options``; else ``table`` alone."""
    if not path.exists():
        return table
    stamps = part_stamps(path)
    same = (
        stamps.get("run_id") == run.creation_id
        and stamps.get("n_tokens") == str(run.tokens_done)
        and stamps.get("options") == options
    )
    if not same:
        return table
    old = read_parquet(path)
    if not old.num_rows or "layer" not in old.column_names:
        return table
    keep = pc.invert(pc.is_in(old["layer"], pa.array(layers, old["layer"].type)))
    if "layer_b" in old.column_names:
        keep = pc.and_(keep, pc.invert(pc.is_in(old["layer_b"], pa.array(layers, old["layer_b"].type))))
    kept = old.filter(keep)
    if not kept.num_rows:
        return table
    merged = pa.concat_tables([kept.replace_schema_metadata(None), table], promote_options="permissive")
    return merged.take(pc.sort_indices(merged, [("layer", "ascending")]))  # stable: each layer's order kept


def write_rows(
    run: Run,
    name: str,
    names: tuple[str, ...],
    rows: list[tuple],
    variant: str | None = None,
    *,
    layers: list[int] | None = None,
    options: dict[str, object] | None = None,
) -> pa.Table:
    """Write ``rows`` (tuples in ``names`` order) as the run's part of table ``name`` (``write_part``);
    returns the rows written by this call."""
    cols = (
        {n: list(v) for n, v in zip(names, zip(*rows, strict=True), strict=True)}
        if rows
        else {n: [] for n in names}
    )
    table = keyed(run, cols) if rows else pa.table({"dataset": [], "model": [], "quant": [], **cols})
    write_part(run, name, table, variant, layers=layers, options=options)
    return table
