"""Read a run back: lazy dask arrays for activations, Arrow tables for tokens and predictions.

The analyze phase only ever reads through this module; it never needs a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pyarrow as pa
import zarr
from dask.base import tokenize

from . import experts
from .chunks import direct_chunks
from .errors import IncompleteRun, InvalidName, NotStored
from .keys import ATTRIBUTIONS, TAP_ARRAYS, RunKey, check_layer, layer_name
from .layout import TokenLayout
from .location import StorePath, read_parquet, tree_size, zarr_location
from .progress import Progress
from .store import creation_id

if TYPE_CHECKING:
    from .store import Store


class Run:
    """One run of a store: ``store.run("boolq/smollm2-135m/nf4")``."""

    def __init__(self, store: Store, key: RunKey) -> None:
        self.store = store
        self.key = key
        self.dir = store.run_dir(key)  # the run's Zarr group
        self.files = store.files_dir(key)  # its bookkeeping: _created, _progress/, _predictions/
        self.progress = Progress(self.files)

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / "zarr.json").read_text())["attributes"]["manifest"]

    @cached_property
    def creation_id(self) -> str | None:
        """Random id written when the run was created; ``extract --overwrite`` gives the run a new one."""
        try:
            return creation_id(self.files)
        except FileNotFoundError:
            return None

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def label_words(self) -> list[str]:
        return list(self.manifest["dataset"]["labels"])

    @cached_property
    def layout(self) -> TokenLayout:
        lengths = _open(self.dir / "examples/length")[:]
        return TokenLayout(lengths=lengths, chunk_rows=int(self.manifest["chunk_rows"]))

    # -- progress -------------------------------------------------------------------------------------

    def done_units(self) -> set[int]:
        return self.progress.done_units()

    @property
    def fraction_done(self) -> float:
        n = self.layout.n_units
        return len(self.done_units()) / n if n else 1.0

    @property
    def complete(self) -> bool:
        return len(self.done_units()) == self.layout.n_units

    def require_complete(self, allow_partial: bool = False) -> None:
        """Raise ``IncompleteRun`` unless the run is finished (or ``allow_partial``)."""
        if not self.complete and not allow_partial:
            raise IncompleteRun(
                f"run {self.key} is {100 * self.fraction_done:.1f}% extracted: finish it with the same "
                "`qcache extract` command, or pass --allow-partial to analyze the finished part"
            )

    @property
    def tokens_done(self) -> int:
        """Token rows of the committed units (``layout.n_tokens`` once the run is complete)."""
        return sum(r1 - r0 for r0, r1 in map(self.layout.unit_rows, self.done_units()))

    def rows_done(self) -> np.ndarray:
        """``(tokens,)`` bool: rows whose unit is committed."""
        mask = np.zeros(self.layout.n_tokens, dtype=bool)
        for u in self.done_units():
            r0, r1 = self.layout.unit_rows(u)
            mask[r0:r1] = True
        return mask

    # -- arrays ---------------------------------------------------------------------------------------

    def array_path(self, layer: int, what: str = "act") -> str:
        """The array of ``layer``'s tap ``what`` (``act``, ``down-in``, ``resid``, ``attributions``), relative
        to the run's group. Raises ``InvalidOption`` for a layer that is not an int, ``InvalidName`` for a
        layer, tap or attributions the run does not hold."""
        layer = check_layer(layer)
        if layer not in self.layers:
            raise InvalidName(f"layer {layer!r} is not cached in {self.key} (cached: {self.layers})")
        if what == "attributions" and not self.has_attributions(layer):
            raise InvalidName(
                f"attributions are not cached in {self.key}: extract with --attributions (or run "
                "`qcache attribute`) to compute them"
            )
        name = ATTRIBUTIONS if what == "attributions" else TAP_ARRAYS.get(what)
        if name is None or (what != "attributions" and what not in self.manifest["taps"]):
            raise InvalidName(f"{what!r} is not cached in {self.key} (taps: {self.manifest['taps']})")
        refusal = experts.dense_refusal(self.manifest, layer, what, self.key)
        if refusal is not None:
            raise InvalidName(refusal)
        return f"layers/{layer_name(layer)}/{name}"

    def has_attributions(self, layer: int) -> bool:
        """Whether the run stores Integrated-Gradients attributions of ``layer``."""
        return bool((self.dir / f"layers/{layer_name(layer)}/{ATTRIBUTIONS}/zarr.json").exists())

    def zarr_array(self, layer: int, what: str = "act") -> zarr.Array:
        return _open(self.dir / self.array_path(layer, what))

    def activations(self, layer: int, tap: str = "act", *, allow_partial: bool = False) -> da.Array:
        """Lazy ``(tokens, neurons)`` activations of a 1-based layer, in the stored dtype.

        Raises ``InvalidOption`` for a layer that is not an int, ``InvalidName`` for a layer or tap not
        cached, and ``IncompleteRun`` for an unfinished run unless ``allow_partial``: then the rows of
        units not yet extracted read as NaN (``rows_done`` says which rows are real)."""
        path = self.array_path(layer, tap)
        self._require_finished(allow_partial)
        return self._lazy_at(path)

    def attributions(self, layer: int, *, allow_partial: bool = False) -> da.Array:
        """Lazy ``(tokens, neurons)`` float32 Integrated-Gradients attributions of a layer; raises as
        ``activations`` (and ``InvalidName`` when the run holds no attributions)."""
        path = self.array_path(layer, "attributions")
        self._require_finished(allow_partial)
        return self._lazy_at(path)

    def _require_finished(self, allow_partial: bool) -> None:
        if not allow_partial and not self.complete:
            raise IncompleteRun(
                f"run {self.key} is {100 * self.fraction_done:.1f}% extracted: finish it with the same "
                "`qcache extract` command, or pass allow_partial=True (rows not yet extracted read as NaN)"
            )

    def batches(
        self,
        layer: int,
        tap: str = "act",
        *,
        batch_tokens: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        buffer_tokens: int | None = None,
        drop_last: bool = False,
        allow_partial: bool = False,
    ) -> Iterator[np.ndarray]:
        """``(batch_tokens, neurons)`` arrays of a layer's ``tap`` in the stored dtype, every committed token
        once per epoch, shuffled across chunks for ``seed`` and ``epoch`` (see ``store/batches.py``).

        Raises ``InvalidName``, ``InvalidOption`` or ``IncompleteRun`` (unless ``allow_partial``) at once.
        """
        from .batches import plan_batches

        plan = plan_batches(
            self,
            layer,
            tap,
            batch_tokens=batch_tokens,
            shuffle=shuffle,
            seed=seed,
            buffer_tokens=buffer_tokens,
            drop_last=drop_last,
            allow_partial=allow_partial,
        )
        return plan.batches(epoch)

    def _lazy_at(self, relative: str) -> da.Array:
        """One Dask task per stored chunk of the array at ``relative`` (to the run's group), read straight
        from its file where the layout allows."""
        path = self.dir / relative
        z = _open(path)
        src = direct_chunks(z, path) if isinstance(path, Path) else None
        if src is None:
            return da.from_zarr(z)
        name = "qcache-" + tokenize(str(path), z.shape, z.chunks, str(z.dtype), sorted(self.done_units()))
        meta = np.empty((0,) * z.ndim, dtype=z.dtype)
        return da.from_array(src, chunks=z.chunks, name=name, asarray=False, lock=False, meta=meta)

    # -- mixture-of-experts layers (store/experts.py) ------------------------------------------------

    @property
    def moe_layers(self) -> dict[int, dict[str, Any]]:
        """``{layer: manifest entry}`` of the run's mixture-of-experts layers (1-based int keys; entry keys
        ``n_experts, top_k, expert_neurons, shared_expert, experts_module, router_module,
        experts_quantized, expert_taps``); ``{}`` for a dense run."""
        return experts.moe_layers(self.manifest)

    def expert_activations(self, layer: int, expert: int, tap: str = "act") -> da.Array:
        """Lazy ``(tokens, expert_neurons)`` values of ``expert`` (0-based) of MoE ``layer`` at ``tap``
        (``act`` or ``down-in``), the stored float dtype: NaN in every row not routed to the expert (and
        in rows of uncommitted units). Select rows with ``routed_rows``, not with ``isnan``.

        Raises ``InvalidName`` for a layer that is not MoE, an expert out of range or a tap not stored."""
        return self._lazy_at(experts.expert_path(self.manifest, layer, expert, tap, self.key))

    def router(self, layer: int) -> tuple[da.Array, da.Array]:
        """Lazy ``(topk_ids, topk_weights)`` of MoE ``layer``: ``(tokens, topk)`` int16 expert ids in the
        router's slot order (-1 where not written) and ``(tokens, topk)`` float32 weights (NaN where not
        written). Raises ``InvalidName`` for a layer that is not MoE."""
        ids, weights = experts.router_paths(self.manifest, layer, self.key)
        return self._lazy_at(ids), self._lazy_at(weights)

    def routed_rows(self, layer: int, expert: int) -> np.ndarray:
        """``(tokens,)`` bool: committed rows routed to ``expert`` of MoE ``layer`` (``InvalidName`` as
        ``expert_activations``)."""
        e = experts.expert_index(self.manifest, layer, expert, self.key)
        ids = np.asarray(self.router(layer)[0].compute())
        return experts.routed_mask(ids, e, None if self.complete else self.rows_done())

    def expert_tokens(self, layer: int) -> np.ndarray:
        """``(n_experts,)`` int64: committed tokens routed to each expert of MoE ``layer`` (a token counts
        once per expert it went to). Raises ``InvalidName`` for a layer that is not MoE, ``DataError`` for
        router ids outside ``[-1, n_experts)``."""
        n = int(experts.moe_entry(self.manifest, layer, self.key)["n_experts"])
        ids = np.asarray(self.router(layer)[0].compute())
        return experts.expert_counts(ids, n, None if self.complete else self.rows_done())

    # -- tables ---------------------------------------------------------------------------------------

    def token_index(self) -> pa.Table:
        """``example_id, position, token_id`` for every row of the token axis."""
        cols = {n: _open(self.dir / f"tokens/{n}")[:] for n in ("example_id", "position", "token_id")}
        return pa.table(cols)

    @property
    def has_token_strings(self) -> bool:
        """Whether the run stores its token strings and prompts (runs extracted before schema 2 do not)."""
        return bool((self.dir / "tokens/token/zarr.json").exists())

    def token_strings(self) -> np.ndarray:
        """``(tokens,)`` object array of ``str``: the string of each row's token, in the store's
        convention (docs/store.md, "Token strings": leading spaces kept, ``\\n``/``\\t`` escaped, partial
        and byte-fallback bytes as ``<0xNN>``). Raises ``NotStored`` for a run extracted before token
        strings were stored."""
        if not self.has_token_strings:
            raise NotStored(
                f"run {self.key} holds no token strings (extracted before qcache stored them): decode its "
                "token ids with the model's tokenizer, or re-extract it with `qcache extract --overwrite`"
            )
        return np.asarray(_open(self.dir / "tokens/token")[:], dtype=object)

    def examples(self) -> pa.Table:
        """One row per example: ``example_id, start, length, gold, gold_word, n_truncated, source_row,
        prompt`` (``prompt``: the exact text the example's tokens encode, the chat template's rendering
        under ``--chat-template``; null in runs extracted before prompts were stored)."""
        cols = {
            n: _open(self.dir / f"examples/{n}")[:]
            for n in ("start", "length", "gold", "n_truncated", "source_row")
        }
        n = len(cols["start"])
        words = np.asarray(self.label_words, dtype=object)
        prompt_path = self.dir / "examples/prompt"
        prompts = (
            pa.array(np.asarray(_open(prompt_path)[:], dtype=object), pa.string())
            if (prompt_path / "zarr.json").exists()
            else pa.nulls(n, pa.string())
        )
        return pa.table(
            {
                "example_id": np.arange(n, dtype=np.int32),
                "start": cols["start"],
                "length": cols["length"],
                "gold": cols["gold"],
                "gold_word": pa.array(words[cols["gold"]].tolist(), pa.string()),
                "n_truncated": cols["n_truncated"],
                "source_row": cols["source_row"],
                "prompt": prompts,
            }
        )

    def predictions(self) -> pa.Table:
        """Per-example predictions of the committed units, sorted by ``example_id``; ``pred_word`` is
        ``pred_label`` as its label word."""
        done = self.done_units()
        parts = [read_parquet(self.files / "_predictions" / f"u{u:07d}.parquet") for u in sorted(done)]
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return pa.table({"example_id": pa.array([], pa.int32())})
        table = pa.concat_tables(parts).sort_by("example_id")
        if "pred_label" in table.column_names and "pred_word" not in table.column_names:
            words = np.asarray(self.label_words, dtype=object)[table["pred_label"].to_numpy()]
            at = table.column_names.index("pred_label") + 1
            table = table.add_column(at, "pred_word", pa.array(words.tolist(), pa.string()))
        return table

    def size_bytes(self) -> int:
        own = tree_size(self.files) if self.files != self.dir else 0
        return tree_size(self.dir) + own


def _open(path: StorePath) -> zarr.Array:
    """A read-only zarr array, local or remote."""
    return zarr.open_array(store=zarr_location(path), mode="r", zarr_format=3)
