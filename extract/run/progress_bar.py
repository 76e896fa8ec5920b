"""The progress bar of a long extraction: tqdm on stderr that is never drawn again once interrupted.

tqdm draws a bar's final state when it is closed, and closes an unclosed bar when it is garbage
collected: after Ctrl-C that happens at interpreter exit, so the bar reappears below the "interrupted"
line. ``progress_bar`` closes a finished bar as usual, and freezes an interrupted one as it was last drawn.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(**options: Any) -> Iterator[tqdm]:
    """A ``tqdm(file=sys.stderr, **options)``: closed (its final count shown) when the block ends, frozen
    (``freeze``) when an exception, Ctrl-C's ``KeyboardInterrupt`` included, leaves it."""
    bar = tqdm(file=sys.stderr, **options)
    try:
        yield bar
    except BaseException:
        freeze(bar)
        raise
    bar.close()


def freeze(bar: tqdm) -> None:
    """Stop ``bar`` drawing (refresh, close and collection draw nothing once ``disable`` is set) and end
    its line, so what is printed next starts on a line of its own."""
    if bar.disable:
        return
    drawn = getattr(bar, "last_print_t", bar.start_t) >= bar.start_t + bar.delay
    bar.disable = True
    if drawn:
        with contextlib.suppress(ValueError, OSError):  # stderr closed: nothing to end
            bar.fp.write("\n")
            bar.fp.flush()
