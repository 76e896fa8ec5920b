"""Bad input: one clear line, a non-zero exit, no traceback, and nothing already stored is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcache.cli import main
from tests.commands import as_process, extract_args
from tests.files import tree_digest


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("bad") / "store"
    result = CliRunner().invoke(main, extract_args(tiny_models["llama"], path, "--layers", "1"))
    assert result.exit_code == 0, result.output
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.csv").write_text("prompt,gold\n")
    (tmp_path / "nocol.csv").write_text("body,gold\nis it,True\n")
    (tmp_path / "nolabel.csv").write_text("prompt,verdict\nis it,True\n")
    (tmp_path / "badgold.csv").write_text("prompt,gold\nis it,True\nis it not,Maybe\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.bin").write_text("x")
    (tmp_path / "textonly").mkdir()  # not a model directory: a text file only
    (tmp_path / "textonly" / "notes.txt").write_text("x")
    (tmp_path / "tokonly").mkdir()  # a tokenizer without a config
    (tmp_path / "tokonly" / "tokenizer.json").write_text("{}")
    return {p.name: p for p in tmp_path.iterdir()}


# (name, extra arguments with {placeholders}, text the one-line message must contain)
CASES = [
    ("unknown alias", ["--model", "lama2-7b"], "did you mean 'llama2-7b'"),
    (
        "hub id offline",
        ["--model", "nobody-here/no-such-model"],
        "not in the local Hugging Face cache",
    ),
    ("model path escaping", ["--model", "../../etc/passwd"], "unknown model"),
    ("not a model directory", ["--model", "{textonly}"], "is not a model directory: no config.json"),
    ("tokenizer only", ["--model", "{tokonly}"], "is not a model directory: no config.json"),
    ("bits 3", ["--bits", "3"], "--bits 3 is not supported"),
    ("layer outside 1..L", ["--layers", "0,4"], "outside 1..3"),
    ("empty dataset", ["--dataset", "{empty.csv}"], "has no rows"),
    ("missing text column", ["--dataset", "{nocol.csv}"], "no text column found"),
    (
        "missing named column",
        ["--dataset", "{nocol.csv}", "--text-field", "text"],
        "column 'text' is not in",
    ),
    (
        "gold outside labels",
        ["--dataset", "{badgold.csv}", "--labels", "False,True"],
        "outside its label set",
    ),
    ("unknown dataset", ["--dataset", "boolqq"], "unknown dataset 'boolqq'"),
    ("missing dataset file", ["--dataset", "../boolq"], "dataset file '../boolq' does not exist"),
    ("store is a file", ["--store", "{afile}"], "is a file"),
    ("store is foreign", ["--store", "{foreign}"], "not empty and is not a qcache store"),
    ("bad shard", ["--shard", "3/2"], "need 0 <= i < n"),
    ("ig option without attributions", ["--ig-steps", "20"], "--ig-steps only apply with --attributions"),
    (
        "different arguments",
        ["--max-length", "99", "--store", "{STORE}"],
        "exists with different arguments",
    ),
]


@pytest.mark.parametrize(("name", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, tiny_models, filled_store, name, args, message):
    files = _files(tmp_path)
    before = tree_digest(filled_store)
    args = [a.replace("{STORE}", str(filled_store)) for a in args]
    args = [str(files[a[1:-1]]) if a.startswith("{") and a[1:-1] in files else a for a in args]
    # the case's own options come last, and click keeps the last value of an option
    result = CliRunner().invoke(
        main, extract_args(tiny_models["llama"], tmp_path / "new-store", "--layers", "1", *args)
    )
    assert result.exit_code != 0, result.output
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(
        result.exception, SystemExit
    )
    # progress bars (model loading) may precede the message; nothing else may
    lines = [
        ln
        for ln in result.output.splitlines()
        if ln.strip() and not ln.startswith("Usage:") and "--help" not in ln and "it/s]" not in ln
    ]
    assert len(lines) == 1, result.output
    assert message in lines[0], result.output
    assert tree_digest(filled_store) == before  # the existing run is untouched


def test_bitsandbytes_missing_is_one_line(tmp_path, tiny_models):
    """A machine where bitsandbytes cannot be imported: 4/8-bit is refused with a way out."""
    import subprocess

    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ImportError('no usable bitsandbytes backend on this machine')\n"
    )
    argv = as_process(extract_args(tiny_models["llama"], tmp_path / "s", bits=4, limit=2))
    env = {**__import__("os").environ, "PYTHONPATH": str(shadow.parent)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "it/s]" not in ln]
    assert lines == [lines[0]] and "needs bitsandbytes" in lines[0] and "--bits 16/32" in lines[0], out.stderr


def test_nonfinite_activations_are_reported_with_their_count(tmp_path, tiny_models):
    import torch
    import transformers as tf

    broken = tmp_path / "broken"
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[3] = float("inf")  # neuron 3 of layer 1 overflows
    model.save_pretrained(broken)
    tf.AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(broken)
    result = CliRunner().invoke(main, extract_args(broken, tmp_path / "s", "--layers", "1", limit=3))
    assert result.exit_code == 0, result.output
    from qcache import store

    s = store.open(tmp_path / "s")
    run = s.run(s.runs()[0])
    acts = run.activations(1).compute()
    n_bad = int((~np.isfinite(acts)).sum())
    assert n_bad >= run.layout.n_tokens  # at least neuron 3 on every token
    assert f"{n_bad} NaN/inf activation values" in result.output


def _extract_into(model_dir, path, limit="60"):
    # past the up-front disk check (tests/test_plan.py covers it): this test fills the disk mid-run
    args = extract_args(
        model_dir, path, "--layers", "1,2,3", "--chunk-rows", "64", "--no-disk-check", limit=int(limit)
    )
    return CliRunner().invoke(main, args)


def test_full_disk_keeps_committed_units_and_resumes(tmp_path, tiny_models, small_disk):
    import shutil
    import subprocess

    from qcache import store

    result = _extract_into(tiny_models["llama"], small_disk / "s", limit="400")
    assert result.exit_code == 2, result.output
    talk = ("loading ", "resuming: ")  # what extract says before it starts (tests/test_extract_talks.py)
    lines = [
        ln
        for ln in result.output.splitlines()
        if ln.strip() and "it/s]" not in ln and not ln.startswith(talk)
    ]
    assert len(lines) == 1 and "disk full" in lines[0] and "rerun the same command" in lines[0]
    s = store.open(small_disk / "s")
    (key,) = s.runs()
    run = s.run(key)
    done = run.done_units()
    assert done and not run.complete
    verify = CliRunner().invoke(main, ["verify", "--store", str(small_disk / "s")])
    assert verify.exit_code == 0, verify.output  # what was committed is intact
    # move the store to a bigger disk and resume: the same command finishes it
    shutil.copytree(small_disk / "s", tmp_path / "big")
    subprocess.run(["umount", "-l", str(small_disk)], capture_output=True)
    assert _extract_into(tiny_models["llama"], tmp_path / "big", limit="400").exit_code == 0
    assert store.open(tmp_path / "big").run(key).complete


def test_read_only_store_is_refused(tmp_path, tiny_models, small_disk):
    import subprocess

    assert _extract_into(tiny_models["llama"], small_disk / "s", limit="4").exit_code == 0
    before = tree_digest(small_disk / "s")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = _extract_into(tiny_models["llama"], small_disk / "s", limit="8")
    assert result.exit_code == 2
    assert "read-only" in result.output and "Traceback" not in result.output
    assert tree_digest(small_disk / "s") == before


def test_plan_refuses_a_directory_that_is_not_a_model(tmp_path):
    """Issue #15: transformers' own errors (a tokenizer ValueError, 'Unrecognized model') were tracebacks."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(
        main, ["plan", "--model", str(tmp_path / "m"), "--store", str(tmp_path / "s")]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not a model directory: no config.json" in lines[0], result.output


def test_attributions_on_an_unsupported_family_refused_before_loading(tmp_path):
    """Issue #15: the families attributions support are named, before any weight is read."""
    from tests.arch_models import save

    model = save("gemma", tmp_path / "gemma")
    result = CliRunner().invoke(main, extract_args(model, tmp_path / "s", "--layers", "1", "--attributions"))
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output  # no "loading ..." line: refused from the config
    assert "--attributions is not implemented for 'gemma'" in lines[0]
    assert "llama, mistral, qwen2, qwen3, phi, opt, gpt_neox, gpt2" in lines[0]


@pytest.mark.parametrize("model_type", ["gpt2", "bloom"])
def test_down_in_of_a_plain_mlp_refused_before_loading(tmp_path, model_type):
    """Issue #15: the refusal came after "loading ..."; the meta-device structure already settles it."""
    from tests.arch_models import save

    model = save(model_type, tmp_path / model_type)
    result = CliRunner().invoke(
        main, extract_args(model, tmp_path / "s", "--layers", "1", "--tap", "down-in")
    )
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--tap down-in needs a gated MLP" in lines[0], result.output
    assert not (tmp_path / "s").exists()  # refused before the store is created
