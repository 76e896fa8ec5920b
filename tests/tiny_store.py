"""A small real store for the Python API tests and the docs/python.md tour: a tiny random Llama
(``tiny-llama``: 3 layers, 96 neurons) extracted at fp32 and int8 on six BoolQ questions, then analyzed."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from qcache.cli import main
from tests.commands import extract_args

LIMIT = 6
LAYERS = (1, 3)


def build(parent: Path, llama: Path) -> Path:
    """``parent/qcache-store``: runs boolq/tiny-llama/{fp32,int8} (layers 1 and 3) of the saved tiny model
    ``llama``, after `analyze all`."""
    model = Path(shutil.copytree(llama, parent / "tiny-llama"))  # the run key is the directory's name
    store = parent / "qcache-store"
    for bits in (32, 8):
        options = ("--layers", ",".join(map(str, LAYERS)), "--chunk-rows", "32", "--batch-size", "4")
        _cli(extract_args(model, store, *options, bits=bits, limit=LIMIT))
    _cli(["analyze", "all", "--store", str(store)])
    return store


def _cli(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
