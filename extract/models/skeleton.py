"""A model without its weights: the modules on the meta device and the real tokenizer and config.

Enough to lay out a run (tap points, neuron counts, tokens, manifest) without reading gigabytes: the
launcher's parent creates the run this way, and its children, loading the weights, build the same spec.
"""

from __future__ import annotations

import torch
from torch import nn

from qcache.extract.models.loading import LoadedModel, checkpoint_path, pick_device, reachable
from qcache.extract.models.registry import ModelSource


def meta_model(source: ModelSource) -> nn.Module:
    """``source``'s modules on the meta device, built from its config alone (no tokenizer, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with reachable(source):
        config = AutoConfig.from_pretrained(checkpoint_path(source))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_skeleton(source: ModelSource, quant: str, device: str) -> LoadedModel:
    """``source``'s modules on the meta device (no weights read) with its real tokenizer, as load_model's.

    ``device`` is only recorded (the manifest names it); nothing is placed there.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = checkpoint_path(source)
    with reachable(source):
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    revision = getattr(config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, source, quant, pick_device(device), revision)
