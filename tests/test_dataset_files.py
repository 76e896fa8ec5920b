"""Dataset files read right or refused with the rows named: encodings, line ends, label normalization.

Every expected value is written out by hand from the bytes of the file in tests/data/datasets/ (or the
Parquet/Hub table built here): the label words, each prompt and each gold index.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qcache.cli import main
from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
from qcache.store.errors import DataError, InvalidName, InvalidOption

DATA = Path(__file__).parent / "data" / "datasets"
Q5 = ["q0", "q1", "q2", "q3", "q4"]

# (case, file, request options, label words, prompts, gold indices)
READ = [
    ("BOM csv", "bom.csv", {}, ("False", "True"), ["is it", "is it not"], [1, 0]),
    (
        "BOM csv, columns named",
        "bom.csv",
        {"text_field": "text", "label_field": "label"},
        ("False", "True"),
        ["is it", "is it not"],
        [1, 0],
    ),
    ("BOM jsonl", "bom.jsonl", {}, ("False", "True"), ["is it", "is it not"], [1, 0]),
    ("CRLF csv, no final line end", "crlf.csv", {}, ("A", "B"), ["first", "second", "third"], [0, 1, 0]),
    (
        "quoted newlines, commas and quotes",
        "quoted.csv",
        {},
        ("A", "B"),
        ["line one\r\nline two", 'a, b "c"', "x\ny"],
        [1, 0, 0],
    ),
    ("U+2028 inside a JSON string", "separator.jsonl", {}, ("A", "B"), ["one\u2028two", "three"], [0, 1]),
    # 'True ', 'false', 'FALSE', ' true', 'True': classes true (True x2, true x1), false (a tie: first seen)
    ("trailing spaces and case, inferred", "spaces_case.csv", {}, ("True", "false"), Q5, [0, 1, 1, 0, 0]),
    (
        "trailing spaces and case, declared",
        "spaces_case.csv",
        {"labels": ("False", "True")},
        ("False", "True"),
        Q5,
        [1, 0, 0, 1, 1],
    ),
    ("labels differing only in case", "two_cases.csv", {"labels": ("a", "A")}, ("a", "A"), Q5[:3], [0, 1, 0]),
    (
        "numeric label words",
        "numeric_ok.csv",
        {"labels": ("1", "5", "10")},
        ("1", "5", "10"),
        Q5[:3],
        [2, 0, 1],
    ),
    (
        "integer golds read as indices",
        "index.csv",
        {"label_field": "toxic", "labels": ("False", "True")},
        ("False", "True"),
        Q5[:3],
        [0, 1, 1],
    ),
]

# (case, file, request options, error type, texts the message must contain)
REFUSE = [
    (
        "gold outside numeric labels",
        "numeric.csv",
        {"labels": ("1", "5", "10")},
        DataError,
        ["['1', '5', '10']", "'2' in 2 row(s): data rows 3, 4"],
    ),
    (
        "word and integer golds mixed",
        "words_and_index.csv",
        {"labels": ("False", "True")},
        DataError,
        ["'0' in 1 row(s): data row 1"],
    ),
    (
        "empty and whitespace-only texts",
        "empty_text.csv",
        {},
        DataError,
        ["3 example(s)", "data rows 0, 1, 3"],
    ),
    ("repeated ids", "dup_ids.csv", {}, DataError, ["column 'id'", "'1' at data rows 0, 2"]),
    ("repeated idx in jsonl", "dup_idx.jsonl", {}, DataError, ["column 'idx'", "'7' at data rows 0, 2"]),
    ("not UTF-8", "latin1.csv", {}, DataError, ["not UTF-8", "b'\\xe9'"]),
    (
        "a label word twice",
        "bom.csv",
        {"labels": ("True", "True ")},
        InvalidOption,
        ["'True' more than once"],
    ),
    ("a split of a whole file", "bom.csv", {"split": "validation"}, InvalidOption, ["--split 'validation'"]),
    # golds 'a' and 'A' fold into the one label 'a': every prediction would be right (accuracy 1, ACE 0)
    (
        "one label inferred",
        "one_label.jsonl",
        {},
        DataError,
        ["only the label ['a']", "--labels with at least two words"],
    ),
    (
        "one label declared",
        "one_label.jsonl",
        {"labels": ("a",)},
        InvalidOption,
        ["--labels gives only the label ['a']", "at least two words"],
    ),
    (
        "golds a JSON object and array",
        "object_gold.jsonl",
        {},
        DataError,
        ["2 gold label(s)", "data rows 1, 3", "{'v': 1}, of type dict"],
    ),
    (
        "golds a JSON object, labels declared",
        "object_gold.jsonl",
        {"labels": ("neg", "pos")},
        DataError,
        ["2 gold label(s)", "data rows 1, 3"],
    ),
    (
        "text a JSON array",
        "list_text.jsonl",
        {},
        DataError,
        ["column 'text'", "data row 0", "['q', '0'], of type list"],
    ),
    (
        "text a JSON number",
        "number_text.jsonl",
        {},
        DataError,
        ["column 'text'", "data row 1", "7, of type int"],
    ),
    (
        "words and integers mixed, inferred (jsonl)",
        "words_and_ints.jsonl",
        {},
        DataError,
        ["mix words and integers", "'False' (data row 1", "'1' (data row 0", "pass --labels"],
    ),
    (
        "words and integers mixed, inferred (csv)",
        "words_and_index.csv",
        {},
        DataError,
        ["mix words and integers", "'True' (data row 0", "'0' (data row 1"],
    ),
]


def _copy(name: str, tmp_path: Path, gz: bool) -> Path:
    src = DATA / name
    if not gz:
        return Path(shutil.copy(src, tmp_path / name))
    out = tmp_path / f"{name}.gz"
    out.write_bytes(gzip.compress(src.read_bytes()))
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(
    ("case", "name", "opts", "labels", "prompts", "gold"), READ, ids=[c[0] for c in READ]
)
def test_file_is_read_right(tmp_path, gz, case, name, opts, labels, prompts, gold):
    ds = load_dataset(DatasetRequest(name=str(_copy(name, tmp_path, gz)), **opts))
    assert ds.labels == labels
    assert ds.prompts == prompts
    assert ds.gold.tolist() == gold
    assert ds.source_rows.tolist() == list(range(len(gold)))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(("case", "name", "opts", "error", "texts"), REFUSE, ids=[c[0] for c in REFUSE])
def test_file_is_refused_naming_what(tmp_path, gz, case, name, opts, error, texts):
    with pytest.raises(error) as info:
        load_dataset(DatasetRequest(name=str(_copy(name, tmp_path, gz)), **opts))
    message = str(info.value)
    assert "\n" not in message
    for text in texts:
        assert text in message, message


def test_the_spec_records_index_reading_and_merged_spellings():
    index = load_dataset(
        DatasetRequest(name=str(DATA / "index.csv"), label_field="toxic", labels=("False", "True"))
    )
    assert index.spec["gold_as_index"] is True
    words = load_dataset(DatasetRequest(name=str(DATA / "numeric_ok.csv"), labels=("1", "5", "10")))
    assert "gold_as_index" not in words.spec
    merged = load_dataset(DatasetRequest(name=str(DATA / "spaces_case.csv")))
    assert merged.spec["label_spellings"] == {"True": ["True ", " true", "True"], "false": ["false", "FALSE"]}
    assert merged.spec["labels"] == ["True", "false"]


@pytest.mark.parametrize(
    "name", ["{tmp}/x/nonexist.csv", "nonexist.jsonl", "data.PARQUET", "d.csv.gz", "sub/boolq"]
)
def test_a_missing_file_is_named_as_a_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    name = name.replace("{tmp}", str(tmp_path))
    with pytest.raises(InvalidName) as info:
        load_dataset(DatasetRequest(name=name))
    message = str(info.value)
    assert f"dataset file {name!r} does not exist" in message, message
    assert "unknown dataset" not in message and "\n" not in message


def test_a_name_that_is_no_path_is_an_unknown_dataset():
    with pytest.raises(InvalidName, match="unknown dataset 'boolqq': use one of boolq"):
        load_dataset(DatasetRequest(name="boolqq"))


def test_suffix_case_does_not_matter(tmp_path):
    path = tmp_path / "BOM.CSV"
    path.write_bytes((DATA / "bom.csv").read_bytes())
    assert load_dataset(DatasetRequest(name=str(path))).gold.tolist() == [1, 0]


# (case, label column, --labels, label words | None, gold indices | texts of the refusal)
TYPED: list[tuple[str, Any, tuple[str, ...] | None, tuple[str, ...] | None, list[Any]]] = [
    ("integer", [10, 1, 5, 5], ("1", "5", "10"), ("1", "5", "10"), [2, 0, 1, 1]),
    ("integer outside numeric labels", [1, 2, 10], ("1", "5", "10"), None, ["2 in 1 row(s): data row 1"]),
    ("integer as index", [0, 1, 1], ("neg", "pos"), ("neg", "pos"), [0, 1, 1]),
    ("integer index out of range", [0, 2], ("neg", "pos"), None, ["2 in 1 row(s): data row 1"]),
    ("boolean inferred", [True, False, True], None, ("False", "True"), [1, 0, 1]),
    ("boolean, labels lower case", [True, False], ("false", "true"), ("false", "true"), [1, 0]),
    ("boolean is not an index", [True, False], ("neg", "pos"), None, ["True in 1 row(s): data row 0"]),
    ("float that is an integer", [1.0, 0.0, 1.0], ("0", "1"), ("0", "1"), [1, 0, 1]),
    ("float that is an integer, inferred", [1.0, 0.0], None, ("0", "1"), [1, 0]),
    ("float outside numeric labels", [2.0, 1.0], ("1", "5", "10"), None, ["2.0 in 1 row(s): data row 0"]),
    ("float not an integer", [0.5, 1.0], ("0", "1"), None, ["0.5 in 1 row(s): data row 0"]),
    ("float NaN", [1.0, float("nan")], ("0", "1"), None, ["missing or empty at data row 1"]),
    ("list", [["a"], ["b"], ["a"]], None, None, ["3 gold label(s)", "not a single string, number"]),
    ("one boolean", [True, True], None, None, ["only the label ['True']"]),
    ("string None", ["a", None, "b"], None, None, ["missing or empty at data row 1"]),
    ("categorical", ("dict", ["pos", "neg", "pos"]), None, ("neg", "pos"), [1, 0, 1]),
    ("categorical, declared", ("dict", ["pos", "neg", "pos"]), ("neg", "pos"), ("neg", "pos"), [1, 0, 1]),
    (
        "categorical integers outside",
        ("dict", [10, 2, 1]),
        ("1", "5", "10"),
        None,
        ["2 in 1 row(s): data row 1"],
    ),
]


def _parquet(tmp_path: Path, labels: Any, texts: list[Any] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(labels, tuple):  # ("dict", values): a dictionary (pandas categorical) column
        column = pa.array(labels[1]).dictionary_encode()
        assert pa.types.is_dictionary(column.type)
    else:
        column = pa.array(labels)
    texts = texts if texts is not None else [f"t{i}" for i in range(len(column))]
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"text": texts, "label": column}), path)
    return path


@pytest.mark.parametrize(("case", "column", "declared", "labels", "expect"), TYPED, ids=[c[0] for c in TYPED])
def test_parquet_label_types(tmp_path, case, column, declared, labels, expect):
    req = DatasetRequest(name=str(_parquet(tmp_path, column)), labels=declared)
    if labels is None:
        with pytest.raises(DataError) as info:
            load_dataset(req)
        assert expect[0] in str(info.value), str(info.value)
        return
    ds = load_dataset(req)
    assert ds.labels == labels
    assert ds.gold.tolist() == expect


def test_parquet_missing_text_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"data row 1 \(from 0\)"):
        load_dataset(DatasetRequest(name=str(_parquet(tmp_path, ["a", "b"], texts=["x", None]))))


def test_parquet_number_texts_are_refused(tmp_path):
    with pytest.raises(
        DataError,
        match=r"2 text\(s\) in column 'text' .* at data rows 0, 1 \(from 0\) \(e.g. 3, of type int\)",
    ):
        load_dataset(DatasetRequest(name=str(_parquet(tmp_path, ["a", "b"], texts=[3, 4]))))


# --- the hf: path shares the local-file code: a Hub table served from memory --------------------------


def _hf() -> Any:
    datasets = pytest.importorskip("datasets")
    if not hasattr(
        datasets, "Dataset"
    ):  # pytest imported a checkout directory named `datasets` under that name
        pytest.skip("`datasets` is this checkout itself here, not the Hugging Face package")
    return datasets


def _serve_hub(monkeypatch, table: dict[str, list[Any]], features: dict[str, Any] | None = None):
    datasets = _hf()
    feats = datasets.Features(features) if features else None
    served = datasets.Dataset.from_dict(table, features=feats)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: served)


def test_hub_class_labels_are_read_as_their_names(monkeypatch):
    datasets = _hf()
    names = datasets.ClassLabel(names=["pos", "neg"])  # index 0 is pos: --labels neg,pos is the other order
    _serve_hub(
        monkeypatch,
        {"text": ["a", "b", "c"], "label": [0, 1, 0]},
        {"text": datasets.Value("string"), "label": names},
    )
    ds = load_dataset(DatasetRequest(name="hf:org/reviews", labels=("neg", "pos")))
    assert ds.labels == ("neg", "pos")
    assert ds.gold.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("case", "name", "opts", "labels", "prompts", "gold"), READ[6:10], ids=[c[0] for c in READ[6:10]]
)
def test_hub_rows_follow_the_file_rules(monkeypatch, case, name, opts, labels, prompts, gold):
    import csv

    with open(DATA / name, newline="", encoding="utf-8-sig") as fh:  # the table as the Hub would serve it
        rows = list(csv.DictReader(fh))
    _serve_hub(monkeypatch, {k: [r[k] for r in rows] for k in rows[0]})
    ds = load_dataset(DatasetRequest(name="hf:org/set", **opts))
    assert (ds.labels, ds.prompts, ds.gold.tolist()) == (labels, prompts, gold)


def test_hub_rows_are_refused_like_files(monkeypatch):
    _serve_hub(monkeypatch, {"text": ["q0", "q1", "q2"], "label": ["1", "2", "10"]})
    with pytest.raises(DataError, match=r"'2' in 1 row\(s\): data row 1"):
        load_dataset(DatasetRequest(name="hf:org/set", labels=("1", "5", "10")))
    _serve_hub(monkeypatch, {"text": ["q0", " "], "label": ["a", "b"]})
    with pytest.raises(DataError, match="whitespace-only 'text' at data row 1"):
        load_dataset(DatasetRequest(name="hf:org/set"))


# --- through the real CLI: refused before the model loads, one line, exit 2 ------------------------------

CLI = [
    ("numeric.csv", ["--labels", "1,5,10"], "'2' in 2 row(s): data rows 3, 4"),
    ("empty_text.csv", [], "whitespace-only 'text' at data rows 0, 1, 3"),
    ("dup_ids.csv", [], "'1' at data rows 0, 2"),
    ("one_label.jsonl", [], "only the label ['a']"),
    ("object_gold.jsonl", [], "not a single string, number or boolean at data rows 1, 3"),
    ("words_and_ints.jsonl", [], "mix words and integers"),
    ("nonexist.csv", [], "nonexist.csv' does not exist"),
]


@pytest.mark.parametrize(("name", "extra", "message"), CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_in_one_line(tmp_path, name, extra, message):
    args = ["extract", "--model", "smollm2-135m", "--device", "cpu", "--quiet"]
    args += ["--store", str(tmp_path / "s"), "--dataset", str(DATA / name), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
