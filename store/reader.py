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

from .chunks import direct_chunks
from .errors import IncompleteRun, InvalidName
from .keys import ATTRIBUTIONS, TAP_ARRAYS, RunKey, layer_name
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
        self.dir = store.run_dir(key)
        self.progress = Progress(self.dir)

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / "zarr.json").read_text())["attributes"]["manifest"]

    @cached_property
    def creation_id(self) -> str | None:
        """Random id written when the run was created; ``extract --overwrite`` gives the run a new one."""
        try:
            return creation_id(self.dir)
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

    def rows_done(self) -> np.ndarray:
        """``(tokens,)`` bool: rows whose unit is committed."""
        mask = np.zeros(self.layout.n_tokens, dtype=bool)
        for u in self.done_units():
            r0, r1 = self.layout.unit_rows(u)
            mask[r0:r1] = True
        return mask

    # -- arrays ---------------------------------------------------------------------------------------

    def array_path(self, layer: int, what: str = "act") -> str:
        if layer not in self.layers:
            raise InvalidName(f"layer {layer} is not cached in {self.key} (cached: {self.layers})")
        name = ATTRIBUTIONS if what == "attributions" else TAP_ARRAYS.get(what)
        if name is None or (what != "attributions" and what not in self.manifest["taps"]):
            raise InvalidName(f"{what!r} is not cached in {self.key} (taps: {self.manifest['taps']})")
        return f"layers/{layer_name(layer)}/{name}"

    def zarr_array(self, layer: int, what: str = "act") -> zarr.Array:
        return _open(self.dir / self.array_path(layer, what))

    def activations(self, layer: int, tap: str = "act") -> da.Array:
        """Lazy ``(tokens, neurons)`` activations of a 1-based layer."""
        return self._lazy(layer, tap)

    def attributions(self, layer: int) -> da.Array:
        """Lazy ``(tokens, neurons)`` float32 Integrated-Gradients attributions of a layer."""
        return self._lazy(layer, "attributions")

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

    def _lazy(self, layer: int, what: str) -> da.Array:
        """One Dask task per stored chunk, read straight from its file where the layout allows."""
        path = self.dir / self.array_path(layer, what)
        z = _open(path)
        src = direct_chunks(z, path) if isinstance(path, Path) else None
        if src is None:
            return da.from_zarr(z)
        name = "qcache-" + tokenize(str(path), z.shape, z.chunks, str(z.dtype), sorted(self.done_units()))
        meta = np.empty((0,) * z.ndim, dtype=z.dtype)
        return da.from_array(src, chunks=z.chunks, name=name, asarray=False, lock=False, meta=meta)

    # -- tables ---------------------------------------------------------------------------------------

    def token_index(self) -> pa.Table:
        """``example_id, position, token_id`` for every row of the token axis."""
        cols = {n: _open(self.dir / f"tokens/{n}")[:] for n in ("example_id", "position", "token_id")}
        return pa.table(cols)

    def examples(self) -> pa.Table:
        cols = {
            n: _open(self.dir / f"examples/{n}")[:]
            for n in ("start", "length", "gold", "n_truncated", "source_row")
        }
        return pa.table({"example_id": np.arange(len(cols["start"]), dtype=np.int32), **cols})

    def predictions(self) -> pa.Table:
        """Per-example predictions of the committed units, sorted by ``example_id``."""
        done = self.done_units()
        parts = [read_parquet(self.dir / "_predictions" / f"u{u:07d}.parquet") for u in sorted(done)]
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return pa.table({"example_id": pa.array([], pa.int32())})
        table = pa.concat_tables(parts)
        return table.sort_by("example_id")

    def size_bytes(self) -> int:
        return tree_size(self.dir)


def _open(path: StorePath) -> zarr.Array:
    """A read-only zarr array, local or remote."""
    return zarr.open_array(store=zarr_location(path), mode="r", zarr_format=3)
