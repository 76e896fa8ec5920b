"""Tiny random-weight models built from configs, saved with a real (tiny) BPE tokenizer.

Sizes are multiples of 32 because bitsandbytes' CPU 4-bit path needs that for every quantized Linear.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "Respond with True or False only.\nis the sky blue\nAnswer: True",
    "Given a sentence, respond with only 'True' if the sentence is toxic or else 'False'.\nAnswer: False",
    "True False true false A B 0 1 2 3 Answer: Question: Passage:",
]

# Module path of the post-activation tap of decoder layer {i} (0-based), written out independently of
# qcache's adapters so the oracle does not share their code.
TAP_PATHS = {
    "llama": "model.layers.{i}.mlp.act_fn",
    "phi": "model.layers.{i}.mlp.activation_fn",
    "opt": "model.decoder.layers.{i}.activation_fn",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.act",
    "gpt2": "transformer.h.{i}.mlp.act",
}
EXPECTED_ACTIVATION = {
    "llama": "silu",
    "phi": "gelu_new",
    "opt": "relu",
    "gpt_neox": "gelu",
    "gpt2": "gelu_new",
}


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_config(family: str, vocab: int) -> tf.PretrainedConfig:
    common = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "phi":
        return tf.PhiConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_inner=128, n_layer=3, n_head=4, **common)
    raise ValueError(family)


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    tokenizer = tiny_tokenizer()
    vocab = -(-len(tokenizer) // 32) * 32
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, vocab))
    with torch.no_grad():  # larger weights than the default init, so activations spread out
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
