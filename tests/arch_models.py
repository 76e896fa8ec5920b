"""Tiny random-weight models of every decoder-only ``*ForCausalLM`` type the installed transformers has.

Each is built from its own config class with 2 layers, hidden size 64 and MLP widths of 128 (multiples
of 32: bitsandbytes' CPU 4-bit path needs that), its weights drawn with std 1.5/sqrt(fan-in) so
activations are not near zero. Types in ``SKIP`` (not decoder-only text models, or too big even tiny)
are skipped with the reason given there; a type whose tiny config cannot be built is skipped with the
error transformers gave.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from tests.models import tiny_tokenizer

HIDDEN = 64
WIDTH = 128
VOCAB = 512  # >= the tiny tokenizer's 480 tokens, a multiple of 32

# Types in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES that are not decoder-only text models: encoders used as
# decoders (BERT family: their feed-forward is split over two modules, intermediate and output),
# encoder-decoder decoders, and multimodal or speech wrappers whose inputs are not token ids alone.
_ENCODER_AS_DECODER = [
    *("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie"),
    *("megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer"),
    *("xlm-roberta", "xlm-roberta-xl", "xmod", "xlm", "xlnet"),
]
_SEQ2SEQ_DECODER = [
    *("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp"),
    *("pegasus", "plbart", "prophetnet", "trocr", "whisper"),
]
_MULTIMODAL = [
    *("fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "got_ocr2", "git", "mllama", "moshi"),
    *("moss_transcribe_diarize", "musicgen", "musicgen_melody", "phi4_multimodal", "emu3"),
    *("dots3_note", "qwen4_exp"),
]
_NOT_TRANSFORMER = ["mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "reformer", "cpmant", "ctrl"]
# Tiny configs that still build huge sub-models or hang (measured: > 40 s or out of memory on 2 cores).
_TOO_BIG = ["blt", "gemma4_unified_assistant", "llama4", "qwen3_5", "qwen3_5_moe"]
SKIP: dict[str, str] = {
    **{t: "its tiny config still builds for > 40 s (sub-models of default size)" for t in _TOO_BIG},
    **{t: "an encoder architecture used as a decoder, not a decoder-only model" for t in _ENCODER_AS_DECODER},
    **{t: "the decoder half of an encoder-decoder model" for t in _SEQ2SEQ_DECODER},
    **{t: "a multimodal model (inputs beyond token ids)" for t in _MULTIMODAL},
    **{t: "no transformer MLP block per layer (state-space / recurrent / other)" for t in _NOT_TRANSFORMER},
}


# Per-type changes to the common tiny config, where the defaults do not fit together.
OVERRIDES: dict[str, dict[str, Any]] = {
    "recurrent_gemma": {"intermediate_size": 2 * WIDTH},  # its MLP is intermediate_size // 2 wide
    "codegen": {"rotary_dim": 8},
    "gptj": {"rotary_dim": 8},
}


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str) -> Any:
    """A 2-layer config of ``model_type`` with hidden 64 and MLP/expert widths 128."""
    cls = tf.CONFIG_MAPPING[model_type]
    kw: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "intermediate_size": WIDTH,
        "ffn_dim": WIDTH,
        "n_inner": WIDTH,
        "moe_intermediate_size": WIDTH,
        "shared_expert_intermediate_size": WIDTH,
        "num_experts": 4,
        "num_local_experts": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    kw.update(OVERRIDES.get(model_type, {}))
    config = cls(**kw)
    for key, value in kw.items():  # configs that ignore a keyword (or rename it) still get the value
        if hasattr(config, key) and getattr(config, key) != value:
            with contextlib.suppress(Exception):  # read-only or validated: keep the config's own
                setattr(config, key, value)
    return config


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny random model of ``model_type`` in float32, eval mode."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so activations spread out
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return model.eval()


def save(model_type: str, directory: Path) -> Path:
    """Save the tiny model of ``model_type`` with the tiny BPE tokenizer; returns ``directory``."""
    build(model_type).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
