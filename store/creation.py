"""A run's creation: its Zarr group with every array laid out (index arrays and strings filled), and its
removal. Called by ``RunWriter.open`` under the store's create lock (writer.py has the layout)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .bookkeeping import CREATED, bookkeeping_dir
from .codecs import activation_codec, neuron_chunk
from .keys import RunKey
from .progress import atomic_write, fsync_tree

if TYPE_CHECKING:
    from .writer import RunSpec

# xarray reads a group's "coordinates" attribute (a CF convention) as the names of its coordinates.
TOKEN_COORDINATES = "example_id position token_id"


def create_run(run_dir: Path, files: Path, spec: RunSpec, manifest: dict[str, Any]) -> None:
    """Write the run's group and every array (index arrays filled), then ``files/_created`` last."""
    layout = spec.layout
    rows = layout.chunk_rows
    group = zarr.open_group(str(run_dir), mode="w", zarr_format=3)
    group.attrs["manifest"] = manifest
    group.create_group("tokens", attributes={"coordinates": TOKEN_COORDINATES})
    example_id, position = layout.token_index()
    token_chunks = (max(rows, 1 << 16),)  # written once at creation: large chunks, not one tiny file per unit
    for name, values in (
        ("example_id", example_id),
        ("position", position),
        ("token_id", spec.token_ids),
    ):
        values = np.asarray(values, np.int32)
        group.create_array(f"tokens/{name}", data=values, chunks=token_chunks, dimension_names=("token",))
    if spec.token_strings is not None:
        _create_strings(group, "tokens/token", spec.token_strings, layout.n_tokens, token_chunks, "token")
    examples = {
        "start": layout.starts.astype(np.int64),
        "length": np.asarray(layout.lengths, np.int32),
        "gold": np.asarray(spec.gold, np.int16),
        "n_truncated": np.asarray(spec.n_truncated, np.int32),
        "source_row": np.asarray(
            spec.source_rows if spec.source_rows is not None else np.arange(layout.n_examples),
            np.int64,
        ),
    }
    for name, values in examples.items():
        group.create_array(
            f"examples/{name}", data=values, chunks=(max(1, len(values)),), dimension_names=("example",)
        )
    if spec.prompts is not None:
        chunks = (max(1, min(layout.n_examples, PROMPT_CHUNK)),)
        _create_strings(group, "examples/prompt", spec.prompts, layout.n_examples, chunks, "example")
    for a in spec.arrays:
        group.create_array(
            a.path,
            shape=(layout.n_tokens, a.n_neurons),
            chunks=(rows, neuron_chunk(a.n_neurons)),
            dtype=a.dtype,
            # integer arrays (an MoE layer's router/topk_ids) mark unwritten rows with -1, floats with NaN
            fill_value=-1 if np.issubdtype(np.dtype(a.dtype), np.integer) else np.nan,
            compressors=activation_codec(),
            dimension_names=("token", width_dim(a.path)),
        )
    fsync_tree(run_dir)
    files.mkdir(parents=True, exist_ok=True)
    created = {"fingerprint": manifest["fingerprint"], "id": uuid.uuid4().hex}
    atomic_write(files / CREATED, json.dumps(created).encode())


PROMPT_CHUNK = 4096  # prompts per chunk: passages make prompts kilobytes long


def width_dim(path: str) -> str:
    """Name of the second axis of a ``(token, width)`` array: ``hidden`` for the residual stream, ``topk``
    for an MoE layer's router arrays (``router/topk_ids``, ``router/topk_weights``), else ``neuron`` (MLP
    and expert neurons, their down-projection inputs and attributions)."""
    name = path.rsplit("/", 1)[-1]
    if name in ("topk_ids", "topk_weights"):
        return "topk"
    return "hidden" if name == "resid" else "neuron"


def _create_strings(
    group: zarr.Group, path: str, values: Sequence[str] | np.ndarray, n: int, chunks: tuple[int], dim: str
) -> None:
    """A ``(n,)`` Zarr v3 ``string`` array (variable-length UTF-8) at ``path``, filled with ``values``."""
    values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=object)
    if values.shape != (n,):
        raise ValueError(f"{path}: {values.shape[0]} strings for {n} rows")
    arr = group.create_array(path, shape=(n,), chunks=chunks, dtype=str, dimension_names=(dim,))
    if n:
        arr[:] = values


def remove_run(root: Path, key: RunKey) -> None:
    """Delete run ``key`` whatever its schema: its ``_created`` first (so it stops counting at once), then
    its bookkeeping and its group. The caller holds the create lock and the run's writers lock."""
    places = (bookkeeping_dir(root, key), root / key.path)
    for place in places:
        (place / CREATED).unlink(missing_ok=True)
    for place in places:
        if place.exists():
            shutil.rmtree(place)
