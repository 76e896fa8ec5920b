"""A quantization method: what it is, its settings, its store key, and how a model is loaded with it.

Every backend module (native.py, bnb.py, ao.py, halfquadratic.py, gguf_emulation.py, fp8_emulation.py)
subclasses ``Method``; registry.py lists them. This module imports no torch at import time, so ``qcache
methods`` and key parsing run on the laptop side too.

Store keys (docs/store.md): a method's registry name, then one ``-``-separated token per setting that
differs from the method's default (or that the method always names, such as a group size), in the order of
its options: ``int8`` (LLM.int8, threshold 6.0), ``int8-t4.0``, ``nf4-nodq-bf16``, ``hqq4-g64``. Two
different settings never share a key, and each setting has one spelling (``parse_key`` refuses others).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from qcache.store.errors import BackendUnavailable, InvalidOption

# Compute dtypes by name, and their key tokens.
DTYPE_TOKENS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
WEIGHT_ONLY, WEIGHT_ACTIVATION, NONE = "weight-only", "weight+activation", "none"
REAL, EMULATED = "real", "emulated"


@dataclass(frozen=True)
class Setting:
    """One option of a method: its CLI flag, default, key token, and the values it accepts.

    ``kind``: ``decimal`` (token ``<prefix><plain decimal>``), ``int`` (``<prefix><int>``), ``flag``
    (``<prefix>`` when true, ``no<prefix>`` when false) or ``dtype`` (``fp16``/``bf16``/``fp32``).
    """

    name: str  # keyword in ``Method.settings``
    option: str  # its command-line flag, e.g. "--group-size"
    kind: str
    default: Any
    prefix: str = ""
    always: bool = False  # named in the key even at its default (group sizes)
    choices: tuple[Any, ...] = ()  # accepted values; () = any the kind allows
    why: str = ""  # why some values are not accepted, for the refusal

    def token(self, value: Any) -> str:
        if self.kind == "decimal":  # shortest round-trip digits, never an exponent (no "-" in a token)
            text = format(Decimal(repr(float(value))), "f")
            return self.prefix + (text if "." in text else text + ".0")
        if self.kind == "int":
            return f"{self.prefix}{int(value)}"
        if self.kind == "flag":
            return self.prefix if value else "no" + self.prefix
        return DTYPE_TOKENS[value]

    def parse(self, token: str) -> Any | None:
        """The value ``token`` spells for this setting, or ``None`` if it is not this setting's token."""
        if self.kind == "dtype":
            return {t: d for d, t in DTYPE_TOKENS.items()}.get(token)
        if self.kind == "flag":
            return {self.prefix: True, "no" + self.prefix: False}.get(token)
        if not token.startswith(self.prefix) or token == self.prefix:
            return None
        body = token[len(self.prefix) :]
        try:
            return int(body) if self.kind == "int" and body.isdigit() else float(body)
        except ValueError:
            return None

    def check(self, value: Any, method: str) -> Any:
        """``value`` normalized, or ``InvalidOption`` naming the accepted values."""
        if self.kind == "decimal":
            ok = isinstance(value, (int, float)) and 0.0 <= float(value) < float("inf")
            value = float(value) if ok else value
            what = "a finite number >= 0"
        elif self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            what = "a positive integer"
        elif self.kind == "flag":
            ok, what = isinstance(value, bool), "on or off"
        else:
            ok, what = value in DTYPE_TOKENS, "float16, bfloat16 or float32"
        if ok and self.choices and value not in self.choices:
            ok = False
        if not ok:
            accepted = ", ".join(map(str, self.choices)) if self.choices else what
            why = f" ({self.why})" if self.why else ""
            raise InvalidOption(f"{self.option} {value!r} is not accepted by {method}{why}: use {accepted}")
        return value


def compute_dtype_setting(default: str = "float16", choices: tuple[str, ...] = (), why: str = "") -> Setting:
    return Setting("compute_dtype", "--compute-dtype", "dtype", default, choices=choices, why=why)


@dataclass(frozen=True)
class Method:
    """A quantization method with its settings resolved (defaults included).

    Subclasses implement ``_load``/``_convert`` and may override ``_unavailable``, ``identity`` and
    ``gradients``.
    """

    name: str  # registry name, e.g. "nf4", "hqq4", "gguf-q4_0"
    bits: float  # nominal bits per quantized weight
    kind: str  # WEIGHT_ONLY, WEIGHT_ACTIVATION or NONE (a plain float dtype)
    kernel: str  # REAL: the library's own kernels run; EMULATED: weights rounded, then float matmuls
    library: str  # the distribution whose version the manifest records ("torch" for plain floats)
    peer: str  # what the method is called elsewhere: "LLM.int8", "NF4", "GGUF Q4_0" ...
    options: tuple[Setting, ...] = ()
    values: tuple[tuple[str, Any], ...] = ()  # given settings as (name, value); see ``settings``
    dtype_name: str = "float16"  # compute dtype when the method has no --compute-dtype option
    no_backward: str | None = None  # why Integrated-Gradients attributions cannot run, if they cannot
    pip: str = ""  # what to install when ``library`` is missing

    def __post_init__(self) -> None:
        given = dict(self.values)
        unknown = set(given) - {s.name for s in self.options}
        if unknown:
            raise InvalidOption(f"{self.name} has no setting {sorted(unknown)[0]!r}")
        full = tuple((s.name, s.check(given.get(s.name, s.default), self.name)) for s in self.options)
        # every setting, in option order: methods with equal settings compare equal
        object.__setattr__(self, "values", full)

    @property
    def settings(self) -> dict[str, Any]:
        """Every setting by name, defaults included."""
        return dict(self.values)

    def with_settings(self, **given: Any) -> Method:
        """This method with ``given`` settings changed (validated)."""
        return replace(self, values=tuple({**self.settings, **given}.items()))

    @property
    def key(self) -> str:
        """The store-safe run key component (see the module docstring)."""
        tokens = [
            s.token(self.settings[s.name])
            for s in self.options
            if s.always or self.settings[s.name] != s.default
        ]
        return "-".join([self.name, *tokens])

    @property
    def gradients(self) -> bool:
        """Whether gradients flow through the quantized layers (Integrated Gradients can run)."""
        return self.no_backward is None

    @property
    def compute_dtype(self) -> str:
        """Dtype of activations and unquantized parameters: float16, bfloat16 or float32."""
        return str(self.settings.get("compute_dtype", self.dtype_name))

    @property
    def storage_dtype(self) -> str:
        """Dtype activations are stored in: float16 from float16 compute, else float32 (bfloat16 exactly)."""
        return "float16" if self.compute_dtype == "float16" else "float32"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.compute_dtype)

    def option_names(self) -> str:
        return ", ".join(s.option for s in self.options) or "no settings"

    # -- availability ---------------------------------------------------------------------------------

    def available(self, device: str = "cpu") -> str | None:
        """``None`` when this method can load a model on ``device`` (a type: cpu, cuda) here, else why not
        (one line naming what is missing)."""
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return f"{self.key} needs torch, which cannot be imported here ({exc}); install qcache[extract]"
        return self._unavailable(device.split(":")[0])

    def _unavailable(self, device: str) -> str | None:
        return None

    def import_reason(self, module: str) -> str | None:
        """``None`` if ``module`` imports, else the one-line reason naming the library and what to install."""
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install raises more than ImportError
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            return (
                f"{self.key} needs {self.library}, which cannot be imported here ({first}); install it "
                f"(`pip install {self.pip or self.library}`) or pick another method (`qcache methods`)"
            )
        return None

    def require(self, device: str) -> None:
        """Raise ``BackendUnavailable`` with ``available``'s reason when the method cannot run here."""
        reason = self.available(device)
        if reason is not None:
            raise BackendUnavailable(reason)

    # -- loading ----------------------------------------------------------------------------------------

    def load(self, path: str, device: Any) -> Any:
        """A transformers causal LM from ``path`` quantized with this method on ``device`` (eval mode).

        ``path``: a local directory or Hub id; ``device``: a ``torch.device``.
        """
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, **self._load(device))
        return self._convert(model, device).eval()

    def _load(self, device: Any) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments."""
        raise NotImplementedError

    def _convert(self, model: Any, device: Any) -> Any:
        """The loaded model, quantized after loading where the method does so (HQQ, emulations)."""
        return model

    # -- the manifest -----------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The manifest's ``quant_config``, part of a run's identity: the key, compute dtype, settings."""
        return {"quant": self.key, "method": self.name, "dtype": self.compute_dtype, **self.settings}

    def describe(self) -> dict[str, Any]:
        """Everything about the method for the manifest's ``quant_method``: what it is, library and
        version, every setting (defaults included). Library versions are not part of run identity."""
        return {
            "key": self.key,
            "method": self.name,
            "peer": self.peer,
            "bits": self.bits,
            "kind": self.kind,
            "kernel": self.kernel,
            "compute_dtype": self.compute_dtype,
            "storage_dtype": self.storage_dtype,
            "gradients": self.gradients,
            "library": self.library,
            "library_version": library_version(self.library),
            "settings": dict(self.settings),
        }


def library_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, ``None`` if it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
