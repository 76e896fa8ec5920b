"""Gold labels of a dataset: one normalization for inferring the label words and for looking golds up.

The rule (docs/extract.md, "Dataset files"):

- a gold *value* becomes text by :func:`value_text` (strings as they are, ``True``/``False`` for booleans,
  decimal digits for integers and for floats that are whole numbers, ``repr`` for other floats; ``None``
  and NaN are missing);
- its *key* is :func:`label_key`: the text with surrounding whitespace stripped, case-folded
  (``str.casefold``) only when the label set stays free of collisions once folded (:func:`folds_case`);
- without ``--labels`` the label words are inferred (:func:`infer_labels`): one label per key (folded),
  spelled as the most common stripped spelling of that key in the file (ties: the first seen), sorted as
  text;
- a gold whose key is not a label's key is an error naming it. Integer golds are read as indices into the
  label words only when that is unambiguous and declared (:func:`gold_indices`);
- refused outright: golds that are not single values (:func:`refuse_non_scalar`), inferred golds mixing words
  and integers (:func:`refuse_mixed_kinds`) and label sets of fewer than two words (:func:`refuse_one_label`).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import numpy as np

from qcache.store.errors import DataError, InvalidOption

MISSING = None  # what value_text returns for a missing value
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def value_text(value: Any) -> str | None:
    """The text of one cell (a gold value or a text): ``None`` when missing.

    ``None``, float NaN and Decimal NaN are missing; ``bool`` -> ``'True'``/``'False'``; integers and floats
    that are whole numbers -> decimal digits (``2.0`` -> ``'2'``, as a float column holding integers reads
    back from pandas/Parquet); other floats -> ``repr`` (``'0.5'``); strings unchanged; numpy scalars as
    their Python value; anything else (lists, dicts, bytes) -> ``repr`` (such golds are refused first:
    :func:`refuse_non_scalar`).
    """
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Decimal):
        if value.is_nan():
            return MISSING
        return str(int(value)) if value.is_finite() and value == value.to_integral_value() else str(value)
    return repr(value)


def is_scalar(value: Any) -> bool:
    """Whether ``value`` is one cell value: ``None``, a string, boolean, integer, float or Decimal.

    Lists, dicts (JSON arrays/objects), bytes and other objects are not: their ``repr`` would become a label.
    """
    if isinstance(value, np.generic):
        value = value.item()
    return value is None or isinstance(value, str | bool | int | float | Decimal)


def refuse_non_scalar(values: Sequence[Any], where: str) -> None:
    """Refuse golds that are not single values (a JSON object or array, bytes), naming their rows.

    Raises:
        DataError: one or more such golds; the first one is shown with ``repr`` and its type.
    """
    bad = [i for i, v in enumerate(values) if not is_scalar(v)]
    if bad:
        first = values[bad[0]]
        raise DataError(
            f"{len(bad)} gold label(s) of {where} are not a single string, number or boolean at "
            f"{rows_text(bad)} (e.g. {first!r}, of type {type(first).__name__}): "
            "give each row one label value"
        )


def refuse_mixed_kinds(texts: Sequence[str | None], where: str) -> None:
    """Refuse inferred golds mixing words and integers (``1`` and ``'False'``), naming one row of each.

    Such a file most likely holds two encodings of the same labels; inferring ``['1', 'False']`` would
    score them as different classes. Booleans count as words (their text is ``True``/``False``).

    Raises:
        DataError: at least one integer gold and one gold that is not a number.
    """
    stripped = [(t or "").strip() for t in texts]
    ints = [i for i, t in enumerate(stripped) if _INTEGER.fullmatch(t)]
    words = [i for i, t in enumerate(stripped) if t and not _NUMBER.fullmatch(t)]
    if ints and words:
        raise DataError(
            f"gold labels of {where} mix words and integers: words such as {texts[words[0]]!r} "
            f"({rows_text(words[:1])}), integers such as {texts[ints[0]]!r} ({rows_text(ints[:1])}); "
            "pass --labels with the label words (e.g. --labels False,True), or fix the data"
        )


def refuse_one_label(labels: Sequence[str], declared: bool, where: str) -> None:
    """Refuse a label set of fewer than two words: every prediction would be right (accuracy 1, ACE 0).

    Raises:
        InvalidOption: ``declared`` (``--labels``) with one word. DataError: one word inferred from the data.
    """
    if len(labels) >= 2:
        return
    source = "--labels gives" if declared else f"the gold labels of {where} give"
    error = InvalidOption if declared else DataError
    raise error(
        f"{source} only the label {list(labels)!r}, and every metric is perfect with one label: pass "
        "--labels with at least two words (e.g. --labels False,True), or fix the data"
    )


def label_key(text: str, fold: bool) -> str:
    """THE normalization of label words and gold values: strip whitespace, case-fold when ``fold``."""
    stripped = text.strip()
    return stripped.casefold() if fold else stripped


def folds_case(labels: Sequence[str]) -> bool:
    """Whether lookups against ``labels`` fold case: only when no two labels collide once folded."""
    keys = {label_key(w, fold=True) for w in labels}
    return len(keys) == len(labels)


def declared_labels(words: Sequence[str]) -> tuple[str, ...]:
    """``--labels`` as given, stripped; refuses empty words and words given twice.

    Raises:
        InvalidOption: an empty word, or two words equal once stripped.
    """
    labels = tuple(w.strip() for w in words)
    if not labels or any(not w for w in labels):
        raise InvalidOption(
            f"--labels {list(words)!r} has an empty label word: list each word once, e.g. False,True"
        )
    repeated = sorted(w for w, n in Counter(labels).items() if n > 1)
    if repeated:
        raise InvalidOption(
            f"--labels lists {', '.join(map(repr, repeated))} more than once: list each word once"
        )
    return labels


def infer_labels(texts: Sequence[str | None]) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """Label words inferred from the gold texts (``None`` = missing, skipped).

    One label per :func:`label_key` (folded) class; its word is the class's most common stripped spelling
    (ties: the first seen); words sorted as text. Returns ``(labels, spellings)`` where ``spellings`` maps
    each label whose class holds more than one raw spelling to those spellings in first-seen order (the
    manifest records them, so a merge of ``'True '``, ``'true'`` and ``'TRUE'`` can be audited).
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    raw: dict[str, dict[str, None]] = defaultdict(dict)
    for t in texts:
        if t is None or not t.strip():
            continue
        key = label_key(t, fold=True)
        counts[key][t.strip()] += 1  # Counter keeps first-seen order, so most_common breaks ties by it
        raw[key][t] = None
    word = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    labels = tuple(sorted(word.values()))
    spellings = {word[k]: list(r) for k, r in raw.items() if len(r) > 1}
    return labels, dict(sorted(spellings.items()))


def gold_indices(
    values: Sequence[Any], labels: Sequence[str], name: str, *, allow_index: bool = False
) -> tuple[np.ndarray, bool]:
    """Map gold values to indices into ``labels``: ``((examples,) int16, read_as_index)``.

    A gold matches the label with the same :func:`label_key` (case folded iff :func:`folds_case`). A label
    word that is a number is only ever matched as a word. With ``allow_index`` (labels declared by the
    user), golds are read as 0-based indices instead when no label word is a number and every gold is an
    integer in ``0..len(labels)-1`` (Jigsaw's 0/1 ``toxic`` with ``--labels False,True``); then
    ``read_as_index`` is True and the caller records it. Booleans are never indices.

    Raises:
        DataError: missing golds (rows named), or golds outside the label set (each named with ``repr``,
            its count and its first rows).
    """
    texts = [value_text(v) for v in values]
    missing = [i for i, t in enumerate(texts) if t is None or not t.strip()]
    if missing:
        raise DataError(
            f"{len(missing)} gold label(s) of {name} are missing or empty at {rows_text(missing)}: "
            "fill them in or drop those rows"
        )
    fold = folds_case(labels)
    lookup = {label_key(w, fold): i for i, w in enumerate(labels)}
    if allow_index and _indices_unambiguous(values, texts, labels):
        return np.array([int(t) for t in texts], dtype=np.int16), True  # type: ignore[arg-type]
    out = np.empty(len(texts), dtype=np.int16)
    bad: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        j = lookup.get(label_key(t, fold))  # type: ignore[arg-type]
        if j is None:
            bad[repr(values[i])].append(i)
        else:
            out[i] = j
    if bad:
        n = sum(len(r) for r in bad.values())
        shown = "; ".join(f"{v} in {len(r)} row(s): {rows_text(r)}" for v, r in list(bad.items())[:5])
        more = f"; and {len(bad) - 5} other value(s)" if len(bad) > 5 else ""
        hint = ""
        if allow_index and any(_INTEGER.fullmatch((texts[r[0]] or "").strip()) for r in bad.values()):
            hint = (
                "; integer golds are read as indices into --labels only when no label word is a number "
                f"and every gold is an integer in 0..{len(labels) - 1}"
            )
        raise DataError(
            f"{n} gold label(s) of {name} are outside its label set {list(labels)!r}: {shown}{more}{hint}; "
            "fix the data or pass --labels with every label word"
        )
    return out, False


def _indices_unambiguous(values: Sequence[Any], texts: list[str | None], labels: Sequence[str]) -> bool:
    if any(_NUMBER.fullmatch(w.strip()) for w in labels):
        return False
    for v, t in zip(values, texts, strict=True):
        if isinstance(v, bool | np.bool_) or t is None or not _INTEGER.fullmatch(t.strip()):
            return False
        if not 0 <= int(t) < len(labels):
            return False
    return True


def rows_text(rows: Sequence[int], limit: int = 5) -> str:
    """``'data rows 3, 7 (from 0)'``: the first ``limit`` of ``rows``, 0-based data rows (no header)."""
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"data row{'s' if len(rows) > 1 else ''} {shown}{more} (from 0)"
