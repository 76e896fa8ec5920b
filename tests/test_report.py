"""``qcache report`` and the drift analysis behind it, on a synthetic store with three quantizations.

Drift is checked against numpy (``np.corrcoef`` per neuron); the HTML is parsed, its CSVs compared with the
result tables, and the page rendered by a real headless Chromium to a PNG.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import dask.array as da
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from qcache.analyze.drift import dead_overlap, layer_drift, run_drift
from qcache.analyze.page import load_table
from qcache.analyze.report import ReportConfig, build_report
from qcache.analyze.runner import AnalyzeConfig, run_calibration, run_dead, run_redundancy
from qcache.cli import main
from qcache.store import ArraySpec, RunKey, RunSpec, RunWriter, TokenLayout, open_store
from tests.synthetic import random_predictions, write_run

N_EXAMPLES, D = 24, 12
NOTE = "weights dequantized from test.gguf: the fp16 run is a dequantized baseline"


def _quiet(_: str) -> None:
    pass


def _store(root: Path) -> Path:
    """boolq/synth at fp16, int8 and nf4 (same tokens, growing noise, a few dead and one constant neuron),
    plus boolq/other at fp16 and nf4 whose token counts differ (drift must skip it)."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(4, 12, N_EXAMPLES)
    t = int(lengths.sum())
    base = {n: rng.normal(size=(t, D)) for n in (1, 2)}
    base[1][:, :3] *= 0.01  # dead (|a| <= 0.1) in fp16
    base[2][:, 5] = 0.5  # constant: r is undefined
    for i, (quant, noise) in enumerate((("fp16", 0.0), ("int8", 0.05), ("nf4", 0.5))):
        acts = {n: a + noise * rng.normal(size=a.shape) for n, a in base.items()}
        acts[2][:, 5] = 0.5
        if quant == "nf4":
            acts[1][:, 0] += 1.0  # one fp16-dead neuron comes alive at 4 bits
        write_run(
            root,
            {n: a.astype(np.float16) for n, a in acts.items()},
            lengths,
            quant=quant,
            predictions=random_predictions(N_EXAMPLES, 2, seed=i),
            chunk_rows=64,
        )
    for quant, n_ex in (("fp16", 10), ("nf4", 9)):
        small = {1: rng.normal(size=(int(lengths[:n_ex].sum()), D)).astype(np.float16)}
        write_run(
            root,
            small,
            lengths[:n_ex],
            quant=quant,
            model="other",
            chunk_rows=64,
            predictions=random_predictions(n_ex, 2, seed=3),
        )
    zjson = root / "runs/boolq/synth/fp16/zarr.json"  # a GGUF-style weights note on one run
    meta = json.loads(zjson.read_text())
    meta["attributes"]["manifest"]["weights_note"] = NOTE
    zjson.write_text(json.dumps(meta))
    cfg = AnalyzeConfig(store=root)
    run_calibration(cfg, log=_quiet)
    run_dead(cfg, log=_quiet)
    run_redundancy(cfg, log=_quiet)
    run_drift(root, log=_quiet)
    dead_overlap(root, log=_quiet)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = _store(tmp_path_factory.mktemp("report") / "store")
    out = root.parent / "report"
    build_report(ReportConfig(store=root, out=out), log=_quiet)
    return root, out


class Page(HTMLParser):
    """Section ids, headings, images and the text of each section."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self.missing: list[str] = []
        self._section: str | None = None
        self._in_missing = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id") or ""
            self.sections[self._section] = ""
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "p" and a.get("class") == "missing":
            self._in_missing = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self._in_missing = False

    def handle_data(self, data: str) -> None:
        if self._section is not None:
            self.sections[self._section] += data
        if self._in_missing:
            self.missing.append(data)


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def test_drift_matches_numpy(built: tuple[Path, Path]) -> None:
    root, _ = built
    s = open_store(root)
    drift = load_table(root, "activation_drift").to_pylist()
    checked = 0
    for quant in ("int8", "nf4"):
        for layer in (1, 2):
            b = s.run("boolq/synth/fp16").activations(layer).compute().astype(np.float64)
            q = s.run(f"boolq/synth/{quant}").activations(layer).compute().astype(np.float64)
            rows = {r["neuron"]: r for r in drift if r["quant"] == quant and r["layer"] == layer}
            assert len(rows) == D and all(r["baseline"] == "fp16" for r in rows.values())
            for j in range(D):
                r = rows[j]
                if b[:, j].std() == 0 or q[:, j].std() == 0:
                    assert np.isnan(r["r"])
                    continue
                assert r["r"] == pytest.approx(np.corrcoef(b[:, j], q[:, j])[0, 1], abs=1e-9)
                assert r["mad"] == pytest.approx(np.abs(q[:, j] - b[:, j]).mean(), rel=1e-9)
                rms = np.sqrt(np.mean((q[:, j] - b[:, j]) ** 2)) / np.sqrt(np.mean(b[:, j] ** 2))
                assert r["rel_rms"] == pytest.approx(rms, rel=1e-9)
                checked += 1
    assert checked == 4 * D - 2  # all but the constant neuron of layer 2, twice
    medians = {q: np.nanmedian([r["r"] for r in drift if r["quant"] == q]) for q in ("int8", "nf4")}
    assert medians["int8"] > medians["nf4"]  # more noise, less correlation


def test_drift_is_chunking_invariant() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(97, 5)) + 100.0  # a large mean: the centered pass must keep precision
    y = x + 0.1 * rng.normal(size=x.shape)
    a = layer_drift(da.from_array(x, chunks=(13, 5)), da.from_array(y, chunks=(40, 5)))
    b = layer_drift(da.from_array(x, chunks=(97, 5)), da.from_array(y, chunks=(97, 5)))
    ref = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(5)]
    np.testing.assert_allclose(a.r, ref, rtol=1e-10)
    np.testing.assert_allclose(a.r, b.r, rtol=1e-12)
    np.testing.assert_allclose(a.mad, b.mad, rtol=1e-12)


def test_drift_skips_runs_on_other_tokens(built: tuple[Path, Path]) -> None:
    root, out = built
    skipped = load_table(root, "drift_skipped").to_pylist()
    assert [(r["model"], r["quant"]) for r in skipped] == [("other", "nf4")]
    assert "token counts differ" in skipped[0]["reason"]
    assert "other" not in set(load_table(root, "activation_drift")["model"].to_pylist())
    assert any("other" in m and "token counts differ" in m for m in _parse(out / "report.html").missing)


def test_dead_overlap_matches_sets(built: tuple[Path, Path]) -> None:
    root, _ = built
    stats = load_table(root, "neuron_stats").to_pylist()
    dead = {(r["model"], r["quant"], r["layer"]): set() for r in stats}
    for r in stats:
        if r["dead"]:
            dead[(r["model"], r["quant"], r["layer"])].add(r["neuron"])
    assert dead[("synth", "fp16", 1)] == {0, 1, 2} and dead[("synth", "nf4", 1)] == set()
    rows = [r for r in load_table(root, "dead_overlap").to_pylist() if r["model"] == "synth"]
    assert len(rows) == 3 * 2  # three pairs of quantizations, two layers
    for r in rows:
        a, b = dead[("synth", r["quant_a"], r["layer"])], dead[("synth", r["quant_b"], r["layer"])]
        assert (r["n_a"], r["n_b"], r["n_shared"]) == (len(a), len(b), len(a & b))
        if a | b:
            assert r["jaccard"] == pytest.approx(len(a & b) / len(a | b))
        else:
            assert np.isnan(r["jaccard"])


def test_report_sections_images_and_provenance(built: tuple[Path, Path]) -> None:
    root, out = built
    page = _parse(out / "report.html")
    for sid in (
        "provenance",
        "accuracy",
        "confidence",
        "calibration",
        "salient",
        "dead",
        "redundancy",
        "overlap",
        "drift",
        "missing",
    ):
        assert sid in page.sections, sid
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {
        "fig1_accuracy",
        "label_mass",
        "fig2_confidence",
        "fig3_ace",
        "reliability",
        "table4_dead_pct",
        "fig4_5_redundancy",
        "drift_r",
    }
    assert len(page.images) == len(pngs)
    for src in page.images:  # embedded, not linked: the page opens offline
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    prov = page.sections["provenance"]
    for key in open_store(root).runs():
        assert str(key) in prov
    fields = ("quant_config", "dataset", "label_scoring", "n_examples", "device", "versions", "weights_note")
    for field in fields:
        assert field in prov
    assert NOTE in page.sections["accuracy"] and NOTE in page.sections["drift"]
    assert any("no attributions in this store" in m for m in page.missing)
    assert "fp16" in page.sections["drift"] and "nf4" in page.sections["drift"]


def test_csvs_equal_the_tables(built: tuple[Path, Path]) -> None:
    root, out = built
    for name in (
        "metrics",
        "reliability",
        "dead_neurons",
        "redundancy",
        "redundancy_summary",
        "activation_drift",
        "dead_overlap",
    ):
        want = load_table(root, name)
        got = pacsv.read_csv(out / "tables" / f"{name}.csv")
        assert got.column_names == want.column_names and got.num_rows == want.num_rows, name
        for col in want.column_names:
            w, g = want[col].to_numpy(zero_copy_only=False), got[col].to_numpy(zero_copy_only=False)
            if w.dtype.kind == "f":  # (an all-null column, e.g. ``expert`` of dense runs, reads back as None)
                g = np.asarray(g, dtype=np.float64)
                np.testing.assert_allclose(g, w, rtol=1e-12, equal_nan=True, err_msg=f"{name}.{col}")
            else:
                assert [str(v) for v in g] == [str(v) for v in w], f"{name}.{col}"
    assert (out / "tables" / "provenance.csv").exists() and (out / "tables" / "drift_summary.csv").exists()


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval, written out (Wilson 1927; e.g. Brown, Cai & DasGupta 2001, eq. 4)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(130, 200), (0, 200), (200, 200), (1, 3), (12, 24)])
def test_wilson_interval_against_the_formula(k: int, n: int) -> None:
    from statistics import NormalDist

    from qcache.analyze.report_accuracy import wilson_interval

    z = NormalDist().inv_cdf(0.975)
    np.testing.assert_allclose(wilson_interval(k, n), _wilson(k, n, z), rtol=1e-9, atol=1e-12)
    if (k, n) == (130, 200):  # the +-0.07 of a 200-example accuracy
        lo, hi = wilson_interval(k, n)
        assert 0.06 < (hi - lo) / 2 < 0.07


def test_accuracy_figure_data(built: tuple[Path, Path]) -> None:
    """The numbers drawn in the accuracy figure (bars, intervals, baseline) and the label-mass figure,
    from the predictions alone."""
    from statistics import NormalDist

    root, out = built
    z = NormalDist().inv_cdf(0.975)
    got = pacsv.read_csv(out / "tables" / "fig1_accuracy_data.csv").to_pylist()
    mass = {
        (r["dataset"], r["model"], r["quant"]): r
        for r in pacsv.read_csv(out / "tables/label_mass.csv").to_pylist()
    }
    assert len(got) == len(mass) == 5
    for r in got:
        key = (r["dataset"], r["model"], r["quant"])
        preds = pq.read_table(root / "tables" / "predictions" / f"{'--'.join(key)}.parquet")
        correct, gold = preds["correct"].to_numpy(), preds["gold"].to_numpy()
        n, k = len(correct), int(correct.sum())
        assert (r["n"], r["n_correct"]) == (n, k)
        assert r["accuracy"] == pytest.approx(k / n)
        np.testing.assert_allclose((r["ci_low"], r["ci_high"]), _wilson(k, n, z), rtol=1e-9)
        counts = np.bincount(gold)
        assert (
            r["majority_baseline"] == pytest.approx(counts.max() / n)
            and r["majority_label"] == counts.argmax()
        )
        sums = np.array([np.sum(p, dtype=np.float64) for p in preds["label_prob"].to_pylist()])
        m = mass[key]
        assert m["n"] == n and m["mass_median"] == pytest.approx(np.median(sums), rel=1e-9)
        assert m["frac_below_half"] == pytest.approx(np.mean(sums < 0.5))
        assert (m["mass_p10"], m["mass_p90"]) == pytest.approx(tuple(np.percentile(sums, [10, 90])), rel=1e-9)


def test_one_run_store_names_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "one"
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 8, 6)
    write_run(root, {1: rng.normal(size=(int(lengths.sum()), 4)).astype(np.float16)}, lengths, quant="nf4")
    path = build_report(ReportConfig(store=root, out=tmp_path / "r1"), log=_quiet)
    missing = " ".join(_parse(path).missing)
    for piece in ("calibration", "dead-neuron", "redundancy", "attributions", "two or more quantizations"):
        assert piece in missing, piece
    path = build_report(ReportConfig(store=root, out=tmp_path / "r2", analyze=True), log=_quiet)
    page = _parse(path)
    assert len(page.images) >= 5 and "two or more quantizations" in " ".join(page.missing)


def test_runs_with_different_label_counts_share_a_report(tmp_path: Path) -> None:
    """label_prob is a fixed-size list per run (2, 3 or 4 labels): the report reads both."""
    root = tmp_path / "mixed"
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 8, 6)
    acts = {1: rng.normal(size=(int(lengths.sum()), 4)).astype(np.float16)}
    write_run(root, acts, lengths, quant="fp16")
    write_run(root, acts, lengths, quant="nf4", dataset="hellaswag", labels=("0", "1", "2", "3"))
    write_run(root, acts, lengths, quant="nf4", dataset="ratings", labels=("1", "5", "10"))
    path = build_report(ReportConfig(store=root, out=tmp_path / "r", analyze=True), log=_quiet)
    preds = load_table(open_store(root).results, "predictions")
    assert sorted({len(p) for p in preds["label_prob"].to_pylist()}) == [2, 3, 4]
    assert len(_parse(path).images) >= 3


def test_tables_of_an_overwritten_run_are_recomputed(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """`extract --overwrite` makes the run's tables stale: the report says so, and --analyze redoes them."""
    from tests.commands import extract_args

    store, logs = tmp_path / "s", []
    runner = CliRunner()
    assert runner.invoke(main, extract_args(tiny_models["llama"], store, limit=4)).exit_code == 0
    build_report(ReportConfig(store=store, out=tmp_path / "r1", analyze=True), log=logs.append)
    rerun = extract_args(tiny_models["llama"], store, "--overwrite", limit=6)
    assert runner.invoke(main, rerun).exit_code == 0

    path = build_report(ReportConfig(store=store, out=tmp_path / "r2"), log=_quiet)
    stale = [m for m in _parse(path).missing if "earlier extraction" in m]
    assert len(stale) == 1 and "metrics" in stale[0] and "neuron_stats" in stale[0], stale
    assert _n_examples(store) == {4}  # still the old run's, as the gap says

    path = build_report(ReportConfig(store=store, out=tmp_path / "r3", analyze=True), log=logs.append)
    assert not [m for m in _parse(path).missing if "earlier extraction" in m]
    assert any("metrics comes from an earlier extraction" in line for line in logs)
    assert _n_examples(store) == {6}
    s = open_store(store)
    dead = load_table(s.results, "dead_neurons").to_pylist()
    assert {r["n_tokens"] for r in dead} == {s.run(s.runs()[0]).layout.n_tokens}


def _n_examples(store: Path) -> set[float]:
    metrics = load_table(open_store(store).results, "metrics").to_pylist()
    return {r["value"] for r in metrics if r["metric"] == "n_examples"}


def _attributed_run(root: Path, quant: str, seed: int) -> None:
    """A run with activations, predictions and (heavy-tailed random) attributions of layers 1 and 2."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 10, 8)
    layout = TokenLayout(lengths=lengths, chunk_rows=32)
    e, t = layout.n_examples, layout.n_tokens
    manifest = {
        "model": "attr",
        "model_source": "attr",
        "quant": quant,
        "quant_config": {"quant": quant},
        "dtype": "float32",
        "layers": [1, 2],
        "taps": ["act"],
        "attributions": {"steps": 8},
        "activation": "silu",
        "n_neurons": D,
        "dataset": {"name": "boolq", "labels": ["False", "True"]},
        "max_length": 64,
        "chunk_rows": 32,
        "n_examples": e,
        "n_tokens": t,
    }
    arrays = tuple(
        ArraySpec(f"layers/L{n:03d}/{a}", D, "float32")
        for n in (1, 2)
        for a in ("activations", "attributions")
    )
    preds = random_predictions(e, 2, seed=seed)
    spec = RunSpec(
        RunKey("boolq", "attr", quant),
        manifest,
        layout,
        np.zeros(t, np.int32),
        preds["gold"],
        np.zeros(e, np.int32),
        arrays,
    )
    writer = RunWriter.open(open_store(root, create=not (root / "zarr.json").exists()), spec)
    data = {a.path: rng.standard_t(2, (t, D)).astype(np.float32) for a in arrays}
    for u in range(layout.n_units):
        r0, r1 = layout.unit_rows(u)
        own = np.flatnonzero(layout.owner_units == u)
        cols = {"example_id": own.astype(np.int32), **{k: v[own] for k, v in preds.items()}}
        writer.write_unit(u, {k: v[r0:r1] for k, v in data.items()}, cols)


def test_salience_sections_from_attributions(tmp_path: Path) -> None:
    root = tmp_path / "attr"
    for i, quant in enumerate(("fp16", "nf4")):
        _attributed_run(root, quant, seed=i)
    path = build_report(ReportConfig(store=root, out=tmp_path / "r", analyze=True), log=_quiet)
    page = _parse(path)
    assert not any("attributions" in m for m in page.missing)
    counts = [r for r in load_table(root, "salience_counts").to_pylist() if r["strategy"] == "union"]
    table3 = pacsv.read_csv(tmp_path / "r" / "tables" / "table3_salient.csv").to_pylist()
    for row in table3:
        mine = {r["layer"]: r["n_salient"] for r in counts if r["quant"] == row["quant"]}
        assert (row["L1"], row["L2"], row["Total"]) == (mine[1], mine[2], mine[1] + mine[2])
    assert (tmp_path / "r" / "tables" / "salience_overlap_union.csv").exists()
    assert "jaccard" in page.sections["overlap"] and "fp16" in page.sections["salient"]


def test_cli_report(built: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = built
    res = CliRunner().invoke(main, ["report", "--store", str(root), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "report written to" in res.output and (tmp_path / "cli" / "report.html").exists()
    res = CliRunner().invoke(main, ["report", "--store", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no store at" in res.output and "Traceback" not in res.output


def test_chromium_renders_the_report(built: tuple[Path, Path], tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    _, out = built
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        (out / "report.html").resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(shot)  # (height, width, channels)
    assert img.shape[:2] == (2000, 1280)
    assert img[..., :3].std() > 0.05  # not a blank page
    rgb = (img[..., :3] * 255).astype(np.int64)
    colors = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert colors.size > 100  # text and figures, not a few flat fills
