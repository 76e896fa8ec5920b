"""Datasets and prompts: the study's samples (shipped), full BoolQ with passages, local files, the Hub.

Every dataset declares its label words; gold labels are stored as indices into them.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qcache.store.errors import DataError, InvalidName, InvalidOption
from qcache.store.keys import safe_name

BOOLQ_TEMPLATE = "Respond with True or False only.\n{question}\nAnswer:"
BOOLQ_PASSAGE_TEMPLATE = (
    "Respond with True or False only.\nPassage: {passage}\nQuestion: {question}?\nAnswer:"
)


@dataclass(frozen=True)
class Dataset:
    """Prompts with gold label indices into ``labels``."""

    name: str
    labels: tuple[str, ...]
    prompts: list[str]
    gold: np.ndarray  # (examples,) int16
    source_rows: np.ndarray  # (examples,) int64, row of each example in the source
    spec: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class DatasetRequest:
    """What the user asked for on the command line."""

    name: str = "boolq"
    limit: int | None = None
    seed: int = 42
    split: str = "all"
    with_passage: bool = False
    text_field: str | None = None
    label_field: str | None = None
    labels: tuple[str, ...] | None = None
    template: str | None = None


BUILTIN = {
    "boolq": ("boolq.csv.gz", ("False", "True")),
    "toxicity": ("toxicity.csv.gz", ("False", "True")),
    "piqa": ("piqa.csv.gz", ("A", "B")),
    "hellaswag": ("hellaswag.csv.gz", ("0", "1", "2", "3")),
}
ALIASES = {"jigsaw": "toxicity"}


def load_dataset(req: DatasetRequest) -> Dataset:
    """Load, filter by split, sample (``limit`` with ``seed``) and wrap prompts."""
    name = ALIASES.get(req.name, req.name)
    if name == "boolq" and req.with_passage:
        ds = _boolq_passages(req)
    elif name in BUILTIN:
        ds = _builtin(name, req)
    elif Path(req.name).expanduser().exists():
        ds = _local_file(Path(req.name).expanduser(), req)
    elif req.name.startswith("hf:"):
        ds = _hub(req.name[3:], req)
    else:
        raise InvalidName(
            f"unknown dataset {req.name!r}: use one of {', '.join([*BUILTIN, *ALIASES])}, "
            "a local .jsonl/.csv/.parquet file, or hf:ORG/NAME"
        )
    if len(ds) == 0:
        raise DataError(
            f"dataset {ds.name} has no examples (split={req.split!r}): check --split and the file"
        )
    return _sample(ds, req)


def _rows_from_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def _shipped(filename: str) -> bytes:
    return gzip.decompress(resources.files("qcache.data").joinpath(filename).read_bytes())


def _builtin(name: str, req: DatasetRequest) -> Dataset:
    filename, labels = BUILTIN[name]
    rows = _rows_from_csv(_shipped(filename))
    if req.split != "all":
        if name != "boolq":
            raise InvalidOption(f"--split applies to boolq only; {name} is one sample: drop --split")
        rows = [r for r in rows if r["split"] == req.split]
    template = BOOLQ_TEMPLATE if name == "boolq" else "{prompt}"
    prompts = [template.format(question=r["prompt"], prompt=r["prompt"]) for r in rows]
    gold = _gold_indices([r["gold"] for r in rows], labels, name)
    spec = {"source": f"qcache/data/{filename}", "template": template}
    return Dataset(name, labels, prompts, gold, np.arange(len(rows)), spec)


def _boolq_passages(req: DatasetRequest) -> Dataset:
    splits = ["train", "validation"] if req.split == "all" else [req.split]
    rows: list[dict[str, Any]] = []
    for split in splits:
        if split not in ("train", "validation"):
            raise InvalidOption(f"--split {split!r}: BoolQ has train and validation (or all)")
        text = _shipped(f"boolq-passages-{split}.jsonl.gz").decode()
        rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    labels = ("False", "True")
    prompts = [BOOLQ_PASSAGE_TEMPLATE.format(passage=r["passage"], question=r["question"]) for r in rows]
    gold = _gold_indices([str(r["answer"]) for r in rows], labels, "boolq")
    spec = {
        "source": "qcache/data/boolq-passages",
        "template": BOOLQ_PASSAGE_TEMPLATE,
        "with_passage": True,
    }
    return Dataset("boolq-passage", labels, prompts, gold, np.arange(len(rows)), spec)


def _local_file(path: Path, req: DatasetRequest) -> Dataset:
    rows = _read_table(path)
    if not rows:
        raise DataError(f"dataset file {path} has no rows")
    text_field = req.text_field or _guess(rows[0], ("prompt", "text", "question", "sentence"), "text", path)
    label_field = req.label_field or _guess(rows[0], ("gold", "label", "answer"), "label", path)
    for fld, opt in ((text_field, "--text-field"), (label_field, "--label-field")):
        if fld not in rows[0]:
            raise DataError(f"column {fld!r} is not in {path} (columns: {', '.join(rows[0])}); set {opt}")
    raw_gold = [str(r[label_field]) for r in rows]
    labels = req.labels or tuple(sorted(set(raw_gold)))
    template = req.template or "{text}"
    if "{text}" not in template:
        raise InvalidOption("--template must contain {text}, where each example's text goes")
    prompts = [template.replace("{text}", str(r[text_field])) for r in rows]
    name = safe_name(path.name.split(".")[0], "dataset")
    gold = _gold_indices(raw_gold, labels, name)
    spec = {
        "source": str(path.resolve()),
        "template": template,
        "text_field": text_field,
        "label_field": label_field,
    }
    return Dataset(name, tuple(labels), prompts, gold, np.arange(len(rows)), spec)


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    opener = gzip.open if path.suffix == ".gz" else open
    kind = suffixes[-1] if suffixes else ""
    if kind == ".jsonl":
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            return [json.loads(line) for line in fh if line.strip()]
    if kind == ".csv":
        with opener(path, "rt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
            return list(csv.DictReader(fh))
    if kind == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"cannot read {path}: use a .jsonl, .csv or .parquet file (optionally .gz)")


def _hub(name: str, req: DatasetRequest) -> Dataset:
    try:
        import datasets as hf
    except ImportError as exc:
        raise InvalidOption(
            "hf: datasets need the `datasets` package (pip install 'qcache[extract]')"
        ) from exc
    try:
        table = hf.load_dataset(name, split="train" if req.split == "all" else req.split)
    except Exception as exc:  # the Hub client raises many types when offline
        raise InvalidName(
            f"dataset hf:{name} cannot be loaded (offline or unknown: {str(exc)[:120]})"
        ) from exc
    tmp = [dict(r) for r in table]
    fake = Path(name.replace("/", "--"))
    text_field = req.text_field or _guess(tmp[0], ("prompt", "text", "question", "sentence"), "text", fake)
    label_field = req.label_field or _guess(tmp[0], ("gold", "label", "answer"), "label", fake)
    raw_gold = [str(r[label_field]) for r in tmp]
    labels = req.labels or tuple(sorted(set(raw_gold)))
    template = req.template or "{text}"
    prompts = [template.replace("{text}", str(r[text_field])) for r in tmp]
    gold = _gold_indices(raw_gold, labels, name)
    spec = {"source": f"hf:{name}", "template": template}
    return Dataset(
        safe_name(name.split("/")[-1], "dataset"),
        tuple(labels),
        prompts,
        gold,
        np.arange(len(tmp)),
        spec,
    )


def _guess(row: dict[str, Any], names: Iterable[str], what: str, path: Path) -> str:
    for n in names:
        if n in row:
            return n
    opt = "--text-field" if what == "text" else "--label-field"
    raise DataError(f"no {what} column found in {path} (columns: {', '.join(row)}); name it with {opt}")


def _gold_indices(values: list[str], labels: tuple[str, ...], name: str) -> np.ndarray:
    """Map gold values to label indices: by label word (case-insensitive), else by integer index."""
    lookup = {w.lower(): i for i, w in enumerate(labels)}
    out = np.empty(len(values), dtype=np.int16)
    bad: list[str] = []
    for i, v in enumerate(values):
        key = v.strip().lower()
        if key in lookup:
            out[i] = lookup[key]
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(labels):
            out[i] = int(key)
        else:
            bad.append(v)
    if bad:
        shown = ", ".join(repr(b) for b in sorted(set(bad))[:5])
        raise DataError(
            f"{len(bad)} gold label(s) of {name} are outside its label set {list(labels)} (e.g. {shown}); "
            "fix the data or pass --labels with every label word"
        )
    return out


def _sample(ds: Dataset, req: DatasetRequest) -> Dataset:
    spec = {
        **ds.spec,
        "name": ds.name,
        "labels": list(ds.labels),
        "split": req.split,
        "seed": req.seed,
        "limit": req.limit,
        "n_source_rows": len(ds),
    }
    if req.limit is None or req.limit >= len(ds):
        return Dataset(
            ds.name, ds.labels, ds.prompts, ds.gold, ds.source_rows, {**spec, "n_examples": len(ds)}
        )
    if req.limit < 1:
        raise InvalidOption(f"--limit {req.limit} must be at least 1")
    rng = np.random.default_rng(req.seed)
    pick = np.sort(rng.choice(len(ds), size=req.limit, replace=False))
    return Dataset(
        ds.name,
        ds.labels,
        [ds.prompts[i] for i in pick],
        ds.gold[pick],
        ds.source_rows[pick],
        {**spec, "n_examples": int(req.limit)},
    )
