"""Random-weight Llama models with Llama-2-7B's widths, built on the device they run on and saved once.

The GPU check (scripts/gpu-check.sh) and tests/gpu/ need a model of the study's shape without its
13.5 GB of weights: the config is ``extract/configs/llama2-7b.json`` (hidden 4096, MLP 11,008, 32 heads),
with fewer layers for the tests and a tokenizer's vocabulary. ``shape="tiny"`` gives the same
architecture at toy widths, for the CPU dry run.

A few hidden channels get a larger RMSNorm gain, so that Linear inputs there exceed LLM.int8's outlier
threshold (6.0) and its fp16 outlier decomposition runs, as it does in real checkpoints.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import torch

CONFIG = Path(__file__).resolve().parent.parent / "extract" / "configs" / "llama2-7b.json"
OUTLIER_CHANNELS = (7, 100, 1000)  # hidden channels scaled by OUTLIER_GAIN in every input norm
OUTLIER_GAIN = 8.0


def llama_config(shape: str, n_layers: int, vocab: int) -> Any:
    """Llama-2-7B's config with ``n_layers`` layers and ``vocab`` tokens, or toy widths (``"tiny"``)."""
    import transformers as tf

    raw = json.loads(CONFIG.read_text())
    raw.update(num_hidden_layers=n_layers, vocab_size=vocab, pad_token_id=0)
    if shape == "tiny":  # multiples of 64: bitsandbytes' CPU 4-bit path (blocks of 64) needs them
        raw.update(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4)
    elif shape != "7b":
        raise ValueError(f"shape {shape!r}: use '7b' or 'tiny'")
    raw.pop("_name_or_path", None)
    return tf.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})


def load_tokenizer(directory: Path | None) -> Any:
    """The tokenizer saved in ``directory`` (files may be gzipped, as scripts/gpu-wheels.sh ships them);
    without one, a tiny BPE trained here (tests/models.py), whose token counts differ from a real one's."""
    import transformers as tf

    if directory is None:
        from tests.models import tiny_tokenizer

        return tiny_tokenizer()
    directory = Path(directory)
    gz = list(directory.glob("*.gz"))
    if gz:
        plain = directory.parent / (directory.name + "-unpacked")
        plain.mkdir(parents=True, exist_ok=True)
        for f in gz:
            with gzip.open(f, "rb") as src, (plain / f.name.removesuffix(".gz")).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        directory = plain
    return tf.AutoTokenizer.from_pretrained(directory)


def save_random_llama(
    directory: Path,
    *,
    shape: str = "7b",
    n_layers: int = 4,
    tokenizer_dir: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """Build a random Llama on ``device`` (float16 on CUDA, float32 on CPU), save it with its tokenizer.

    Reuses ``directory`` when a finished save is there (``config.json`` is written last, by rename).
    Returns ``directory``.
    """
    import transformers as tf

    directory = Path(directory)
    if (directory / "qcache-random.json").exists():
        return directory
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = -(-len(tokenizer) // 64) * 64
    config = llama_config(shape, n_layers, vocab)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build at the final dtype on the device: no float32 copy first
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[list(OUTLIER_CHANNELS[: 1 + p.shape[0] // 1000])] = OUTLIER_GAIN
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "qcache-random.json").write_text(json.dumps({"shape": shape, "layers": n_layers, "seed": seed}))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory
