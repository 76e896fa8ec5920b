"""Dataset files (.jsonl, .csv, .parquet, optionally .gz) and Hub datasets: rows -> prompts and gold labels.

Local files and ``hf:`` datasets share :func:`examples_from_rows`, so both follow one set of rules
(docs/extract.md, "Dataset files"): UTF-8 text with or without a byte-order mark; CSV per RFC 4180 (CRLF or LF
line ends, quoted fields holding newlines); the label rule of :mod:`qcache.extract.inputs.gold_labels`; and
refusals, each naming the rows, for missing or blank texts and for repeated ids.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcache.extract.inputs.gold_labels import (
    declared_labels,
    gold_indices,
    infer_labels,
    refuse_mixed_kinds,
    refuse_non_scalar,
    refuse_one_label,
    rows_text,
    value_text,
)
from qcache.store.errors import DataError, InvalidName, InvalidOption

TEXT_FIELDS = ("prompt", "text", "question", "sentence")
LABEL_FIELDS = ("gold", "label", "answer")
# Columns that name an example: a value seen twice means a row given twice (e.g. a file concatenated with
# itself), which would count that example twice in every accuracy and mean.
ID_FIELDS = ("id", "idx", "example_id", "guid", "uid")
ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is dropped


@dataclass(frozen=True)
class Examples:
    """What a file or Hub dataset yields: label words, prompts, gold indices and the spec entries."""

    labels: tuple[str, ...]
    prompts: list[str]
    gold: np.ndarray  # (examples,) int16 indices into labels
    spec: dict[str, Any] = field(default_factory=dict)


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl``/``.csv``/``.parquet`` file, optionally gzipped (suffixes in any case).

    Raises:
        DataError: another suffix, text that is not UTF-8, a JSON line that is not an object, a malformed
            CSV or Parquet file.
    """
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    kind = (suffixes[:-1] if gz else suffixes)[-1:] or [""]
    try:
        if kind == [".jsonl"]:
            with _open_text(path, gz, newline=None) as fh:
                return list(_json_lines(fh, path))
        if kind == [".csv"]:
            # newline="": the csv module itself reads CRLF line ends and newlines inside quoted fields
            with _open_text(path, gz, newline="") as fh:
                return _csv_rows(fh, path)
        if kind == [".parquet"]:
            import pyarrow.parquet as pq

            source: Any = io.BytesIO(gzip.decompress(path.read_bytes())) if gz else path
            return pq.read_table(source).to_pylist()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (it holds byte {exc.object[exc.start : exc.start + 1]!r}): "
            "save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from exc
    except (csv.Error, OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {path}: {str(exc)[:160]}; check the file") from exc
    raise DataError(f"cannot read {path}: use a .jsonl, .csv or .parquet file (optionally .gz)")


def _open_text(path: Path, gz: bool, newline: str | None) -> io.TextIOWrapper:
    raw = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115 (the wrapper closes it)
    return io.TextIOWrapper(raw, encoding=ENCODING, newline=newline)


def _csv_rows(fh: io.TextIOWrapper, path: Path) -> list[dict[str, Any]]:
    rows = list(csv.DictReader(fh))
    long = [i for i, r in enumerate(rows) if None in r]  # DictReader files surplus fields under None
    if long:
        raise DataError(
            f"{len(long)} row(s) of {path} have more fields than its header at {rows_text(long)}: "
            "quote fields that contain commas"
        )
    return rows


def _json_lines(lines: Iterable[str], path: Path) -> Iterator[dict[str, Any]]:
    # iterating a file splits on line ends only (str.splitlines would also split on U+2028 inside strings)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {n} of {path} is not JSON ({exc.msg}): one JSON object per line") from exc
        if not isinstance(row, dict):
            raise DataError(f"line {n} of {path} is a {type(row).__name__}, not a JSON object")
        yield row


def hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    """The rows of Hub dataset ``name`` (split ``train`` for ``all``), class-label columns as their names.

    A ``datasets.ClassLabel`` column stores integers whose meaning is the feature's ``names``; reading the
    names keeps an index from being matched against a differently ordered ``--labels``.
    """
    try:
        import datasets as hf
    except ImportError as exc:
        raise InvalidOption(
            "hf: datasets need the `datasets` package (pip install 'qcache[extract]')"
        ) from exc
    try:
        table = hf.load_dataset(name, split="train" if split == "all" else split)
    except Exception as exc:  # the Hub client raises many types when offline
        raise InvalidName(
            f"dataset hf:{name} cannot be loaded (offline or unknown: {str(exc)[:120]})"
        ) from exc
    names = {c: f.names for c, f in table.features.items() if isinstance(f, hf.ClassLabel)}
    rows = [dict(r) for r in table]
    for c, words in names.items():
        for r in rows:
            v = r[c]
            r[c] = words[v] if isinstance(v, int) and 0 <= v < len(words) else None  # -1: no label
    return rows


def examples_from_rows(rows: list[dict[str, Any]], req: Any, name: str, where: str) -> Examples:
    """Prompts and gold indices of ``rows`` (a file's or a Hub split's), per ``req`` (a DatasetRequest).

    ``where`` names the source in messages. The label rule is
    :func:`qcache.extract.inputs.gold_labels.gold_indices` with labels from ``req.labels`` or
    :func:`~qcache.extract.inputs.gold_labels.infer_labels`.

    Raises:
        DataError: no rows; a missing column; texts that are not strings, missing or blank; repeated ids;
            golds that are not single values, missing or outside the label set (each naming the rows);
            inferred golds mixing words and integers; fewer than two inferred labels.
        InvalidOption: a template without ``{text}``; empty or repeated ``--labels`` words, or fewer than
            two.
    """
    if not rows:
        raise DataError(f"dataset {where} has no rows")
    columns = list(dict.fromkeys(c for r in rows for c in r))  # jsonl rows may differ: every key seen
    text_field = req.text_field or _guess(columns, TEXT_FIELDS, "text", where)
    label_field = req.label_field or _guess(columns, LABEL_FIELDS, "label", where)
    for fld, opt in ((text_field, "--text-field"), (label_field, "--label-field")):
        if fld not in columns:
            raise DataError(f"column {fld!r} is not in {where} (columns: {_cols(columns)}); set {opt}")
    template = req.template or "{text}"
    if "{text}" not in template:
        raise InvalidOption("--template must contain {text}, where each example's text goes")
    texts = _texts([r.get(text_field) for r in rows], text_field, where)
    blank = [i for i, t in enumerate(texts) if t is None or not t.strip()]
    if blank:
        raise DataError(
            f"{len(blank)} example(s) of {where} have a missing, empty or whitespace-only {text_field!r} at "
            f"{rows_text(blank)}: fill them in or drop those rows (skipping them would change N)"
        )
    _refuse_repeated_ids(rows, columns, where)
    golds = [r.get(label_field) for r in rows]
    refuse_non_scalar(golds, where)
    spec: dict[str, Any] = {"template": template, "text_field": text_field, "label_field": label_field}
    if req.labels:
        labels = declared_labels(req.labels)
    else:
        gold_texts = [value_text(g) for g in golds]
        refuse_mixed_kinds(gold_texts, where)
        labels, spellings = infer_labels(gold_texts)
        if spellings:
            spec["label_spellings"] = spellings
    refuse_one_label(labels, bool(req.labels), where)
    gold, as_index = gold_indices(golds, labels, name, allow_index=bool(req.labels))
    if as_index:
        spec["gold_as_index"] = True
    prompts = [template.replace("{text}", t) for t in texts]  # type: ignore[arg-type]
    return Examples(labels, prompts, gold, spec)


def _texts(values: list[Any], text_field: str, where: str) -> list[str | None]:
    """Each row's text (``None`` when missing: ``None`` or NaN); refuses texts that are not strings.

    A number, boolean, JSON array or object in the text column is refused rather than turned into its
    ``str``/``repr``: it most likely means the wrong column (or a file written with unquoted numbers).
    """
    out: list[str | None] = []
    bad: list[int] = []
    for i, v in enumerate(values):
        if isinstance(v, str) or v is None or (isinstance(v, float) and v != v):  # v != v: NaN
            out.append(v if isinstance(v, str) else None)
        else:
            bad.append(i)
            out.append(None)
    if bad:
        first = values[bad[0]]
        raise DataError(
            f"{len(bad)} text(s) in column {text_field!r} of {where} are not strings at {rows_text(bad)} "
            f"(e.g. {first!r}, of type {type(first).__name__}): give each text as a string (quote numbers in "
            "JSON), or name the text column with --text-field"
        )
    return out


def _refuse_repeated_ids(rows: list[dict[str, Any]], columns: list[str], where: str) -> None:
    for col in (c for c in columns if c.strip().lower() in ID_FIELDS):
        seen: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            v = value_text(r.get(col))
            if v is not None and v.strip():
                seen[v.strip()].append(i)
        repeated = {v: rs for v, rs in seen.items() if len(rs) > 1}
        if repeated:
            shown = "; ".join(f"{v!r} at {rows_text(rs)}" for v, rs in list(repeated.items())[:3])
            raise DataError(
                f"{len(repeated)} id(s) in column {col!r} of {where} repeat: {shown}; each example must "
                "appear once, so drop the repeated rows, or rename the column if it is not an id"
            )


def _guess(columns: list[str], names: Iterable[str], what: str, where: str) -> str:
    for n in names:
        if n in columns:
            return n
    opt = "--text-field" if what == "text" else "--label-field"
    raise DataError(f"no {what} column found in {where} (columns: {_cols(columns)}); name it with {opt}")


def _cols(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns)  # repr: a stray BOM or space in a header is visible
