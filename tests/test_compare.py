"""`qcache compare` end to end on a synthetic store with three methods, checked against numpy/pandas.

The store holds boolq/synth at fp16 (baseline), int8 (little noise) and nf4 (more noise, one dead neuron
revived), plus fp32 on other tokens (must be skipped with its reason). Every number is recomputed here from
the arrays and prediction columns that were written, not from qcache's tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from qcache.analyze.compare import CompareConfig, compare, rank
from qcache.analyze.runner import AnalyzeConfig, run_dead
from qcache.cli import main
from qcache.store import open_store
from qcache.store.tables import part_name, write_table
from tests.synthetic import random_predictions, write_run
from tests.test_cka import numpy_cka

N_EXAMPLES, D = 30, 40
NOISE = {"fp16": 0.0, "int8": 0.05, "nf4": 0.6}
SALIENT = {"fp16": {1: {1, 2, 3}, 2: {4}}, "int8": {1: {1, 2, 3}, 2: {4, 5}}, "nf4": {1: {2, 9}, 2: set()}}


def _quiet(_: str) -> None:
    pass


def _predictions(seed: int, base: dict[str, np.ndarray] | None, flip: float) -> dict[str, np.ndarray]:
    """The baseline's predictions with a share ``flip`` of answers (and their probabilities) changed."""
    p = random_predictions(N_EXAMPLES, 2, seed=seed)
    if base is None:
        return p
    out = {k: v.copy() for k, v in base.items()}
    rng = np.random.default_rng(seed)
    change = rng.uniform(size=N_EXAMPLES) < flip
    for k in ("label_prob", "label_prob_norm", "pred_label", "confidence", "correct"):
        out[k][change] = p[k][change]
    out["correct"] = out["pred_label"] == out["gold"]
    return out


def _store(root: Path) -> dict:
    rng = np.random.default_rng(11)
    lengths = rng.integers(5, 15, N_EXAMPLES)
    t = int(lengths.sum())
    mix = rng.standard_normal((D, D))
    base = {n: np.tanh(rng.standard_normal((t, D)) @ mix / 4) * 2 + 0.5 for n in (1, 2)}
    base[1][:, :4] *= 0.02  # dead in fp16 (|a| <= 0.1)
    acts, preds = {}, {}
    for i, (quant, noise) in enumerate(NOISE.items()):
        a = {n: (x + noise * rng.standard_normal(x.shape)).astype(np.float16) for n, x in base.items()}
        if quant == "nf4":
            a[1][:, 0] += np.float16(1.0)  # a dead fp16 neuron comes alive
        else:
            a[1][:, :4] = base[1][:, :4].astype(np.float16)  # same dead set as fp16
        preds[quant] = _predictions(i, preds.get("fp16"), flip={"fp16": 0, "int8": 0.1, "nf4": 0.4}[quant])
        write_run(root, a, lengths, quant=quant, predictions=preds[quant], chunk_rows=64)
        acts[quant] = a
    other = {1: rng.standard_normal((int(lengths[:-1].sum()), D)).astype(np.float16)}
    write_run(
        root, other, lengths[:-1], quant="fp32", chunk_rows=64, predictions=random_predictions(29, 2, 5)
    )
    run_dead(AnalyzeConfig(store=root, dataset="boolq"), log=_quiet)
    s = open_store(root)
    for quant, layers in SALIENT.items():  # salience tables as `qcache analyze salience` writes them
        run = s.run(f"boolq/synth/{quant}")
        neurons = [(n, j) for n, js in layers.items() for j in sorted(js)]
        rows = {
            "dataset": ["boolq"] * len(neurons),
            "model": ["synth"] * len(neurons),
            "quant": [quant] * len(neurons),
            "layer": pa.array([n for n, _ in neurons], pa.int32()),
            "neuron": pa.array([j for _, j in neurons], pa.int32()),
            "n_union": pa.array([1] * len(neurons), pa.int32()),
        }
        counts = {
            "dataset": ["boolq"] * 2,
            "model": ["synth"] * 2,
            "quant": [quant] * 2,
            "layer": [1, 2],
            "strategy": ["union", "union"],
            "n_salient": [len(layers[1]), len(layers[2])],
            "n_neurons": [D, D],
            "n_examples": [N_EXAMPLES, N_EXAMPLES],
            "threshold": [0.8, 0.8],
            "repeated_tokens": ["all", "all"],
            "max_of": ["abs", "abs"],
        }
        part = part_name("boolq", "synth", quant)
        write_table(s.results, "salient_neurons", part, pa.table(rows), run.creation_id)
        write_table(s.results, "salience_counts", part, pa.table(counts), run.creation_id)
    return {"acts": acts, "preds": preds}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("compare") / "store"
    data = _store(root)
    return root, data


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def test_compare_against_numpy_and_pandas(built: tuple[Path, dict]) -> None:
    root, data = built
    methods, layers = compare(CompareConfig(store=root, precision="float64"), log=_quiet)
    rows = {r["quant"]: r for r in methods.to_pylist()}
    assert set(rows) == {"int8", "nf4", "fp32"}
    assert rows["fp32"]["rank"] is None and "token counts differ" in rows["fp32"]["skipped"]
    base = pd.DataFrame({k: list(v) if v.ndim > 1 else v for k, v in data["preds"]["fp16"].items()})
    for quant in ("int8", "nf4"):
        r = rows[quant]
        other = pd.DataFrame({k: list(v) if v.ndim > 1 else v for k, v in data["preds"][quant].items()})
        assert r["accuracy_change"] == pytest.approx(
            other["correct"].mean() - base["correct"].mean(), abs=1e-12
        )
        assert r["flip_share"] == pytest.approx((other["pred_label"] != base["pred_label"]).mean(), abs=1e-12)
        brier = [
            np.mean(np.sum((np.stack(df["label_prob_norm"]) - np.eye(2)[df["gold"]]) ** 2, axis=1))
            for df in (other, base)
        ]
        assert r["brier_change"] == pytest.approx(brier[0] - brier[1], abs=1e-6)
        r_all, ckas = [], []
        for layer in (1, 2):
            x = data["acts"]["fp16"][layer].astype(np.float64)
            y = data["acts"][quant][layer].astype(np.float64)
            rs = np.array([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(D)])
            fin = rs[np.isfinite(rs)]
            row = layers.filter(pa.compute.equal(layers["quant"], quant)).to_pylist()[layer - 1]
            assert row["layer"] == layer
            assert row["cka"] == pytest.approx(numpy_cka(x, y), abs=1e-10)
            assert row["r_median"] == pytest.approx(np.median(fin), abs=1e-9)
            assert row["share_r_below_0_9"] == pytest.approx((fin < 0.9).mean(), abs=1e-12)
            dead = [set(np.flatnonzero((np.abs(a) <= 0.1).all(0))) for a in (x, y)]
            assert row["dead_jaccard"] == pytest.approx(_jaccard(*dead), nan_ok=True)
            sal = (SALIENT["fp16"][layer], SALIENT[quant][layer])
            assert row["salient_jaccard"] == pytest.approx(_jaccard(*sal), nan_ok=True)
            r_all.append(rs)
            ckas.append(numpy_cka(x, y))
        pooled = np.concatenate(r_all)
        assert r["r_median"] == pytest.approx(np.median(pooled[np.isfinite(pooled)]), abs=1e-9)
        assert r["cka_mean"] == pytest.approx(np.mean(ckas), abs=1e-10)
        assert r["cka_min"] == pytest.approx(min(ckas), abs=1e-10)
    assert rows["int8"]["dead_jaccard"] == 1.0 and rows["nf4"]["dead_jaccard"] < 1.0
    assert (rows["int8"]["rank"], rows["nf4"]["rank"]) == (1, 2)  # less noise, higher CKA
    assert rows["int8"]["cka_mean"] > rows["nf4"]["cka_mean"]


def test_rank_rule_ties_go_to_fewer_flips() -> None:
    rows = [
        {"quant": "a", "cka_mean": 0.99991, "flip_share": 0.2, "accuracy_change": 0.0},
        {"quant": "b", "cka_mean": 0.99989, "flip_share": 0.1, "accuracy_change": 0.0},  # same at 4 decimals
        {"quant": "c", "cka_mean": 0.9990, "flip_share": 0.0, "accuracy_change": 0.0},
        {"quant": "d", "cka_mean": float("nan"), "flip_share": 0.0, "accuracy_change": 0.0},
        {"quant": "e", "skipped": "token counts differ"},
    ]
    assert [(r["quant"], r["rank"]) for r in rank(rows)] == [
        ("b", 1),
        ("a", 2),
        ("c", 3),
        ("d", 4),
        ("e", None),
    ]


def test_cli_prints_ranks_and_sql_reads_the_table(built: tuple[Path, dict]) -> None:
    root, _ = built
    runner = CliRunner()
    res = runner.invoke(main, ["compare", "--store", str(root), "--layers", "1,2"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("1 ", "2 "))]
    assert [ln.split()[4] for ln in lines] == ["int8", "nf4"]
    assert (
        "fp32: not compared with fp16: token counts differ" in res.output
        and "ranked by mean linear CKA" in res.output
    )
    sql = runner.invoke(
        main,
        [
            "sql",
            "--store",
            str(root),
            "--format",
            "json",
            "SELECT quant, rank FROM method_comparison ORDER BY quant",
        ],
    )
    assert sql.exit_code == 0, sql.output
    assert json.loads(sql.output) == [
        {"quant": "fp32", "rank": None},
        {"quant": "int8", "rank": 1},
        {"quant": "nf4", "rank": 2},
    ]
    out = runner.invoke(main, ["compare", "--store", str(root), "--layers", "2", "--json", "--debiased"])
    assert out.exit_code == 0, out.output
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} is not JSON")}  # NaN must be written as null
    parsed = json.loads(out.output[out.output.index("{") :], **strict)
    assert {m["quant"] for m in parsed["methods"]} == {"int8", "nf4", "fp32"}
    assert all(0 < r["cka_debiased"] <= 1 for r in parsed["layers"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "nf4", "--dataset", "nope"], "no run matches"),
        (["--layers", "9"], "not cached in both"),
        (["--layers", "one"], "comma list"),
        (["--memory-limit", "1kB"], "too small"),
    ],
)
def test_bad_input_is_one_line(built: tuple[Path, dict], args: list[str], message: str) -> None:
    root, _ = built
    res = CliRunner().invoke(main, ["compare", "--store", str(root), *args])
    assert res.exit_code != 0 and message in res.output
    assert "Traceback" not in res.output


def test_report_section(built: tuple[Path, dict], tmp_path: Path) -> None:
    import pyarrow.csv as pacsv

    from qcache.analyze.report import ReportConfig, build_report

    root, _ = built
    compare(CompareConfig(store=root), log=_quiet)
    path = build_report(ReportConfig(store=root, out=tmp_path / "r"), log=_quiet)
    html = path.read_text()
    assert 'id="methods"' in html and "fp32 not compared: token counts differ" in html
    shown = pacsv.read_csv(tmp_path / "r/tables/methods_ranked.csv").to_pylist()
    assert [(r["rank"], r["quant"]) for r in shown] == [(1, "int8"), (2, "nf4")]
    for name in ("cka", "r_median", "share_r_below_0_9", "dead_jaccard", "salient_jaccard", "flip_share"):
        assert (tmp_path / f"r/figures/methods_{name}.png").stat().st_size > 1000
        assert f'id="fig-methods_{name}"' in html


def test_report_analyze_compares_when_the_table_is_missing(built: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from qcache.analyze.report_methods import analyze_comparison

    root, _ = built
    shutil.rmtree(root / "tables" / "method_comparison", ignore_errors=True)
    logs: list[str] = []
    analyze_comparison(open_store(root), log=logs.append)
    parts = sorted((root / "tables" / "method_comparison").glob("*.parquet"))
    assert [p.name for p in parts] == ["boolq--synth--vs-fp16.parquet"]
    rows = pq.read_table(parts[0]).to_pylist()
    assert {r["quant"]: r["rank"] for r in rows} == {"int8": 1, "nf4": 2, "fp32": None}
    assert any("CKA" in line for line in logs)
    logs.clear()
    analyze_comparison(open_store(root), log=logs.append)  # current: nothing recomputed
    assert not any("CKA" in line for line in logs)
