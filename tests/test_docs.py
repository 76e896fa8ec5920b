"""The docs cover every command, and say what the code does."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import click
import pytest

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


def _gpu_table() -> list[list[str]]:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    table = text[text.index("| model | run (per width) |") :].split("\n\n")[0].splitlines()[2:]
    return [[c.strip() for c in row.strip("|").split("|")] for row in table]


def test_quickstart_gpu_table_is_what_plan_predicts():
    """Every figure of the quickstart's GPU table, recomputed by `plan` from the shipped configs."""
    from qcache.extract.attrib.attribution import IGConfig
    from qcache.extract.inputs.datasets import DatasetRequest
    from qcache.extract.plan.estimate import plan_extract
    from qcache.extract.plan.table import duration
    from qcache.extract.run.runner import ExtractConfig
    from qcache.store.space import fmt_bytes

    rows = _gpu_table()
    assert {r[0] for r in rows} == {"llama2-7b", "phi-2", "opt-6.7b"} and len(rows) == 9
    for model, run, disk, memory, times in rows:
        name, *flags = run.split()
        ig = "--attributions" in flags
        limit = int(flags[flags.index("--limit") + 1]) if "--limit" in flags else None
        plans = [
            plan_extract(
                ExtractConfig(
                    model=model,
                    bits=bits,
                    store=Path("unused"),
                    dataset=DatasetRequest(name=name, limit=limit),
                    device="cuda",
                    attributions=IGConfig() if ig else None,
                )
            )
            for bits in (16, 8, 4)
        ]
        if plans[0].tokens.exact:
            pytest.skip(f"{model}'s tokenizer is cached here: the table was made with the character estimate")
        d = plans[0].disk
        assert disk == (fmt_bytes(d.total) if ig else f"{fmt_bytes(d.total)} → ~{fmt_bytes(d.typical)}")
        assert memory == " / ".join(fmt_bytes(p.memory.total) for p in plans), (model, run)
        assert times == " / ".join(duration(p.time.seconds) for p in plans), (model, run)


def test_attribution_families_are_documented():
    """Every family attributions are implemented for (and only those) is named in both docs (issue #15)."""
    from qcache.extract.attrib.ig_fast import REPLAY

    for page in ("attributions.md", "extract.md"):
        text = (ROOT / "docs" / page).read_text()
        line = next(ln for ln in text.replace("\n", " ").split(". ") if "gpt_neox and gpt2" in ln)
        assert set(re.findall(r"\b(llama|mistral|qwen\d|phi|opt|gpt_neox|gpt2)\b", line)) == set(REPLAY), page
