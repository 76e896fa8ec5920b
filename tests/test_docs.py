"""The docs cover every command, and say what the code does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from qcache.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == _gen().render(), "run python scripts/gen_cli_docs.py"


def test_every_command_and_option_has_help():
    def walk(cmd: click.Command, name: str):
        yield name, cmd
        if isinstance(cmd, click.Group):
            for sub, c in cmd.commands.items():
                yield from walk(c, f"{name} {sub}")

    for name, cmd in walk(main, "qcache"):
        assert cmd.help, f"{name} has no help text"
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("help",):
                assert p.help or (p.is_flag and p.name == "version"), f"{name} {p.opts[0]} has no help"


def test_readme_starts_with_the_two_newcomer_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("make demo") and block[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
