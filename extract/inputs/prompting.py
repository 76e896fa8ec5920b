"""Chat-template prompting: wrap each dataset prompt as the user turn of the tokenizer's chat template.

An instruct model prompted with raw text often answers with its end-of-turn token (SmolLM2-Instruct puts
its next token on ``<|im_end|>`` for most BoolQ prompts), so neither reading of its answer means much.
``--chat-template`` renders ``[system?, user: prompt]`` with the tokenizer's own template and the
generation prompt appended, as lm-evaluation-harness's ``--apply_chat_template`` does
(``HFLM.apply_chat_template``: ``tokenize=False, add_generation_prompt=True``; the rendered text is then
encoded with ``add_special_tokens=False`` for causal models, so the template's own BOS/markers are not
doubled). lm-eval also drops its target delimiter (the space before the answer) under a chat template;
qcache needs no such switch because its readout (readout.py) counts the label words' first tokens with
and without a leading space.

Truncation keeps the template: a rendered prompt over ``--max-length`` loses tokens from the front of its
user turn (the dataset prompt), never the system/user header nor the generation prompt that the answer is
read after. The kept ids are a sub-sequence of the full rendering's ids (no re-tokenization).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from qcache.store.errors import DataError, InvalidOption

# Suffix of the store's dataset key for chat-template runs, so a store holds both prompt forms side by side.
CHAT_SUFFIX = "-chat"


@dataclass(frozen=True)
class Prompting:
    """How dataset prompts become model input: as they are, or as the user turn of the chat template."""

    chat_template: bool = False
    system_prompt: str | None = None  # a system turn before the user turn (chat template only)

    def __post_init__(self) -> None:
        if self.system_prompt is not None and not self.chat_template:
            raise InvalidOption(
                "--system-prompt only applies with --chat-template: add it, or drop --system-prompt"
            )

    def dataset_key(self, name: str) -> str:
        """The run's dataset key: ``name``, or ``name-chat`` under the chat template."""
        return name + CHAT_SUFFIX if self.chat_template else name

    @property
    def truncation(self) -> str:
        """Where a prompt over ``--max-length`` loses its tokens (the manifest's ``tokenization``)."""
        return "left of the user turn, chat template kept" if self.chat_template else "left, BOS kept"

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The conversation of one prompt: an optional system turn, then ``prompt`` as the user turn."""
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*system, {"role": "user", "content": prompt}]

    def manifest(self, tokenizer: Any = None, example: str | None = None) -> dict[str, Any]:
        """The manifest's ``prompting`` record; under the template, its hash and one rendered example.

        A plain run records ``{"chat_template": False}`` only (store/manifest.py treats a stored run
        without the record as that).
        """
        if not self.chat_template:
            return {"chat_template": False}
        template = str(getattr(tokenizer, "chat_template", ""))
        return {
            "chat_template": True,
            "system_prompt": self.system_prompt,
            "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "add_generation_prompt": True,
            "special_tokens_added": False,  # the rendered text is encoded with add_special_tokens=False
            "truncation": "front of the user turn; the template kept",
            "example": None if example is None else self.render(tokenizer, example),
        }

    def render(self, tokenizer: Any, prompt: str) -> str:
        """``prompt`` as the tokenizer's chat template renders it, generation prompt appended (text)."""
        return str(
            tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)
        )


def require_chat_template(tokenizer: Any, model: str) -> None:
    """Raise ``InvalidOption`` when ``tokenizer`` defines no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidOption(
            f"--chat-template: the tokenizer of model {model!r} has no chat template; drop --chat-template, "
            "or use an instruct model whose tokenizer defines one"
        )


def chat_ids(
    tokenizer: Any, prompting: Prompting, prompt: str, max_length: int, text: str | None = None
) -> tuple[list[int], int]:
    """Token ids of ``prompt`` under the chat template, at most ``max_length``; and how many were dropped.

    ``text``: ``prompting.render(tokenizer, prompt)`` when the caller has it already.

    Over ``max_length``, tokens go from the front of the user turn (the tokens that start at or after
    ``prompt``'s first character in the rendering and end within it). Raises ``DataError`` when the
    template's own tokens leave no room, or when the user turn cannot be found in the rendering (a template
    that rewrites its content) and truncation is needed.
    """
    text = prompting.render(tokenizer, prompt) if text is None else text
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    over = len(ids) - max_length
    if over <= 0:
        return ids, 0
    at = text.rfind(prompt) if prompt else -1  # the user turn is the last message, system prompt before
    if at < 0:
        raise DataError(
            f"a prompt is {len(ids)} tokens under the chat template, over --max-length {max_length}, and "
            "its user turn cannot be located in the rendering to shorten it: raise --max-length"
        )
    end = at + len(prompt)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    inside = [k for k, (a, b) in enumerate(offsets) if a >= at and b <= end]
    if len(inside) <= over:
        raise DataError(
            f"--max-length {max_length} leaves no room for the prompt under the chat template "
            f"({len(ids) - len(inside)} tokens are the template's own): raise --max-length"
        )
    dropped = set(inside[:over])
    return [t for k, t in enumerate(ids) if k not in dropped], over
