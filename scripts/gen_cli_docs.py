"""Write docs/cli.md from the click commands' own help (run after changing an option).

python scripts/gen_cli_docs.py          # rewrite docs/cli.md
python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qcache.cli import main

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _walk(cmd: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            out += _walk(cmd.commands[name], [*path, name])
    return out


def render() -> str:
    lines = [
        "# CLI reference",
        "",
        "Generated from the commands' own `--help` by `scripts/gen_cli_docs.py`.",
        "",
    ]
    for path, cmd in _walk(main, ["qcache"]):
        ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=100, max_content_width=100)
        lines += [f"## `{' '.join(path)}`", "", "```text", cmd.get_help(ctx), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/cli.md is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
