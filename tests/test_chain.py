"""The whole chain on the real SmolLM2: `qcache extract` -> `qcache analyze all` -> `qcache sql`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import extract_args

pytestmark = pytest.mark.slow


def test_extract_analyze_sql(tmp_path):
    path = str(tmp_path / "s")
    for bits in ("32", "4"):
        r = CliRunner().invoke(main, extract_args("smollm2-135m", path, bits=bits, limit=12))
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["analyze", "all", "--store", path])
    assert r.exit_code == 0, r.output
    rows = _sql_json(path, "SELECT quant, layer, n_neurons, pct_dead FROM dead_neurons ORDER BY quant, layer")
    assert [(x["quant"], x["layer"]) for x in rows] == [(q, n) for q in ("fp32", "nf4") for n in (1, 15, 30)]
    assert all(x["n_neurons"] == 1536 for x in rows)
    # the accuracy in SQL is the fraction of correct predictions in the store
    acc = {
        x["quant"]: x["value"]
        for x in _sql_json(
            path, "SELECT quant, value FROM metrics WHERE metric='accuracy' AND reading='paper'"
        )
    }
    s = store.open(path)
    for quant, value in acc.items():
        correct = s.run(f"boolq/smollm2-135m/{quant}").predictions()["correct"].to_numpy()
        assert value == pytest.approx(np.mean(correct))
    r = CliRunner().invoke(
        main, ["sql", "--store", path, "SELECT sum(pairs) FROM redundancy WHERE quant='nf4'"]
    )
    assert r.exit_code == 0 and str(3 * 1536 * 1535 // 2) in r.output.replace(".0", "")


def _sql_json(path: str, query: str) -> list[dict]:
    r = CliRunner().invoke(main, ["sql", "--store", path, "--format", "json", query])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)
