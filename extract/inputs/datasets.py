"""Datasets and prompts: the study's samples (shipped), full BoolQ with passages, local files, the Hub.

Every dataset declares its label words; gold labels are stored as indices into them. Local files and Hub
datasets are read by :mod:`qcache.extract.inputs.dataset_files`, their labels by
:mod:`qcache.extract.inputs.gold_labels`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qcache.extract.inputs.dataset_files import ENCODING, examples_from_rows, hub_rows, read_table
from qcache.extract.inputs.gold_labels import gold_indices
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
FILE_SUFFIXES = (".csv", ".jsonl", ".parquet", ".gz")


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
    elif _looks_like_path(req.name):
        path = Path(req.name).expanduser()
        where = "" if path.is_absolute() else f" (relative to {str(Path.cwd())!r})"
        raise InvalidName(f"dataset file {req.name!r} does not exist{where}: check the path")
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


def _looks_like_path(name: str) -> bool:
    """A name holding a path separator or ending in a data file suffix is a file, never a dataset name."""
    seps = {"/", os.sep, os.altsep} - {None}
    return any(sep in name for sep in seps) or name.lower().endswith(FILE_SUFFIXES)


def _rows_from_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode(ENCODING), newline="")))


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
        text = _shipped(f"boolq-passages-{split}.jsonl.gz").decode(ENCODING)
        # split on line ends only: str.splitlines would also cut at a U+2028 inside a JSON string
        rows += [json.loads(line) for line in io.StringIO(text, newline=None) if line.strip()]
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
    if req.split != "all":  # a file is read whole: recording a split it was not cut to would mislabel the run
        raise InvalidOption(
            f"--split {req.split!r} does not apply to a local file (it is read whole): drop --split, "
            "or pass a file holding only that split"
        )
    name = safe_name(path.name.split(".")[0], "dataset")
    ex = examples_from_rows(read_table(path), req, name, str(path))
    spec = {"source": str(path.resolve()), **ex.spec}
    return Dataset(name, ex.labels, ex.prompts, ex.gold, np.arange(len(ex.prompts)), spec)


def _hub(hub_name: str, req: DatasetRequest) -> Dataset:
    # the same path as a local file from the rows on: one set of rules for both
    name = safe_name(hub_name.split("/")[-1], "dataset")
    ex = examples_from_rows(hub_rows(hub_name, req.split), req, name, f"hf:{hub_name}")
    spec = {"source": f"hf:{hub_name}", **ex.spec}
    return Dataset(name, ex.labels, ex.prompts, ex.gold, np.arange(len(ex.prompts)), spec)


def _gold_indices(values: list[str], labels: tuple[str, ...], name: str) -> np.ndarray:
    """Gold words of a shipped dataset as indices into its label words (never read as indices)."""
    return gold_indices(values, labels, name)[0]


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
