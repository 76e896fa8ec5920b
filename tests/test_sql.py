"""`qcache sql`: read-only DuckDB over the result tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcache.analyze.runner import AnalyzeConfig, run_calibration, run_dead
from qcache.cli import main
from qcache.store.tables import SQLError, run_sql
from tests.files import tree_digest
from tests.synthetic import write_run


@pytest.fixture
def analyzed(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for quant in ("fp16", "nf4"):
        write_run(
            tmp_path / "s",
            {1: rng.standard_normal((400, 64)).astype(np.float16)},
            np.full(20, 20),
            quant=quant,
        )
    cfg = AnalyzeConfig(store=tmp_path / "s")
    run_calibration(cfg, log=lambda m: None)
    run_dead(cfg, log=lambda m: None)
    return tmp_path / "s"


def test_queries_join_across_quantizations(analyzed):
    cols, rows = run_sql(analyzed, "SELECT quant, count(*) FROM predictions GROUP BY quant ORDER BY quant")
    assert cols == ["quant", "count_star()"] and rows == [("fp16", 20), ("nf4", 20)]
    _, rows = run_sql(
        analyzed,
        "SELECT a.quant, b.quant FROM dead_neurons a JOIN dead_neurons b USING (dataset, model, layer) "
        "WHERE a.quant < b.quant",
    )
    assert rows == [("fp16", "nf4")]
    _, rows = run_sql(
        analyzed, "SELECT value FROM metrics WHERE quant='fp16' AND metric='accuracy' AND reading='paper'"
    )
    import pyarrow.parquet as pq

    preds = pq.read_table(analyzed / "tables/predictions/boolq--synth--fp16.parquet")
    assert rows[0][0] == pytest.approx(np.mean(preds["correct"].to_numpy()))


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT 1) TO '{root}/leak.csv'",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO metrics SELECT * FROM metrics",
        "ATTACH '{root}/other.duckdb'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SET enable_external_access = true",
        "DROP TABLE metrics",
    ],
)
def test_nothing_can_write_or_reach_outside(analyzed, query):
    before = tree_digest(analyzed)
    result = CliRunner().invoke(main, ["sql", "--store", str(analyzed), query.format(root=analyzed)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert tree_digest(analyzed) == before


def test_bad_query_is_one_line_naming_the_tables(analyzed):
    with pytest.raises(SQLError, match=r"tables: dead_neurons, metrics"):
        run_sql(analyzed, "SELECT nope FROM metrics")


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_output_formats(analyzed, fmt):
    result = CliRunner().invoke(
        main,
        [
            "sql",
            "--store",
            str(analyzed),
            "--format",
            fmt,
            "SELECT layer, n_dead FROM dead_neurons ORDER BY quant",
        ],
    )
    assert result.exit_code == 0, result.output
    if fmt == "json":
        import json

        assert [r["layer"] for r in json.loads(result.output)] == [1, 1]
    else:
        assert "layer" in result.output.splitlines()[0]


def test_csv_lines_end_in_lf(analyzed):
    """The CLI's bytes: LF line ends, as DuckDB's and sqlite3's CLIs write (it used to write CRLF)."""
    import subprocess

    from tests.commands import as_process

    query = "SELECT layer, n_dead FROM dead_neurons ORDER BY quant"
    out = subprocess.run(
        as_process(["sql", "--store", str(analyzed), "--format", "csv", query]),
        capture_output=True,
        check=True,
    ).stdout
    assert b"\r" not in out
    expected = "layer,n_dead\n" + "".join(f"1,{n}\n" for n in _n_dead(analyzed))
    assert out == expected.encode()


def _n_dead(root: Path) -> list[int]:
    import pyarrow.parquet as pq

    return [
        int(pq.read_table(root / f"tables/dead_neurons/boolq--synth--{q}.parquet")["n_dead"][0].as_py())
        for q in ("fp16", "nf4")
    ]


@pytest.mark.parametrize(
    ("query", "hint"),
    [
        ("SELECT * FROM metrcs", 'Did you mean "metrics"?'),
        ("SELECT valu FROM metrics", 'Candidate bindings: "value"'),
    ],
)
def test_sql_errors_keep_duckdbs_hints(analyzed, query, hint):
    result = CliRunner().invoke(main, ["sql", "--store", str(analyzed), query])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SQL error: ")
    assert hint in lines[0] and "Traceback" not in result.output


def test_python_sql_has_the_views_of_the_command(analyzed):
    import qcache

    s = qcache.open(analyzed)
    runs = s.sql("SELECT run, n_tokens, complete FROM runs ORDER BY run")
    assert runs.to_dict("records") == [
        {"run": "boolq/synth/fp16", "n_tokens": 400, "complete": True},
        {"run": "boolq/synth/nf4", "n_tokens": 400, "complete": True},
    ]
    n = s.sql("SELECT count(*) AS n FROM tokens WHERE quant = 'nf4'")["n"][0]
    assert n == 400  # 20 examples of 20 tokens, as written
    assert s.sql("SELECT count(*) AS n FROM examples")["n"][0] == 40


def test_more_than_one_statement_is_refused(analyzed):
    import qcache

    query = "SELECT 1 AS a; SELECT 2 AS b"
    with pytest.raises(SQLError, match="2 statements"):
        run_sql(analyzed, query)
    with pytest.raises(SQLError, match="2 statements"):
        qcache.open(analyzed).sql(query)
    result = CliRunner().invoke(main, ["sql", "--store", str(analyzed), query])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: the query holds 2")
    assert run_sql(analyzed, "SELECT 1 AS a;")[1] == [(1,)]  # a trailing semicolon is one statement
