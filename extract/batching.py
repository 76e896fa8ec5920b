"""Forward batches of one unit: examples sorted by length, cut where padding would waste work.

A unit of long, uneven prompts (Jigsaw comments: 93 tokens on average, some 500) holds only a dozen
examples; padding them all to the longest did twice the work the tokens needed. A batch ends at
``batch_size`` examples, or before the example whose length would pad the batch past ``1 + MAX_PADDING``
times its real tokens. Short, even prompts (BoolQ questions) still fill whole batches.
"""

from __future__ import annotations

import numpy as np

MAX_PADDING = 0.25  # padded tokens allowed per real token in a batch of two or more examples


def length_batches(lengths: np.ndarray, batch_size: int) -> list[slice]:
    """Slices of ``lengths`` (sorted ascending) that form the forward batches."""
    out: list[slice] = []
    start, real = 0, 0
    for i, n in enumerate(lengths.tolist()):
        rows = i - start + 1
        if rows > 1 and (rows > batch_size or rows * n > (1 + MAX_PADDING) * (real + n)):
            out.append(slice(start, i))
            start, real = i, 0
        real += n
    if len(lengths):
        out.append(slice(start, len(lengths)))
    return out
