"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023) through the ``hqq`` library itself.

Each quantized Linear becomes ``hqq.core.quantize.HQQLinear`` with ``BaseQuantizeConfig(nbits,
group_size)``: asymmetric ``nbits`` weights per group of ``group_size`` consecutive inputs (axis 1), scales
and zero points fitted by HQQ's half-quadratic solver (no calibration data). Its forward runs HQQ's PyTorch
backend: the weight is dequantized to the compute dtype and multiplied in it (``HQQBackend.PYTORCH``, which
has a backward pass, so Integrated Gradients run). transformers 5.x's ``HqqConfig`` path is not used (it
says HQQ is "not available yet" there).

Weights are quantized from the float32 checkpoint, then everything else is cast to the compute dtype, as
``AutoHQQHFModel.quantize_model`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .method import REAL, WEIGHT_ONLY, Method, Setting, compute_dtype_setting

GROUP = Setting("group_size", "--group-size", "int", 64, prefix="g", always=True)


@dataclass(frozen=True)
class Hqq(Method):
    nbits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.settings["group_size"] % 8:  # hqq's own rule (hqq_base_quant_config)
            from qcache.store.errors import InvalidOption

            raise InvalidOption(
                f"--group-size {self.settings['group_size']!r} is not accepted by {self.name}: "
                "use a multiple of 8 (HQQ's rule), e.g. 64"
            )

    def _unavailable(self, device: str) -> str | None:
        from .quiet import silence_torchao_import

        silence_torchao_import()  # hqq imports torchao when it is installed
        return self.import_reason("hqq.core.quantize")

    def quant_config(self) -> dict[str, Any]:
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=self.nbits, group_size=self.settings["group_size"])

    def _load(self, device: Any) -> dict[str, Any]:
        import torch

        where = str(device) if device.type == "cuda" else "cpu"
        return {"dtype": torch.float32, "device_map": {"": where}}

    def _convert(self, model: Any, device: Any) -> Any:
        from hqq.core.quantize import HQQBackend, HQQLinear

        from qcache.store.errors import InvalidOption

        from .targets import linear_weight, quantized_linears

        HQQLinear.set_backend(HQQBackend.PYTORCH)  # the default; says so in case another user changed it
        config, group = self.quant_config(), self.settings["group_size"]
        for name, module in list(quantized_linears(model)):
            weight = linear_weight(module)
            if weight.numel() % group:
                raise InvalidOption(
                    f"{self.key}: {name} has {weight.numel()} weights, not a multiple of --group-size {group}"
                )
            bias = None if module.bias is None else module.bias.detach().float()
            layer = HQQLinear.from_weights(
                weight, bias, config, compute_dtype=self.torch_dtype, device=str(device)
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        # HQQLinear keeps its codes in uint8 and its scales in a dict: the cast leaves them as they are
        return model.to(self.torch_dtype)


def hqq(nbits: int) -> Hqq:
    return Hqq(
        f"hqq{nbits}",
        nbits,
        WEIGHT_ONLY,
        REAL,
        "hqq",
        f"HQQ {nbits}-bit",
        options=(GROUP, compute_dtype_setting()),
        nbits=nbits,
    )


METHODS = tuple(hqq(n) for n in (2, 3, 4, 8))
