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


def _walk(cmd: click.Command, ctx: click.Context) -> list[click.Context]:
    """Contexts of every command, each with its real parent (so `-h` is inherited as on the command line)."""
    out = [ctx]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            sub = cmd.commands[name]
            out += _walk(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True))
    return out


def render() -> str:
    intro = "Generated from the commands' own `--help` by `scripts/gen_cli_docs.py`."
    lines = ["# CLI reference", "", intro, ""]
    root = main.make_context("qcache", [], resilient_parsing=True, terminal_width=100, max_content_width=100)
    for ctx in _walk(main, root):
        lines += [f"## `{ctx.command_path}`", "", "```text", ctx.command.get_help(ctx), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/cli.md is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
