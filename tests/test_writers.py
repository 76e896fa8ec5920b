"""Several units in flight to the store writer: the same store as one at a time, and never more at once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from qcache import store
from qcache.extract.inputs.datasets import DatasetRequest
from qcache.extract.run.runner import WRITERS, ExtractConfig, run_extract, writers_for
from qcache.store import RunWriter


def _extract(tmp_path, model, name: str, writers: int):
    cfg = ExtractConfig(
        model=str(model), bits=32, store=tmp_path / name, dataset=DatasetRequest(name="boolq", limit=12),
        chunk_rows=32, batch_size=4, device="cpu", progress=False, writers=writers,
    )  # fmt: skip
    run_extract(cfg, log=lambda m: None)
    s = store.open(tmp_path / name)
    return s.run(s.runs()[0])


def test_units_in_flight_give_the_same_store(tmp_path, tiny_models, monkeypatch):
    real = RunWriter.write_unit
    lock, now, most = threading.Lock(), [0], [0]

    def slow_write(self, unit, data, predictions):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)  # longer than a unit's forwards here, so writes pile up
        try:
            return real(self, unit, data, predictions)
        finally:
            with lock:
                now[0] -= 1

    one = _extract(tmp_path, tiny_models["llama"], "one", 1)
    monkeypatch.setattr(RunWriter, "write_unit", slow_write)
    three = _extract(tmp_path, tiny_models["llama"], "three", 3)
    assert one.layout.n_units >= 4 and three.complete
    assert most[0] == 3  # three units were written at once, never more
    for layer in one.manifest["layers"]:
        np.testing.assert_array_equal(one.activations(layer).compute(), three.activations(layer).compute())
    assert one.predictions().equals(three.predictions())


@pytest.mark.parametrize(
    ("writers", "device", "expected"), [(None, "cpu", 1), (None, "cuda", 3), (2, "cpu", 2)]
)
def test_writers_default_per_device(writers, device, expected):
    cfg = ExtractConfig(model="m", bits=32, store="s", writers=writers)
    assert writers_for(cfg, torch.device(device)) == expected
    assert WRITERS["cpu"] == 1  # CPU runs keep one unit in flight, as before
