"""The ``qcache`` command line: each command parses options, calls one library function, prints.

Heavy libraries (torch, transformers, bitsandbytes, captum) are imported only inside ``extract``; every
other command, ``--help`` included, runs without them.
"""

from __future__ import annotations

import click

from qcache.commands.analysis import analyze
from qcache.commands.comparing import compare
from qcache.commands.extraction import attribute, extract
from qcache.commands.inventory import ls_command, models, verify
from qcache.commands.maintenance import migrate
from qcache.commands.methods import methods
from qcache.commands.options import examples
from qcache.commands.planning import plan
from qcache.commands.querying import report, sql


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=examples(
        "qcache extract --model smollm2-135m --bits 4 --limit 64 --device cpu",
        "qcache analyze all --format json",
        'qcache sql "SELECT quant, layer, pct_dead FROM dead_neurons ORDER BY layer"',
    ),
)
@click.version_option(package_name="qcache")
def main() -> None:
    """Cache LLM activations at 4/8/16/32 bits and analyze what quantization did to the neurons."""


for command in (
    extract, attribute, plan, ls_command, verify, migrate, models, methods, analyze, compare, sql, report
):  # fmt: skip
    main.add_command(command)


if __name__ == "__main__":
    main()
