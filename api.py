"""The Python entry point: ``qcache.open(store)`` and ``qcache.compare(run_a, run_b, layer)``.

A thin layer over ``qcache.store`` (reading) and ``qcache.analyze.drift`` (comparing) that hands back what a
notebook wants: lazy Dask arrays and ``xarray.DataArray``s for activations, pandas DataFrames (or Arrow
tables) for the token index, the examples, the predictions and SQL results. Reading only: nothing here
writes to the store. docs/python.md is the tour; tests/test_python_tour.py runs it.

>>> import qcache
>>> s = qcache.open("qcache-store")                 # doctest: +SKIP
>>> run = s.run("boolq/smollm2-135m/nf4")           # doctest: +SKIP
>>> run.dataarray(15)                               # doctest: +SKIP
<xarray.DataArray 'act' (token: 12345, neuron: 1536)> ...
"""

from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from qcache.store import Run as StoreRun
from qcache.store import RunKey
from qcache.store import Store as StoreRoot
from qcache.store.errors import IncompleteRun, InvalidName, InvalidOption, RunMismatch, RunNotFound
from qcache.store.keys import check_layer
from qcache.store.location import RemotePath
from qcache.store.store import open_store
from qcache.store.tables import sql_table, table_names

if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr

__all__ = ["Run", "Store", "compare", "open"]
_LISTED = 20  # runs named in a "not found" message before "... and N more"


def open(
    path: str | os.PathLike[str] | RemotePath | None = None, *, results: str | os.PathLike[str] | None = None
) -> Store:
    """Open the store at ``path`` for reading: a directory, or a URL (s3://, gs://, https://, memory://).

    ``path`` defaults to ``$QCACHE_STORE`` or ``./qcache-store``; ``results`` reads the result tables from
    another directory (as ``--results``). Raises ``StoreError`` when there is no qcache store there.
    """
    return Store(open_store(path, results=results))


class Store:
    """A qcache store opened for reading (``qcache.open``). ``.root``: its directory or URL."""

    def __init__(self, store: StoreRoot) -> None:
        self._store = store

    @property
    def root(self) -> Any:
        return self._store.root

    def runs(self) -> list[RunKey]:
        """The key of every run (``str(key)`` is ``DATASET/MODEL/QUANT``), sorted. Runs written by a qcache of
        schema 1 read here as any other, but plain zarr/xarray need them migrated (``qcache migrate``): the
        store's ``repr`` says how many there are."""
        return self._store.runs()

    def runs_table(self) -> pd.DataFrame:
        """One row per run: ``run`` (its key), dataset, model, quant, complete (bool), n_examples, n_tokens,
        n_neurons (MLP width), layers (1-based, cached), taps, dtype (of the activations on disk)."""
        rows = []
        for key in self.runs():
            run = self._store.run(key)
            m = run.manifest
            rows.append(
                {
                    "run": str(key),
                    "dataset": key.dataset,
                    "model": key.model,
                    "quant": key.quant,
                    "complete": run.complete,
                    "n_examples": run.layout.n_examples,
                    "n_tokens": run.layout.n_tokens,
                    "n_neurons": m.get("n_neurons"),
                    "layers": list(m["layers"]),
                    "taps": list(m["taps"]),
                    "dtype": m.get("dtype"),
                }
            )
        return pd.DataFrame(rows, columns=list(_RUN_COLUMNS))

    def run(
        self,
        key: str | RunKey | None = None,
        *,
        dataset: str | None = None,
        model: str | None = None,
        quant: str | None = None,
    ) -> Run:
        """One run, by key (``"boolq/smollm2-135m/nf4"``) or by ``dataset=``/``model=``/``quant=`` that
        together match exactly one run.

        Raises ``RunNotFound`` (a ``LookupError``) naming the runs that exist when none matches,
        ``InvalidName`` for a key that is not ``DATASET/MODEL/QUANT`` or an unknown quant, and
        ``InvalidOption`` when the filters match several runs or are given with a key.
        """
        have = self.runs()
        if key is not None:
            if dataset is not None or model is not None or quant is not None:
                raise InvalidOption("pass a run key or dataset=/model=/quant=, not both")
            wanted = key if isinstance(key, RunKey) else RunKey.parse(str(key))
            if wanted not in have:
                hint = _hints(have, dataset=wanted.dataset, model=wanted.model, quant=wanted.quant)
                raise RunNotFound(f"no run {wanted} in store {self.root}{hint}; {_listing(have)}")
            return Run(self._store.run(wanted))
        found = self._store.select(dataset=dataset, model=model, quant=quant)
        filters = (("dataset", dataset), ("model", model), ("quant", quant))
        asked = ", ".join(f"{n}={v!r}" for n, v in filters if v is not None)
        if not found:
            what = f"matches {asked}" if asked else "exists"
            hint = _hints(have, dataset=dataset, model=model, quant=quant)
            raise RunNotFound(f"no run {what} in store {self.root}{hint}; {_listing(have)}")
        if len(found) > 1:
            raise InvalidOption(
                f"{len(found)} runs match {asked or 'no filter'} ({', '.join(map(str, found[:_LISTED]))}): "
                "name the run, or add dataset=, model= or quant= to pick one"
            )
        return Run(self._store.run(found[0]))

    def tables(self) -> list[str]:
        """Names of the result tables written so far (``qcache analyze ...``), for ``sql``."""
        return table_names(self._store.results)

    def sql(self, query: str, *, arrow: bool = False) -> pd.DataFrame | pa.Table:
        """Run one read-only DuckDB query over the result tables and the views ``runs``, ``examples`` and
        ``tokens`` (as ``qcache sql``; docs/store.md); a pandas DataFrame, or an Arrow table with
        ``arrow=True``. Raises ``SQLError`` for a rejected or writing query, or more than one statement."""
        table = sql_table(self._store.results, query, store=self._store)
        return table if arrow else table.to_pandas()

    def __repr__(self) -> str:
        old = len(self._store.unmigrated())
        note = f", {old} of schema 1 (qcache migrate makes them readable by plain zarr/xarray)" if old else ""
        return f"<qcache.Store {self.root}: {len(self.runs())} runs{note}>"


_RUN_COLUMNS = (
    "run",
    "dataset",
    "model",
    "quant",
    "complete",
    "n_examples",
    "n_tokens",
    "n_neurons",
    "layers",
    "taps",
    "dtype",
)


class Run:
    """One run of a store (``Store.run``). Attributes of the underlying ``qcache.store.Run`` (``manifest``,
    ``layout``, ``zarr_array``, ``attributions`` ...) are reachable here too; ``.reader`` is that object."""

    def __init__(self, reader: StoreRun) -> None:
        self.reader = reader

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "reader":  # (not set yet: no recursion)
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {n for n in dir(self.reader) if not n.startswith("_")})

    @property
    def key(self) -> RunKey:
        return self.reader.key

    @property
    def layers(self) -> list[int]:
        """The cached layers, 1-based."""
        return self.reader.layers

    @property
    def taps(self) -> list[str]:
        """The cached tap points: ``act`` (the MLP activation's output), ``down-in``, ``resid``."""
        return list(self.reader.manifest["taps"])

    @property
    def complete(self) -> bool:
        return self.reader.complete

    def activations(self, layer: int, tap: str = "act", *, allow_partial: bool = False) -> da.Array:
        """Lazy ``(tokens, neurons)`` Dask array of a 1-based ``layer``, in the stored dtype (float16 or
        float32). Raises ``InvalidOption`` for a layer that is not an int, ``InvalidName`` for a layer or tap
        that is not cached (the message lists what is), and ``IncompleteRun`` for an unfinished run unless
        ``allow_partial``: then the rows of units not yet extracted read as NaN (``rows_done()``: the real
        rows; ``dataarray(..., allow_partial=True)`` keeps only those)."""
        return self.reader.activations(layer, tap, allow_partial=allow_partial)

    def attributions(self, layer: int, *, allow_partial: bool = False) -> da.Array:
        """Lazy ``(tokens, neurons)`` float32 Integrated-Gradients attributions of a 1-based ``layer``;
        raises as ``activations``, and ``InvalidName`` when the run holds no attributions (extract with
        ``--attributions``)."""
        return self.reader.attributions(layer, allow_partial=allow_partial)

    @property
    def moe_layers(self) -> dict[int, dict[str, Any]]:
        """``{layer: entry}`` of the mixture-of-experts layers (``n_experts``, ``top_k``, ``expert_neurons``,
        ``shared_expert``, ``expert_taps`` ...; docs/store.md); ``{}`` for a dense model."""
        return self.reader.moe_layers

    def expert_activations(self, layer: int, expert: int, tap: str = "act") -> da.Array:
        """Lazy ``(tokens, expert_neurons)`` Dask array of ``expert`` (0-based) of mixture-of-experts
        ``layer``, the stored dtype, NaN in every row not routed to it (``routed_rows`` selects the others).
        Raises ``InvalidName`` for a layer that is not MoE, an expert out of range or a tap not stored."""
        return self.reader.expert_activations(layer, expert, tap)

    def router(self, layer: int) -> tuple[da.Array, da.Array]:
        """``(topk_ids, topk_weights)`` of mixture-of-experts ``layer``: lazy ``(tokens, top_k)`` int16 expert
        ids (-1 where not extracted) and float32 mixing weights (NaN where not extracted)."""
        return self.reader.router(layer)

    def expert_tokens(self, layer: int) -> np.ndarray:
        """``(n_experts,)`` int64: extracted tokens routed to each expert of mixture-of-experts ``layer``."""
        return self.reader.expert_tokens(layer)

    def dataarray(
        self, layer: int, tap: str = "act", *, expert: int | None = None, allow_partial: bool = False
    ) -> xr.DataArray:
        """The activations of a 1-based ``layer`` as a lazy ``xarray.DataArray`` (Dask-backed).

        Dims ``(token, neuron)``, the token axis in store order (examples one after another). Coordinates:
        ``example_id``, ``position`` (0-based within its example), ``token_id`` (int32, on ``token``),
        ``token`` (the token's text, str, when the store holds token strings), ``neuron`` (0-based, int32;
        for ``tap="resid"`` the hidden-state dimension). Values: the stored dtype, the model's own units.
        ``tap="attributions"`` gives the Integrated-Gradients attributions (float32) instead.

        ``expert``: of a mixture-of-experts layer, that expert's values on only the tokens routed to it
        (its rows of the token axis, coordinates kept); without it such a layer gives its shared expert,
        and one without a shared expert is refused.

        Raises ``InvalidName`` for a layer, tap or expert not cached, ``IncompleteRun`` for an unfinished
        run unless ``allow_partial``, which keeps only the rows of the units extracted so far.
        """
        import xarray as xr

        layer = check_layer(layer)
        complete = self.complete
        if not complete and not allow_partial:
            raise IncompleteRun(
                f"run {self.key} is {100 * self.reader.fraction_done:.1f}% extracted: finish it, or pass "
                "allow_partial=True for the rows extracted so far"
            )
        entry = self.reader.moe_layers.get(layer)
        if expert is not None:
            data = self.reader.expert_activations(layer, expert, tap)
            rows = self.reader.routed_rows(layer, expert)  # committed rows only
        else:
            if entry is not None and tap in ("act", "down-in") and not entry.get("shared_expert"):
                raise InvalidName(
                    f"layer {layer} of {self.key} is a mixture-of-experts layer without a shared expert: "
                    f"pass expert= (0 to {int(entry['n_experts']) - 1}) for one expert on its routed tokens"
                )
            data = self.reader.activations(layer, tap, allow_partial=True)  # refused above, unless allowed
            rows = None if complete else self.reader.rows_done()
        tokens = self.tokens()
        if rows is not None:
            data, tokens = data[rows], tokens[rows]
        coords: dict[str, Any] = {
            name: ("token", tokens[name].to_numpy()) for name in ("example_id", "position", "token_id")
        }
        if "token" in tokens:
            coords["token"] = ("token", tokens["token"].to_numpy())
        coords["neuron"] = ("neuron", np.arange(data.shape[1], dtype=np.int32))
        k = self.key
        attrs = {"run": str(k), "dataset": k.dataset, "model": k.model, "quant": k.quant}
        attrs.update({"layer": layer, "tap": tap}, **({} if expert is None else {"expert": int(expert)}))
        return xr.DataArray(data, dims=("token", "neuron"), coords=coords, name=tap, attrs=attrs)

    def _token_strings(self) -> np.ndarray | None:
        """``(tokens,)`` str from ``qcache.store.Run.token_strings``; None for a run extracted before token
        strings were stored (schema 1: its tables and arrays keep working, without the ``token`` column)."""
        return np.asarray(self.reader.token_strings()) if self.reader.has_token_strings else None

    def tokens(self, *, arrow: bool = False) -> pd.DataFrame | pa.Table:
        """One row per row of the token axis (every run of a dataset and model has the same rows):
        ``example_id``, ``position`` (0-based in its example), ``token_id`` (int32, the tokenizer's id), and
        ``token`` (str) when the store holds token strings."""
        table = self.reader.token_index()
        strings = self._token_strings()
        if strings is not None:
            table = table.append_column("token", pa.array(strings, pa.string()))
        return table if arrow else table.to_pandas()

    def examples(self, *, arrow: bool = False) -> pd.DataFrame | pa.Table:
        """One row per example: ``example_id``, ``start``/``length`` (its rows of the token axis), ``gold``
        (int, index into the label words) and ``gold_word`` (the word), ``n_truncated`` (tokens cut from its
        front by ``--max-length``), ``source_row`` (row of the source dataset) and ``prompt`` (the exact text
        its tokens encode; null for runs extracted before prompts were stored)."""
        table = self.reader.examples()
        if arrow:
            return table
        frame = table.to_pandas()
        if table["prompt"].null_count:  # None, as documented, not the NaN of pandas' string dtype
            frame["prompt"] = pd.Series(table["prompt"].to_pylist(), index=frame.index, dtype=object)
        return frame

    def predictions(self, *, arrow: bool = False) -> pd.DataFrame | pa.Table:
        """One row per extracted example, by ``example_id``: the model's answer under both readings
        (docs/analysis.md: ``label_prob``, ``label_prob_norm``, ``pred_label``, ``confidence``, ``correct``,
        ``top_token_id``, ``top_token``, ``top_token_prob``, ``correct_vocab``); probabilities in [0, 1]."""
        table = self.reader.predictions()
        return table if arrow else table.to_pandas()

    def __repr__(self) -> str:
        lay = self.reader.layout
        state = "" if self.complete else f", {100 * self.reader.fraction_done:.0f}% extracted"
        return (
            f"<qcache.Run {self.key}: {lay.n_examples} examples, {lay.n_tokens} tokens, "
            f"layers {self.layers}, taps {self.taps}{state}>"
        )


def compare(
    run_a: Run | StoreRun, run_b: Run | StoreRun, layer: int | None = None, *, tap: str = "act"
) -> pd.DataFrame:
    """Per-neuron drift of ``run_b`` from ``run_a`` on the same tokens (analyze/drift.py, as ``qcache analyze
    drift``): for each neuron ``j`` of ``layer`` (default: every layer cached in both), with ``a`` and ``b``
    its activations over the tokens where both are finite, ``r`` = Pearson correlation (NaN when either is
    constant), ``mad`` = mean ``|b - a|``, ``rel_rms`` = ``sqrt(mean((b - a)^2) / mean(a^2))``.

    Returns a DataFrame with columns ``layer``, ``neuron`` (int32), ``r``, ``mad``, ``rel_rms`` (float64;
    ``mad`` in activation units), one row per layer and neuron. Raises ``IncompleteRun`` for an unfinished
    run, ``RunMismatch`` when the runs' token axes differ (other tokens, other examples, other width),
    ``InvalidName`` for a layer or tap not cached in both, and ``InvalidOption`` for a layer that is not an
    int or a run given as anything but a run of an opened store (a key string, say).
    """
    from qcache.analyze.drift import mismatch, pair_drift

    for name, r in (("run_a", run_a), ("run_b", run_b)):
        if not isinstance(r, (Run, StoreRun)):
            raise InvalidOption(
                f"qcache.compare takes runs, got {name}={r!r} ({type(r).__name__}): pass runs opened from "
                "the store, e.g. s = qcache.open(STORE); qcache.compare(s.run(KEY_A), s.run(KEY_B), layer)"
            )
    if layer is not None:
        layer = check_layer(layer)
    a, b = (r.reader if isinstance(r, Run) else r for r in (run_a, run_b))
    for run in (a, b):
        if not run.complete:
            raise IncompleteRun(
                f"run {run.key} is {100 * run.fraction_done:.1f}% extracted: compare needs both runs finished"
            )
    reason = mismatch(a, b)
    if reason is not None:
        raise RunMismatch(f"cannot compare {a.key} with {b.key}: {reason}")
    frame = pd.DataFrame(pair_drift(a, b, tap=tap, layers=None if layer is None else [layer]))
    frame.attrs.update({"a": str(a.key), "b": str(b.key), "tap": tap})
    return frame


def _listing(keys: list[RunKey]) -> str:
    if not keys:
        return "the store holds no run yet (qcache extract)"
    names = ", ".join(map(str, keys[:_LISTED]))
    more = f" and {len(keys) - _LISTED} more (qcache ls)" if len(keys) > _LISTED else ""
    return f"runs here: {names}{more}"


def _hints(keys: list[RunKey], **asked: str | None) -> str:
    """``: no dataset 'boolqq' (did you mean 'boolq'?)`` for each asked part that no run has."""
    out = []
    for part, value in asked.items():
        if value is None:
            continue
        known = sorted({getattr(k, part) for k in keys})
        if value in known:
            continue
        close = difflib.get_close_matches(value, known, n=1)
        out.append(f"no {part} {value!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ": " + ", ".join(out) if out else ""
