from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "phi", "opt", "gpt_neox", "gpt2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny random model per architecture family."""
    from tests.models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {f: save_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB file system (a tmpfs): full disks and, remounted, read-only ones (needs mount rights)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A real store: boolq/tiny-llama at fp32 and int8, analyzed (tests/tiny_store.py). Read it only."""
    from tests.tiny_store import build

    return build(tmp_path_factory.mktemp("tiny-store"), tiny_models["llama"])
