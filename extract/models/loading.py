"""Load a model and tokenizer with a quantization method (extract/quant/), on the chosen device."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcache.extract.models.registry import ModelSource
from qcache.extract.quant.quantization import method_of
from qcache.store.errors import BackendUnavailable


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: ModelSource
    quant: str
    device: torch.device
    revision: str | None


def cache_dir() -> Path:
    return Path(os.environ.get("QCACHE_CACHE", Path.home() / ".cache" / "qcache"))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device} asked for CUDA, but no GPU is visible: use --device cpu")
    if dev.type == "cuda" and dev.index is not None:
        # bitsandbytes and unindexed CUDA calls use the current device: without this every torchrun rank
        # (cuda:LOCAL_RANK) would also open a context on GPU 0
        torch.cuda.set_device(dev)
    return dev


def dequantized_checkpoint(source: ModelSource) -> Path:
    """A float32 safetensors copy of a GGUF model, made once and cached.

    transformers refuses ``quantization_config`` together with ``gguf_file``, so bitsandbytes runs load
    this copy. GGUF weights were stored quantized (SmolLM2: Q4_1), so every run of it, "fp16" included,
    starts from the dequantized values.
    """
    target = dequantized_path(source)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.source, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.source, gguf_file=source.gguf_file, dtype=torch.float32
    )
    model.hf_quantizer = None  # the weights are plain float32 tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def dequantized_path(source: ModelSource) -> Path:
    """Where ``dequantized_checkpoint`` keeps a GGUF model's float32 copy (it may not exist yet)."""
    gguf = Path(source.source) / str(source.gguf_file)
    return cache_dir() / "dequantized" / f"{gguf.stem}-{gguf.stat().st_size}"


def load_tokenizer(source: ModelSource) -> tuple[Any, bool]:
    """``source``'s tokenizer alone, no weights read; and whether it is the one ``load_model`` would load.

    A GGUF model's tokenizer comes from its dequantized copy when that exists (the same files
    ``load_model`` reads), else from the GGUF file itself (its metadata only; the copy is not made here).
    Raises ``BackendUnavailable`` when the model is neither local nor cached and the Hub is out of reach.
    """
    from transformers import AutoTokenizer

    with reachable(source):
        if not source.gguf_file:
            return AutoTokenizer.from_pretrained(source.source), True
        copy = dequantized_path(source)
        if (copy / "config.json").exists():
            return AutoTokenizer.from_pretrained(copy), True
        return AutoTokenizer.from_pretrained(source.source, gguf_file=source.gguf_file), False


def checkpoint_path(source: ModelSource) -> str:
    """What ``from_pretrained`` loads for ``source``: a GGUF model's dequantized copy, else its source."""
    return str(dequantized_checkpoint(source)) if source.gguf_file else source.source


@contextlib.contextmanager
def reachable(source: ModelSource) -> Iterator[None]:
    """Turn "not cached and the Hub is out of reach" (``OSError``) into one ``BackendUnavailable`` line."""
    try:
        yield
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot load model {source.description}: not in the local Hugging Face cache and the Hub "
            f"is not reachable ({str(exc).splitlines()[0][:160]}); download it first or pass a local "
            "directory"
        ) from exc


def load_model(
    source: ModelSource,
    quant: str,
    *,
    device: str = "auto",
    for_gradients: bool = False,
    tokenizer: Any = None,
) -> LoadedModel:
    """Load ``source`` with the method of run key ``quant`` (``qcache methods``) in eval mode;
    ``for_gradients`` for attributions.

    ``tokenizer``: one ``load_tokenizer`` already loaded from the same files (else it is loaded here).
    Raises ``BackendUnavailable`` (one line) when the method cannot run on the device here, before any
    weights are read, or when its library fails while loading.
    """
    from transformers import AutoTokenizer

    dev = pick_device(device)
    method = method_of(quant)
    method.require(dev.type)
    path = checkpoint_path(source)
    try:
        with reachable(source):
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
            model = method.load(path, dev)
    except (ImportError, RuntimeError) as exc:
        if method.library == "torch":
            raise
        raise BackendUnavailable(
            f"{method.library} cannot run {quant} on {dev} here ({str(exc).splitlines()[0][:160]}); "
            "use --bits 16/32 or another method (`qcache methods`), or a machine where it works"
        ) from exc
    if for_gradients:
        keep_4bit_differentiable(model)
        protect_int8_inputs(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, source, quant, dev, revision)


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU 4-bit layers from repacking their weight on the first no-grad forward.

    On a CPU with AVX512-BF16, a ``Linear4bit`` that first runs without gradients converts its weight to
    a packed format whose matmul has no backward, so a later attribution fails. This must run before any
    forward pass. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def protect_int8_inputs(model: nn.Module) -> int:
    """Give every LLM.int8 layer its own copy of its input while gradients are recorded.

    bitsandbytes quantizes an ``Linear8bitLt`` input by zeroing its outliers (|x| >= 6) in place and
    restoring them: the values come back, but the in-place write bumps the tensor's version, so autograd
    refuses to backpropagate through whatever op saved that tensor (e.g. the attention output feeding
    ``o_proj``). A copy costs one elementwise pass; only CPU inputs are copied (bitsandbytes' CUDA kernel
    ``int8_vectorwise_quant`` does not write its input). Returns the number of layers hooked.
    """

    def copy_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        # only bitsandbytes' default (CPU) kernel writes its input; the CUDA kernel leaves it alone, and
        # a copy there would cost a clone per int8 Linear per IG step
        if (
            isinstance(x, torch.Tensor)
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and x.requires_grad
        ):
            return (x.clone(), *args[1:])
        return None

    hooked = 0
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            module.register_forward_pre_hook(copy_input)
            hooked += 1
    return hooked
