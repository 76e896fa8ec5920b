"""tests/gpu: the CUDA path (marker ``requires_gpu``), skipped where no CUDA device is visible.

The model is a random-weight Llama with Llama-2-7B's widths (hidden 4096, MLP 11,008, 32 heads) and 4
layers, built on the GPU from extract/configs/llama2-7b.json and saved once per session (under
``$QCACHE_GPU_WORK`` when set, so scripts/gpu-check.sh's benchmarks find the disk it is on).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu-check.sh on a GPU node)")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-layer, 7B-width random Llama, saved to local disk once (tiny BPE tokenizer)."""
    from benchmarks.random_model import save_random_llama

    work = os.environ.get("QCACHE_GPU_WORK")
    root = Path(work) if work else tmp_path_factory.mktemp("gpu-models")
    return save_random_llama(root / "llama2-7b-widths-4L", shape="7b", n_layers=4, device="cuda")
