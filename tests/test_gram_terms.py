"""The ``gram_terms`` table: redundancy records each layer's ``||Xc^T Xc||_F^2``, compare reuses it.

Oracles: numpy in float64 (the centred Gram's squared Frobenius norm, and CKA from ``tests/test_cka``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qcache.analyze import gram_terms
from qcache.analyze.compare import CompareConfig, compare
from qcache.analyze.redundancy import correlation_counts
from qcache.analyze.runner import AnalyzeConfig, run_redundancy
from qcache.store import open_store
from qcache.store.tables import part_name, write_table
from tests.synthetic import random_predictions, write_run
from tests.test_cka import numpy_cka

D, N_EXAMPLES = 96, 40


def _quiet(_: str) -> None:
    pass


def numpy_gram_sq(x: np.ndarray) -> float:
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    g = xc.T @ xc
    return float(np.vdot(g, g))


@pytest.mark.parametrize("d", [64, 300])
def test_redundancy_gram_sq_is_numpy(d: int) -> None:
    import dask.array as da

    rng = np.random.default_rng(d)
    x = (rng.standard_normal((700, d)) @ rng.standard_normal((d, d)) / 8 + 3).astype(np.float16)
    got = correlation_counts(da.from_array(x, chunks=(128, 64)), block=64, tile_rows=128).gram_sq
    assert got == pytest.approx(numpy_gram_sq(x), rel=1e-6)
    pair = correlation_counts(
        da.from_array(x, chunks=(128, 64)), da.from_array(x, chunks=(128, 64)), block=64
    )
    assert pair.gram_sq is None  # between two layers there is no self term


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, dict[str, dict[int, np.ndarray]]]:
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 12, N_EXAMPLES)
    t = int(lengths.sum())
    base = {n: rng.standard_normal((t, D)) @ rng.standard_normal((D, D)) / 6 for n in (1, 2)}
    acts = {}
    for i, (quant, noise) in enumerate({"fp16": 0.0, "int8": 0.05, "nf4": 0.4}.items()):
        acts[quant] = {
            n: (x + noise * rng.standard_normal(x.shape)).astype(np.float16) for n, x in base.items()
        }
        preds = random_predictions(N_EXAMPLES, 2, seed=i)
        write_run(tmp_path / "s", acts[quant], lengths, quant=quant, predictions=preds, chunk_rows=64)
    return tmp_path / "s", acts


def _terms(root: Path, quant: str) -> dict:
    rows = pq.read_table(root / "tables" / "gram_terms" / part_name("boolq", "synth", quant)).to_pylist()
    return {(r["layer"], r["tap"], r["precision"]): r for r in rows}


def test_redundancy_records_and_compare_reuses(runs: tuple[Path, dict]) -> None:
    root, acts = runs
    run_redundancy(AnalyzeConfig(store=root, dataset="boolq"), log=_quiet)
    for quant, layers in acts.items():
        got = _terms(root, quant)
        assert set(got) == {(1, "act", "float32"), (2, "act", "float32")}
        for n, x in layers.items():
            assert got[(n, "act", "float32")]["gram_sq"] == pytest.approx(numpy_gram_sq(x), rel=1e-6)
            assert got[(n, "act", "float32")]["source"] == "redundancy"
            assert got[(n, "act", "float32")]["n_tokens"] == x.shape[0]

    _, layers = compare(CompareConfig(store=root, baseline="fp16"), log=_quiet)
    for row in layers.to_pylist():
        x, y = acts["fp16"][row["layer"]], acts[row["quant"]][row["layer"]]
        assert row["cka"] == pytest.approx(numpy_cka(x.astype(np.float64), y.astype(np.float64)), abs=1e-6)
    assert {r["source"] for q in acts for r in _terms(root, q).values()} == {
        "redundancy"
    }  # reused, not redone

    # the recorded term is what compare divides by: a term four times larger halves CKA
    s = open_store(root)
    run = s.run("boolq/synth/nf4")
    part = root / "tables" / "gram_terms" / part_name("boolq", "synth", "nf4")
    table = pq.read_table(part)
    table = table.set_column(
        table.schema.get_field_index("gram_sq"), "gram_sq", [[4 * v for v in table["gram_sq"].to_pylist()]]
    )
    write_table(s.results, "gram_terms", part.name, table, run.creation_id)
    _, tampered = compare(CompareConfig(store=root, baseline="fp16"), log=_quiet)
    before = {(r["quant"], r["layer"]): r["cka"] for r in layers.to_pylist()}
    for row in tampered.to_pylist():
        factor = 0.5 if row["quant"] == "nf4" else 1.0
        assert row["cka"] == pytest.approx(before[(row["quant"], row["layer"])] * factor, rel=1e-9)


def test_compare_records_terms_and_a_stale_part_is_ignored(runs: tuple[Path, dict]) -> None:
    root, acts = runs
    _, layers = compare(CompareConfig(store=root, baseline="fp16", debiased=True), log=_quiet)
    got = _terms(root, "int8")
    assert {r["source"] for r in got.values()} == {"compare"}
    assert all(r["sum_k"] is not None for r in got.values())
    assert got[(1, "act", "float32")]["gram_sq"] == pytest.approx(numpy_gram_sq(acts["int8"][1]), rel=1e-6)
    first = {(r["quant"], r["layer"]): (r["cka"], r["cka_debiased"]) for r in layers.to_pylist()}
    _, again = compare(CompareConfig(store=root, baseline="fp16", debiased=True), log=_quiet)
    for r in again.to_pylist():  # from the recorded terms: the same figures
        assert (r["cka"], r["cka_debiased"]) == pytest.approx(first[(r["quant"], r["layer"])], rel=1e-12)

    # a run recreated under the same key: its old part is stale and not read
    run = open_store(root).run("boolq/synth/int8")
    lengths = run.layout.lengths
    fresh = {n: (x[:, ::-1] * 2).copy() for n, x in acts["int8"].items()}
    write_run(
        root,
        fresh,
        lengths,
        quant="int8",
        predictions=random_predictions(N_EXAMPLES, 2, seed=9),
        chunk_rows=64,
        overwrite=True,
    )
    assert gram_terms.load(open_store(root).run("boolq/synth/int8")) == {}
    _, redone = compare(CompareConfig(store=root, baseline="fp16"), log=_quiet)
    for r in redone.to_pylist():
        if r["quant"] == "int8":
            x = acts["fp16"][r["layer"]].astype(np.float64)
            assert r["cka"] == pytest.approx(numpy_cka(x, fresh[r["layer"]].astype(np.float64)), abs=1e-6)
