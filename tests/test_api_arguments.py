"""Arguments and states the Python API must refuse in one line rather than answer wrongly (issue #16):
unfinished runs, layers of the wrong type, attributions a run lacks, run keys where runs are expected.

Oracle for the values that are returned: the run's Zarr array read with plain zarr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import qcache
from qcache.store.errors import IncompleteRun, InvalidName, InvalidOption, QCacheError
from tests.synthetic import write_run

LENGTHS = np.array([5, 9, 3, 8, 6, 7])  # 38 tokens, units of 8 rows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api-args") / "store"
    rng = np.random.default_rng(5)
    acts = {n: rng.normal(size=(int(LENGTHS.sum()), 8)).astype(np.float32) for n in (1, 15)}
    write_run(root, acts, LENGTHS, quant="fp32", chunk_rows=8)
    write_run(root, acts, LENGTHS, quant="nf4", chunk_rows=8, units=[0, 2])
    return root


def _one_line(info: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(info.value)
    assert isinstance(info.value, QCacheError) and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_activations_of_an_unfinished_run_are_refused_unless_allowed(store: Path) -> None:
    run = qcache.open(store).run("boolq/synth/nf4")
    for call in (lambda: run.activations(1), lambda: run.reader.activations(1)):
        with pytest.raises(IncompleteRun) as info:
            call()
        _one_line(info, "boolq/synth/nf4", "% extracted", "allow_partial=True")
    got = run.activations(1, allow_partial=True).compute()
    want = zarr.open_array(str(store / "runs/boolq/synth/nf4/layers/L001/activations"), mode="r")[:]
    done = np.zeros(len(want), bool)
    done[0:8] = done[16:24] = True  # units 0 and 2
    np.testing.assert_array_equal(got[done], want[done])
    assert np.isnan(got[~done]).all()


@pytest.mark.parametrize("layer", [15.0, "15", True, np.float64(1.0)])  # (None: compare's "every layer")
def test_a_layer_that_is_not_an_int_is_refused_by_every_reader(store: Path, layer: object) -> None:
    run = qcache.open(store).run("boolq/synth/fp32")
    calls = [
        lambda: run.activations(layer),
        lambda: run.attributions(layer),
        lambda: run.dataarray(layer),
        lambda: run.batches(layer),
        lambda: run.expert_activations(layer, 0),
        lambda: qcache.compare(run, run, layer),
    ]
    for call in calls:
        with pytest.raises(InvalidOption) as info:
            call()
        _one_line(info, "layer must be an int", repr(layer), type(layer).__name__)


def test_numpy_integer_layers_still_work(store: Path) -> None:
    run = qcache.open(store).run("boolq/synth/fp32")
    assert run.activations(np.int64(15)).shape == (int(LENGTHS.sum()), 8)


def test_a_layer_not_cached_is_named_with_repr(store: Path) -> None:
    run = qcache.open(store).run("boolq/synth/fp32")
    with pytest.raises(InvalidName) as info:
        run.activations(2)
    _one_line(info, "layer 2 is not cached", "[1, 15]")


def test_missing_attributions_say_how_to_get_them(store: Path) -> None:
    run = qcache.open(store).run("boolq/synth/fp32")
    calls = [
        lambda: run.dataarray(15, tap="attributions"),
        lambda: run.attributions(15),
        lambda: run.batches(15, tap="attributions"),
        lambda: run.reader.zarr_array(15, "attributions"),
    ]
    for call in calls:
        with pytest.raises(InvalidName) as info:
            call()
        _one_line(info, "attributions are not cached in boolq/synth/fp32", "--attributions")


def test_compare_refuses_keys_with_a_hint(store: Path) -> None:
    s = qcache.open(store)
    with pytest.raises(InvalidOption) as info:
        qcache.compare("boolq/synth/fp32", s.run("boolq/synth/fp32"), 15)
    _one_line(info, "qcache.compare takes runs", "run_a='boolq/synth/fp32'", "s.run(")
    with pytest.raises(InvalidOption) as info:
        qcache.compare(s.run("boolq/synth/fp32"), "boolq/synth/nf4", 15)
    _one_line(info, "run_b='boolq/synth/nf4'")


def test_error_classes_are_reachable_from_import_qcache() -> None:
    import subprocess
    import sys

    code = (
        "import qcache, sys\n"
        "assert 'dask' not in sys.modules  # still light until used\n"
        "assert issubclass(qcache.store.SQLError, qcache.store.QCacheError)\n"
        "assert issubclass(qcache.errors.SQLError, ValueError)\n"
        "assert qcache.errors.SQLError is qcache.store.SQLError\n"
        "from qcache.store.tables import SQLError\n"
        "from qcache.store.errors import SQLError as moved\n"
        "assert SQLError is moved\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
