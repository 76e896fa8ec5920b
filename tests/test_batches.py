"""Training batches from a real store: each row exactly once per epoch, checked against zarr's own read.

The oracle is the array read whole with ``zarr.open_array`` (and the rows of the committed units, located
by hand from ``chunk_rows``); rows are matched by their bytes, which are unique in random float16 data.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from qcache.store import QCacheError, open_store
from qcache.store.batches import plan_batches
from qcache.store.errors import IncompleteRun, InvalidName, InvalidOption
from tests.synthetic import write_run

CHUNK = 64  # rows per unit and zarr row chunk
NEURONS = 2100  # two column chunks (2048 + 52): the reader assembles rows from both


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batches") / "store"
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 40, 60)  # 20 units, the last one short
    x = rng.standard_normal((int(lengths.sum()), NEURONS)).astype(np.float16)
    write_run(root, {1: x, 2: -x}, lengths, chunk_rows=CHUNK)
    return root


@pytest.fixture(scope="module")
def run(store_dir):
    return open_store(store_dir).run("boolq/synth/fp16")


@pytest.fixture(scope="module")
def oracle(store_dir) -> np.ndarray:
    """Layer 1 read whole by zarr, nothing of qcache's reader involved."""
    return zarr.open_array(str(store_dir / "runs/boolq/synth/fp16/layers/L001/activations"), mode="r")[:]


def _row_ids(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Index into ``x`` of every row of ``rows`` (each matched by its bytes); -1 where none matches."""
    where = {r.tobytes(): i for i, r in enumerate(x)}
    assert len(where) == len(x), "the test data must have distinct rows"
    return np.array([where.get(r.tobytes(), -1) for r in rows])


def test_every_row_once_per_epoch_in_full_batches_of_the_stored_dtype(run, oracle):
    n = len(oracle)
    assert n % CHUNK and n > 15 * CHUNK  # an edge chunk, many units
    for b, buffer in ((100, None), (256, 300), (50, 60), (7, 1000), (n + 5, None)):
        batches = list(run.batches(1, batch_tokens=b, buffer_tokens=buffer, seed=1))
        assert all(x.shape == (b, NEURONS) and x.dtype == np.float16 for x in batches[:-1])
        assert batches[-1].shape == (n % b or b, NEURONS) and batches[-1].dtype == np.float16
        ids = _row_ids(oracle, np.concatenate(batches))
        assert sorted(ids) == list(range(n)), f"batch_tokens={b}: rows missing or repeated"


def test_drop_last_yields_only_full_batches_of_distinct_rows(run, oracle):
    batches = list(run.batches(1, batch_tokens=100, drop_last=True))
    assert len(batches) == len(oracle) // 100 and all(x.shape == (100, NEURONS) for x in batches)
    ids = _row_ids(oracle, np.concatenate(batches))
    assert len(set(ids)) == len(ids) and ids.min() >= 0


def test_unshuffled_batches_are_the_array_in_order(run, oracle):
    got = np.concatenate(list(run.batches(1, batch_tokens=100, shuffle=False)))
    np.testing.assert_array_equal(got, oracle)
    np.testing.assert_array_equal(np.concatenate(list(run.batches(2, shuffle=False))), -oracle)


def test_same_seed_same_batches_other_seed_or_epoch_other_batches(run, oracle):
    def ids(**kw):
        return [_row_ids(oracle, x) for x in run.batches(1, batch_tokens=128, **kw)]

    a, again = ids(seed=5), ids(seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    for other in (ids(seed=6), ids(seed=5, epoch=1)):
        assert not np.array_equal(np.concatenate(a), np.concatenate(other))
    # shuffled across chunks: a batch draws on many units, not one stretch of the token axis
    assert len(np.unique(a[0] // CHUNK)) >= 8
    assert not np.all(np.diff(a[0]) == 1)


def test_parts_split_an_epoch_without_overlap(run, oracle):
    plan = plan_batches(run, 1, batch_tokens=50, seed=2)
    parts = [np.concatenate(list(plan.batches(3, p, 3))) for p in range(3)]
    ids = np.concatenate([_row_ids(oracle, x) for x in parts])
    assert sorted(ids) == list(range(len(oracle)))
    assert all(len(p) > 0 for p in parts)


def test_partial_run_is_refused_unless_allowed_then_only_committed_rows(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((10 * CHUNK - 5, 40)).astype(np.float32)
    done = [0, 3, 9]  # unit 9 is the short edge unit
    run = write_run(tmp_path / "s", {4: x}, np.full(len(x) // 5, 5), chunk_rows=CHUNK, units=done)
    with pytest.raises(IncompleteRun, match=r"30\.0% extracted.*allow_partial=True"):
        run.batches(4)
    got = np.concatenate(list(run.batches(4, batch_tokens=33, allow_partial=True)))
    assert got.dtype == np.float32 and not np.isnan(got).any()
    want = np.concatenate([np.arange(u * CHUNK, min((u + 1) * CHUNK, len(x))) for u in done])
    assert sorted(_row_ids(x, got)) == list(want)
    assert plan_batches(run, 4, allow_partial=True).n_rows == len(want)


def test_a_remote_store_gives_the_local_batches(store_dir, run):
    import fsspec

    fs = fsspec.filesystem("memory")
    name = f"/qc-{uuid.uuid4().hex[:8]}"
    fs.put(str(store_dir), name, recursive=True)
    try:
        remote = open_store(f"memory://{name}").run("boolq/synth/fp16")
        for a, b in zip(remote.batches(1, batch_tokens=300), run.batches(1, batch_tokens=300), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        fs.rm(name, recursive=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"layer": 9}, InvalidName, "layer 9 is not cached"),
        ({"layer": "1"}, InvalidOption, "layer must be an int"),
        ({"layer": 1, "tap": "resid"}, InvalidName, "'resid' is not cached"),
        ({"layer": 1, "batch_tokens": 0}, InvalidOption, "batch_tokens must be an int >= 1, got 0"),
        ({"layer": 1, "batch_tokens": 2.5}, InvalidOption, "batch_tokens must be an int >= 1, got 2.5"),
        ({"layer": 1, "batch_tokens": True}, InvalidOption, "batch_tokens must be an int"),
        ({"layer": 1, "batch_tokens": 64, "buffer_tokens": 32}, InvalidOption, "smaller than batch_tokens"),
        ({"layer": 1, "seed": -1}, InvalidOption, "seed must be an int >= 0, got -1"),
        ({"layer": 1, "epoch": -2}, InvalidOption, "epoch must be an int >= 0, got -2"),
        ({"layer": 1, "batch_tokens": 10**6, "drop_last": True}, InvalidOption, "would yield no batch"),
    ],
)
def test_bad_arguments_fail_at_once_in_one_line(run, kwargs, error, words):
    with pytest.raises(error) as info:
        run.batches(**kwargs)  # no iteration: the call itself checks
    assert isinstance(info.value, QCacheError) and words in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_part_is_refused(run):
    plan = plan_batches(run, 1)
    for part, n_parts in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(InvalidOption, match="part"):
            plan.batches(0, part, n_parts)


# -- the torch wrapper, in a real DataLoader ---------------------------------------------------------------


def _loader_ids(data, oracle, workers=2) -> list[np.ndarray]:
    from torch.utils.data import DataLoader

    return [_row_ids(oracle, x.numpy()) for x in DataLoader(data, batch_size=None, num_workers=workers)]


def test_dataloader_workers_yield_every_row_once(run, oracle):
    pytest.importorskip("torch")
    import torch

    from qcache.torch_dataset import ActivationBatches

    data = ActivationBatches(run, 1, batch_tokens=100, seed=4)
    first = next(iter(data))
    assert isinstance(first, torch.Tensor) and first.dtype == torch.float16 and first.shape == (100, NEURONS)
    ids = _loader_ids(data, oracle)
    flat = np.concatenate(ids)
    assert len(flat) == len(oracle) and sorted(flat) == list(range(len(oracle)))
    assert all(np.array_equal(a, b) for a, b in zip(ids, _loader_ids(data, oracle), strict=True))
    data.set_epoch(1)
    later = np.concatenate(_loader_ids(data, oracle))
    assert sorted(later) == list(range(len(oracle))) and not np.array_equal(later, flat)


def test_dataloader_ranks_split_an_epoch(run, oracle):
    pytest.importorskip("torch")
    from qcache.torch_dataset import ActivationBatches

    ranks = [ActivationBatches(run, 1, batch_tokens=64, rank=r, world_size=2) for r in (0, 1)]
    ids = np.concatenate([np.concatenate(_loader_ids(d, oracle)) for d in ranks])
    assert sorted(ids) == list(range(len(oracle)))
    with pytest.raises(InvalidOption, match="rank and world_size"):
        ActivationBatches(run, 1, rank=0)
    for rank, world, words in ((2, 2, "rank must be in [0, world_size=2), got rank=2"), (0, 0, "world_size")):
        with pytest.raises(InvalidOption) as info:
            ActivationBatches(run, 1, rank=rank, world_size=world)
        assert words in str(info.value) and "part" not in str(info.value)


def test_set_epoch_reaches_persistent_workers(run, oracle):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from qcache.torch_dataset import ActivationBatches

    data = ActivationBatches(run, 1, batch_tokens=100, seed=4)
    loader = DataLoader(data, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        data.set_epoch(epoch)
        epochs.append(np.concatenate([_row_ids(oracle, x.numpy()) for x in loader]))
    for flat in epochs:
        assert len(flat) == len(oracle) and sorted(flat) == list(range(len(oracle)))  # every token once
    assert not np.array_equal(epochs[0], epochs[1])  # epoch 1 has its own order
    # the order of epoch 1 is the one fresh (non-persistent) workers give for it
    fresh = ActivationBatches(run, 1, batch_tokens=100, seed=4)
    fresh.set_epoch(1)
    np.testing.assert_array_equal(epochs[1], np.concatenate(_loader_ids(fresh, oracle)))


def test_the_store_streams_batches_without_importing_torch(run):
    import subprocess
    import sys

    code = (
        "import sys; from qcache import store; "
        f"r = store.open({str(run.store.root)!r}).run('boolq/synth/fp16'); "
        "n = sum(len(x) for x in r.batches(1, batch_tokens=500)); "
        "assert 'torch' not in sys.modules, 'store imported torch'; print(n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == run.layout.n_tokens
