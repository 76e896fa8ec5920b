"""The laptop side never imports the GPU stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "bitsandbytes", "captum")


@pytest.mark.parametrize("argv", [["--help"], ["extract", "--help"], ["ls", "--help"], ["models"]])
def test_cli_commands_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from qcache.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_ls_on_an_empty_store(tmp_path):
    from click.testing import CliRunner

    from qcache import store
    from qcache.cli import main

    store.open(tmp_path / "s", create=True)
    result = CliRunner().invoke(main, ["ls", "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0 and result.output.strip() == "[]"
