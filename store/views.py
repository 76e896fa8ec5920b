"""The runs themselves as tables for ``qcache sql``: one row per run, per example and per token.

Built from the store on demand (tables.py registers one as a DuckDB view only when a query names it), so a
query over the result tables never reads token arrays. Every row carries ``run`` (``dataset/model/quant``)
and ``dataset, model, quant``, the keys the result tables join on.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from .reader import Run
    from .store import Store

# Documented schemas (docs/store.md, "SQL views").
VIEW_SCHEMAS: dict[str, str] = {
    "runs": "run, dataset, model, quant, method, quant_config, model_source, model_revision, architecture, "
    "family, activation, n_layers, n_neurons, dtype, layers, taps, attributions, dataset_name, "
    "dataset_source, template, labels, split, seed, limit, chat_template, system_prompt, label_scoring, "
    "batching, batch_size, max_length, chunk_rows, n_examples, n_tokens, n_truncated_examples, "
    "qcache_version, python_version, torch_version, transformers_version, bitsandbytes_version, versions, "
    "device, created_at, command, schema, fingerprint, units_done, units_total, complete, has_token_strings",
    "examples": "run, dataset, model, quant, example_id, gold, gold_word, prompt, length, n_truncated, "
    "source_row",
    "tokens": "run, dataset, model, quant, example_id, position, token_id, token",
}

_KEYS = (("run", pa.string()), ("dataset", pa.string()), ("model", pa.string()), ("quant", pa.string()))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _when(text: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


def _run_row(run: Run) -> dict[str, Any]:
    m = run.manifest
    data = m.get("dataset") or {}
    versions = m.get("versions") or {}
    prompting = m.get("prompting") or {}
    batching = m.get("batching") or {}
    key = run.key
    return {
        "run": str(key),
        "dataset": key.dataset,
        "model": key.model,
        "quant": key.quant,
        "method": m.get("method", m.get("quant", key.quant)),
        "quant_config": _json(m.get("quant_config")),
        "model_source": m.get("model_source"),
        "model_revision": m.get("model_revision"),
        "architecture": m.get("architecture"),
        "family": m.get("family"),
        "activation": m.get("activation"),
        "n_layers": m.get("n_layers"),
        "n_neurons": m.get("n_neurons"),
        "dtype": m.get("dtype"),
        "layers": list(m.get("layers") or []),
        "taps": list(m.get("taps") or []),
        "attributions": bool(m.get("attributions")),
        "dataset_name": data.get("name"),
        "dataset_source": data.get("source"),
        "template": data.get("template"),
        "labels": [str(w) for w in data.get("labels") or []],
        "split": data.get("split"),
        "seed": data.get("seed"),
        "limit": data.get("limit"),
        "chat_template": bool(prompting.get("chat_template", False)),
        "system_prompt": prompting.get("system_prompt"),
        "label_scoring": m.get("label_scoring", "first-token"),
        "batching": batching.get("mode", "length-sorted" if batching else None),
        "batch_size": batching.get("batch_size"),
        "max_length": m.get("max_length"),
        "chunk_rows": m.get("chunk_rows"),
        "n_examples": m.get("n_examples"),
        "n_tokens": m.get("n_tokens"),
        "n_truncated_examples": m.get("n_truncated_examples"),
        "qcache_version": versions.get("qcache"),
        "python_version": versions.get("python"),
        "torch_version": versions.get("torch"),
        "transformers_version": versions.get("transformers"),
        "bitsandbytes_version": versions.get("bitsandbytes"),
        "versions": _json(versions or None),
        "device": m.get("device"),
        "created_at": _when(m.get("created_at")),
        "command": m.get("command"),
        "schema": m.get("schema"),
        "fingerprint": m.get("fingerprint"),
        "units_done": len(run.done_units()),
        "units_total": run.layout.n_units,
        "complete": run.complete,
        "has_token_strings": run.has_token_strings,
    }


RUNS_SCHEMA = pa.schema(
    [
        *_KEYS,
        *((n, pa.string()) for n in ("method", "quant_config", "model_source", "model_revision")),
        *((n, pa.string()) for n in ("architecture", "family", "activation")),
        ("n_layers", pa.int64()),
        ("n_neurons", pa.int64()),
        ("dtype", pa.string()),
        ("layers", pa.list_(pa.int64())),
        ("taps", pa.list_(pa.string())),
        ("attributions", pa.bool_()),
        *((n, pa.string()) for n in ("dataset_name", "dataset_source", "template")),
        ("labels", pa.list_(pa.string())),
        ("split", pa.string()),
        ("seed", pa.int64()),
        ("limit", pa.int64()),
        ("chat_template", pa.bool_()),
        ("system_prompt", pa.string()),
        ("label_scoring", pa.string()),
        ("batching", pa.string()),
        *((n, pa.int64()) for n in ("batch_size", "max_length", "chunk_rows", "n_examples", "n_tokens")),
        ("n_truncated_examples", pa.int64()),
        *(
            (f"{n}_version", pa.string())
            for n in ("qcache", "python", "torch", "transformers", "bitsandbytes")
        ),
        ("versions", pa.string()),
        ("device", pa.string()),
        ("created_at", pa.timestamp("s", tz="UTC")),
        ("command", pa.string()),
        ("schema", pa.int64()),
        ("fingerprint", pa.string()),
        ("units_done", pa.int64()),
        ("units_total", pa.int64()),
        ("complete", pa.bool_()),
        ("has_token_strings", pa.bool_()),
    ]
)


def runs_table(store: Store) -> pa.Table:
    """One row per run: its key, what was run (model, method and settings, dataset, template, batching,
    lengths), versions, device, creation time and progress (``RUNS_SCHEMA``)."""
    rows = [_run_row(store.run(k)) for k in store.runs()]
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def _keyed(run: Run, n: int, columns: dict[str, pa.Array]) -> pa.Table:
    key = run.key
    keys = {
        name: pa.array([value] * n, pa.string())
        for name, value in (
            ("run", str(key)),
            ("dataset", key.dataset),
            ("model", key.model),
            ("quant", key.quant),
        )
    }
    return pa.table({**keys, **columns})


def examples_table(store: Store) -> pa.Table:
    """One row per example of every run: ``run, dataset, model, quant, example_id, gold, gold_word,
    prompt, length, n_truncated, source_row`` (``prompt`` null for runs extracted before it was stored)."""
    parts = []
    for key in store.runs():
        run = store.run(key)
        ex = run.examples()
        cols = ("example_id", "gold", "gold_word", "prompt", "length", "n_truncated", "source_row")
        parts.append(_keyed(run, ex.num_rows, {c: ex[c] for c in cols}))
    return _concat(parts, VIEW_SCHEMAS["examples"])


def tokens_table(store: Store) -> pa.Table:
    """One row per token of every run: ``run, dataset, model, quant, example_id, position, token_id, token``
    (``token``: the token string, null for runs extracted before strings were stored)."""
    parts = []
    for key in store.runs():
        run = store.run(key)
        index = run.token_index()
        n = index.num_rows
        if run.has_token_strings:
            text = pa.array(np.asarray(run.token_strings(), dtype=object), pa.string())
        else:
            text = pa.nulls(n, pa.string())
        cols = {c: index[c] for c in ("example_id", "position", "token_id")}
        parts.append(_keyed(run, n, {**cols, "token": text}))
    return _concat(parts, VIEW_SCHEMAS["tokens"])


def _concat(parts: list[pa.Table], columns: str) -> pa.Table:
    if parts:
        return pa.concat_tables(parts, promote_options="permissive")
    names = [c.strip() for c in columns.split(",")]
    return pa.table({n: pa.array([], pa.string()) for n in names})  # no runs: the columns, no rows


VIEWS: dict[str, Callable[[Store], pa.Table]] = {
    "runs": runs_table,
    "examples": examples_table,
    "tokens": tokens_table,
}
