"""Salient neurons: each strategy against a hand-computed example and against plain numpy loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from qcache import store
from qcache.analyze.salience import STRATEGIES, overlap, salience, select
from qcache.cli import main
from qcache.store import ArraySpec, RunKey, RunSpec, RunWriter, TokenLayout

LAYERS = (1, 4)


def test_hand_computed_example():
    #            n0    n1    n2    n3      token attribution (signed sum)
    a = np.array(
        [
            [0.1, -0.9, 0.2, 0.0],  # -0.6
            [0.5, 0.3, -0.1, 0.45],  # 1.15  <- most attributed token
            [-0.2, 0.1, 0.7, 0.1],
        ]
    )  # 0.7
    got = {k: np.flatnonzero(v).tolist() for k, v in select(a, 0.8).items()}
    # best token |row 1| = [.5 .3 .1 .45] / .5 -> [1, .6, .2, .9]
    # sum |A| = [.8 1.3 1.0 .55] / 1.3 -> [.62 1 .77 .42];  max |A| = [.5 .9 .7 .45] / .9 -> [.56 1 .78 .5]
    assert got == {"best_token": [0, 3], "sum": [1], "max": [1], "mean": [1]}
    got7 = {k: np.flatnonzero(v).tolist() for k, v in select(a, 0.7).items()}  # the authors' code's threshold
    assert got7 == {"best_token": [0, 3], "sum": [1, 2], "max": [1, 2], "mean": [1, 2]}
    assert not any(v.any() for v in select(np.zeros((3, 4))).values())  # nothing is salient in silence


def _reference(attr: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """One example, written out plainly."""
    mag = np.abs(attr)
    best = int(np.argmax([row.sum() for row in attr]))
    scores = {"best_token": mag[best], "sum": mag.sum(0), "max": mag.max(0), "mean": mag.mean(0)}
    return {k: v / v.max() > threshold for k, v in scores.items()}


def _fake_run(
    root, quant: str, seed: int, *, n_examples: int = 9, n_neurons: int = 64, vocab: int = 0
) -> tuple[store.Run, dict]:
    """A real store run whose attributions are random (heavy-tailed, so few neurons pass 0.8)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, n_examples).astype(np.int32)
    layout = TokenLayout(lengths=lengths, chunk_rows=16)
    manifest = {
        "model": "m",
        "model_source": "m",
        "quant_config": quant,
        "dtype": "float32",
        "layers": list(LAYERS),
        "taps": [],
        "dataset": {"name": "d", "labels": ["False", "True"]},
        "max_length": 64,
        "chunk_rows": 16,
        "n_examples": n_examples,
        "n_neurons": n_neurons,
        "activation": "silu",
        "attributions": {"steps": 50},
    }
    arrays = tuple(ArraySpec(f"layers/L{n:03d}/attributions", n_neurons, "float32") for n in LAYERS)
    ids = np.zeros(layout.n_tokens, np.int32)
    if vocab:
        ids = np.random.default_rng(seed + 1000).integers(0, vocab, layout.n_tokens).astype(np.int32)
    spec = RunSpec(
        RunKey("d", "m", quant),
        manifest,
        layout,
        ids,  # drawn from a small vocabulary, they repeat within an example; vocab 0: all zeros
        np.zeros(n_examples, np.int16),
        np.zeros(n_examples, np.int32),
        arrays,
    )
    writer = RunWriter.open(store.open_store(root, create=True), spec)
    full = {
        n: (rng.standard_t(2, (layout.n_tokens, n_neurons)) * rng.uniform(0.5, 2, n_neurons)).astype(
            np.float32
        )
        for n in LAYERS
    }
    for u in range(layout.n_units):
        r0, r1 = layout.unit_rows(u)
        owned = np.flatnonzero(layout.owner_units == u).astype(np.int32)
        writer.write_unit(
            u, {a.path: full[n][r0:r1] for a, n in zip(arrays, LAYERS, strict=True)}, {"example_id": owned}
        )
    return store.open(root).run(spec.key), full


@pytest.mark.parametrize("threshold", [0.8, 0.7, 0.3])
def test_collation_matches_numpy(tmp_path, threshold):
    run, full = _fake_run(tmp_path / "s", "fp32", seed=1)
    res = salience(run, threshold=threshold)
    table = res.neurons.to_pydict()
    counts = {(r["layer"], r["strategy"]): r["n_salient"] for r in res.counts.to_pylist()}
    for layer in LAYERS:
        hits = {s: np.zeros(64, int) for s in (*STRATEGIES, "union")}
        for s0, n in zip(run.layout.starts, run.layout.lengths, strict=True):
            masks = _reference(full[layer][s0 : s0 + n].astype(np.float64), threshold)
            for s in STRATEGIES:
                hits[s] += masks[s]
            hits["union"] += np.logical_or.reduce(list(masks.values()))
        rows = [i for i, lay in enumerate(table["layer"]) if lay == layer]
        assert [table["neuron"][i] for i in rows] == np.flatnonzero(hits["union"]).tolist()
        for s, h in hits.items():
            assert [table[f"n_{s}"][i] for i in rows] == h[hits["union"] > 0].tolist()
            assert counts[(layer, s)] == int((h > 0).sum())
        assert counts[(layer, "union")] >= max(counts[(layer, s)] for s in STRATEGIES)


def test_overlap_between_quantizations_and_cli(tmp_path):
    root = tmp_path / "s"
    a, _ = _fake_run(root, "fp32", seed=1)
    b, _ = _fake_run(root, "nf4", seed=2)
    ra, rb = salience(a), salience(b)
    pairs = overlap([ra, rb]).to_pylist()
    sa, sb = ra.salient_sets(), rb.salient_sets()
    assert len(pairs) == len(LAYERS) * (len(STRATEGIES) + 1)
    for p in pairs:
        x, y = sa.get((p["layer"], p["strategy"]), set()), sb.get((p["layer"], p["strategy"]), set())
        assert (p["n_a"], p["n_b"], p["n_shared"]) == (len(x), len(y), len(x & y))
        assert p["jaccard"] == pytest.approx(len(x & y) / len(x | y))
    result = CliRunner().invoke(main, ["analyze", "salience", "--store", str(root), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {r["run"] for r in out["counts"]} == {"d/m/fp32", "d/m/nf4"} and len(out["overlap"]) == len(pairs)
    import pyarrow.parquet as pq

    neurons = pq.read_table(root / "tables" / "salient_neurons" / "d--m--fp32.parquet")
    assert neurons.column_names[:3] == ["dataset", "model", "quant"]
    assert (root / "tables" / "salience_overlap" / "d--m.parquet").exists()
    assert (root / "tables" / "salience_counts" / "d--m--nf4.parquet").exists()


def test_run_without_attributions_is_refused(tmp_path):
    run, _ = _fake_run(tmp_path / "s", "fp32", seed=3)
    run.manifest["attributions"] = None
    with pytest.raises(ValueError, match="no attributions"):
        salience(run)


def _authors(attr: np.ndarray, tokens: list[str], threshold: float, signed_max: bool) -> dict[str, set[int]]:
    """The authors' per-example selection (src/2_extract_important_neuron.py with llm_attr.py and Captum's
    TextTokenInput), one output token, re-implemented: attributions live in dicts keyed by the token string,
    so a later position of a repeated token overwrites the earlier ones; keying by position (distinct
    keys) gives qcache's default."""
    seq: dict[str, float] = {}
    by_token: dict[str, np.ndarray] = {}
    for key, row in zip(tokens, attr, strict=True):
        seq[key] = float(row.sum())  # LLMAttributionResult.seq_attr_dict
        by_token[key] = row  # neurons_attributions[output][input_token]
    best = max(seq, key=lambda k: seq[k])

    def pick(v: np.ndarray) -> set[int]:  # normalize_attribution + imp_neurons_after_threshold
        v = np.abs(v)
        if v.max() > 0:
            v = v / v.max()
        return set() if v.sum() <= 0 else set(np.flatnonzero(v > threshold).tolist())

    rows = np.stack(list(by_token.values()))
    total = np.abs(rows).sum(0)
    return {
        "best_token": pick(by_token[best]),
        "sum": pick(total),
        "mean": pick(total / len(seq)),
        "max": pick(rows.max(0) if signed_max else np.abs(rows).max(0)),
    }


def test_repeated_tokens_and_signed_max_hand_made():
    #                n0    n1    n2    n3      token ids: 5 and 7 repeat
    a = np.array(
        [
            [0.9, 0.1, 0.0, -0.3],  # id 5, sum 0.7: the most attributed position, overwritten by row 3
            [0.1, -0.9, 0.1, 0.05],  # id 7, overwritten by row 4
            [-0.2, 0.2, 0.5, 0.1],  # id 9
            [0.0, 0.1, 0.5, -0.1],  # id 5 (last)
            [-0.1, 0.2, 0.3, 0.0],  # id 7 (last)
        ]
    )
    ids = np.array([5, 7, 9, 5, 7])
    strings = [f"tok{i}" for i in ids]
    for threshold in (0.8, 0.7, 0.3):
        got = select(a, threshold, token_ids=ids, max_of="signed")
        assert {k: set(np.flatnonzero(v).tolist()) for k, v in got.items()} == _authors(
            a, strings, threshold, signed_max=True
        )
    # the options matter here: by position, row 0 is the best token and n0/n1 dominate sum and max
    default = {k: set(np.flatnonzero(v).tolist()) for k, v in select(a, 0.7).items()}
    assert default == _authors(a, [str(i) for i in range(5)], 0.7, signed_max=False)
    assert default["best_token"] == {0} and _authors(a, strings, 0.7, True)["best_token"] == {2}
    assert default["max"] == {0, 1} and _authors(a, strings, 0.7, True)["max"] == {2}


@pytest.mark.parametrize(("repeated", "max_of"), [("last", "signed"), ("last", "abs"), ("all", "signed")])
def test_store_collation_matches_the_authors_aggregation(tmp_path, repeated, max_of):
    run, full = _fake_run(tmp_path / "s", "fp32", seed=4, n_examples=12, vocab=5)
    ids = run.token_index()["token_id"].to_numpy()
    assert any(
        len(set(ids[s : s + n])) < n for s, n in zip(run.layout.starts, run.layout.lengths, strict=True)
    )
    threshold = 0.7
    res = salience(run, threshold=threshold, repeated_tokens=repeated, max_of=max_of)
    sets = res.salient_sets()
    for layer in LAYERS:
        want: dict[str, set[int]] = {s: set() for s in (*STRATEGIES, "union")}
        for s0, n in zip(run.layout.starts, run.layout.lengths, strict=True):
            keys = [str(t) for t in ids[s0 : s0 + n]] if repeated == "last" else [str(i) for i in range(n)]
            got = _authors(full[layer][s0 : s0 + n].astype(np.float64), keys, threshold, max_of == "signed")
            for s in STRATEGIES:
                want[s] |= got[s]
                want["union"] |= got[s]
        for s, neurons in want.items():
            assert sets.get((layer, s), set()) == neurons, (layer, s)
    rows = res.counts.to_pylist()
    assert {(r["repeated_tokens"], r["max_of"]) for r in rows} == {(repeated, max_of)}


def test_salience_options_are_recorded_and_checked(tmp_path):
    root = tmp_path / "s"
    _fake_run(root, "fp32", seed=5, vocab=3)
    args = ["analyze", "salience", "--store", str(root), "--salience-threshold", "0.7"]
    result = CliRunner().invoke(main, [*args, "--repeated-tokens", "last", "--max-of", "signed"])
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    counts = pq.read_table(root / "tables" / "salience_counts" / "d--m--fp32.parquet").to_pylist()
    assert {(r["threshold"], r["repeated_tokens"], r["max_of"]) for r in counts} == {(0.7, "last", "signed")}
    bad = CliRunner().invoke(main, [*args, "--max-of", "nope"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
