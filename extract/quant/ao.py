"""torchao through transformers' ``TorchAoConfig``: int8 weight-only, int4 weight-only, and W8A8.

* ``torchao-int8wo``: ``Int8WeightOnlyConfig()``: int8 weights, one symmetric scale per output row
  (``PerRow``); activations stay in the compute dtype, bfloat16 by default (float16 overflows, below).
* ``torchao-int4wo-g128``: ``Int4WeightOnlyConfig(group_size, int4_packing_format="tile_packed_to_4d")``:
  asymmetric int4 weights per group of ``group_size`` inputs, tinygemm's packed layout, bfloat16 only.
  torchao 0.18 has no CPU layout for it (``plain``/``preshuffled`` need the mslk kernels, ``plain_int32``
  and ``tile_packed_to_4d`` run on CUDA/XPU), so it is available on a GPU only; ``available`` tries it.
* ``torchao-w8a8``: ``Int8DynamicActivationInt8WeightConfig()``: int8 weights per row and each input row
  quantized to int8 on the fly (symmetric, per token), an int8 x int8 matmul.

Compute dtype: bfloat16 (default) or float32 for the int8 methods. In float16 they overflow on a CPU: int8
weight-only multiplies the activations by the unscaled int8 codes (up to 127) in the output dtype and scales
after, W8A8 applies the activation scale before the weight scale; on SmolLM2 every layer-15 activation came
out inf/NaN, so float16 is refused.

Integrated Gradients: int8 weight-only dequantizes and differentiates like a float Linear (checked here on
a CPU). No gradient reaches the input of a W8A8 layer (its integer matmul is outside autograd; only a bias
stays differentiable), and the int4 kernel (``aten._weight_int4pack_mm``) has no derivative, as
``_weight_int8pack_mm`` has none here; both refuse ``--attributions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcache.store.errors import BackendUnavailable

from .method import (
    REAL,
    WEIGHT_ACTIVATION,
    WEIGHT_ONLY,
    Method,
    Setting,
    compute_dtype_setting,
    library_version,
)

# float16 overflows: on a CPU torchao multiplies the activations by the unscaled int8 weights (int8
# weight-only) or scales by one factor before the other (W8A8) in the output dtype, so SmolLM2's products
# pass float16's 65504 and every activation came out inf/NaN. bfloat16 (torchao's CPU dtype) has the range.
AO_DTYPE = compute_dtype_setting(
    "bfloat16",
    choices=("bfloat16", "float32"),
    why="torchao's CPU int8 matmul overflows float16 before it scales: every activation becomes inf",
)
INT4_GROUP = Setting(
    "group_size", "--group-size", "int", 128, prefix="g", always=True, choices=(32, 64, 128, 256)
)


@dataclass(frozen=True)
class TorchAo(Method):
    """``variant``: "int8wo", "int4wo" or "w8a8"."""

    variant: str = "int8wo"

    def ao_config(self) -> Any:
        """The torchao config object ``TorchAoConfig`` is given."""
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )

        if self.variant == "int8wo":
            return Int8WeightOnlyConfig()
        if self.variant == "w8a8":
            return Int8DynamicActivationInt8WeightConfig()
        return Int4WeightOnlyConfig(
            group_size=self.settings["group_size"], int4_packing_format="tile_packed_to_4d"
        )

    def _unavailable(self, device: str) -> str | None:
        from .quiet import silence_torchao_import

        silence_torchao_import()
        reason = self.import_reason("torchao.quantization")
        if reason is not None:
            return reason
        return self._probe(device)

    def _probe(self, device: str) -> str | None:
        """Quantize and run one small Linear on ``device``: the config's kernels exist there, or why not."""
        import torch
        from torchao.quantization import quantize_

        try:
            layer = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False)).to(device, self.torch_dtype)
            quantize_(layer, self.ao_config())
            layer(torch.ones(2, 256, device=device, dtype=self.torch_dtype))
        except Exception as exc:  # torchao signals a missing kernel with assertions and import errors
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            where = "; it runs on a CUDA GPU" if self.variant == "int4wo" and device == "cpu" else ""
            version = library_version("torchao")
            return (
                f"torchao {version} cannot run {self.key} on {device} ({type(exc).__name__}: {first}){where}"
            )
        return None

    def _load(self, device: Any) -> dict[str, Any]:
        from transformers import TorchAoConfig

        where = str(device) if device.type == "cuda" else "cpu"
        return {
            "dtype": self.torch_dtype,
            "quantization_config": TorchAoConfig(quant_type=self.ao_config()),
            "device_map": {"": where},
        }

    def _convert(self, model: Any, device: Any) -> Any:
        # transformers reports a failed conversion in a load report; make sure no layer was left in float
        from torch import nn
        from torchao.utils import TorchAOBaseTensor

        from .targets import quantized_linears

        layers = [(n, m) for n, m in quantized_linears(model) if type(m) is nn.Linear]  # torchao: Linear only
        left = [n for n, m in layers if not isinstance(m.weight, TorchAOBaseTensor)]
        if left or not layers:
            raise BackendUnavailable(
                f"torchao left {len(left)} of {len(layers)} Linear weights unquantized loading {self.key} "
                f"(first: {left[0] if left else 'no nn.Linear layers to quantize'}); nothing was extracted"
            )
        return model


def torchao(variant: str, bits: int, kind: str, peer: str, **kw: Any) -> TorchAo:
    return TorchAo(f"torchao-{variant}", bits, kind, REAL, "torchao", peer, variant=variant, **kw)


METHODS = (
    torchao("int8wo", 8, WEIGHT_ONLY, "torchao int8 weight-only", options=(AO_DTYPE,)),
    torchao(
        "int4wo",
        4,
        WEIGHT_ONLY,
        "torchao int4 weight-only (tinygemm)",
        options=(INT4_GROUP,),
        dtype_name="bfloat16",
        no_backward="torchao's int4 matmul (aten._weight_int4pack_mm) has no derivative",
    ),
    torchao(
        "w8a8",
        8,
        WEIGHT_ACTIVATION,
        "W8A8 (torchao int8 dynamic activation, int8 weight)",
        options=(AO_DTYPE,),
        no_backward="torchao's int8 x int8 matmul is outside autograd: no gradient reaches a layer's input",
    ),
)
