"""`qcache verify` finds damaged chunks, names them, and `--repair` + the same extract restores them."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from qcache import store
from qcache.cli import main
from tests.commands import extract_args


def _extract(model_dir, path):
    args = extract_args(model_dir, path, "--layers", "1,2", "--chunk-rows", "32", limit=16)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def test_damaged_chunks_are_named_and_repaired(tmp_path, tiny_models):
    path = tmp_path / "s"
    _extract(tiny_models["llama"], path)
    run = store.open(path).run(store.open(path).runs()[0])
    before = run.activations(2).compute()
    assert CliRunner().invoke(main, ["verify", "--store", str(path)]).exit_code == 0

    chunk = run.dir / "layers/L002/activations/c/1/0"  # unit 1
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    chunk.write_bytes(bytes(raw))
    (run.dir / "layers/L001/activations/c/0/0").write_bytes(b"trunc")  # unit 0: truncated

    result = CliRunner().invoke(main, ["verify", "--store", str(path)])
    assert result.exit_code == 1
    assert "layers/L002/activations rows 32:64 (unit 1)" in result.output
    assert "layers/L001/activations rows 0:32 (unit 0)" in result.output
    assert "qcache verify --repair" in result.output

    result = CliRunner().invoke(main, ["verify", "--repair", "--store", str(path)])
    assert "withdrew" in result.output and run.done_units() == set(range(run.layout.n_units)) - {
        0,
        1,
    }
    _extract(tiny_models["llama"], path)  # the same command recomputes just those units
    assert CliRunner().invoke(main, ["verify", "--store", str(path)]).exit_code == 0
    np.testing.assert_array_equal(run.activations(2).compute(), before)
