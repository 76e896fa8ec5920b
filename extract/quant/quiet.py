"""Drop library log lines that mislead: one of bitsandbytes on an offline CPU, torchao's import noise.

On CPUs with AVX512-BF16, importing bitsandbytes 0.50 tries to download a faster NF4 kernel from the
Hugging Face Hub (the ``kernels`` package) and, failing, logs a warning telling the user to install it. The
fallback is bitsandbytes' own compiled kernel, which every NF4 run here uses and which the tests check
against PyTorch; the download would need the network extraction must never need. Every other bitsandbytes
message passes.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HUB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHubWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_HUB_MESSAGE)


def silence_kernels_hub_warning() -> None:
    """Install the filter (idempotent); must run before bitsandbytes is first imported."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsHubWarning) for f in logger.filters):
        logger.addFilter(_DropKernelsHubWarning())


# torchao 0.18 imports every compiled extension it ships and logs each that does not load; the two that
# fail here (an MX-FP8 kernel built for another Python, CUTLASS kernels for sm_90a GPUs) serve none of
# qcache's methods. Its Enum registrations also trip a torch deprecation warning. Nothing else is dropped.
TORCHAO_LOGGER = "torchao"
TORCHAO_UNUSED_EXTENSIONS = ("_C_mxfp8", "_C_cutlass_90a")
PYTREE_LOGGER = "torch.utils._pytree"
PYTREE_ENUM_MESSAGE = "is an Enum subclass and is now natively supported by torch.compile"


class _DropTorchaoImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        unused = text.startswith("Failed to load") and any(x in text for x in TORCHAO_UNUSED_EXTENSIONS)
        return not unused and PYTREE_ENUM_MESSAGE not in text


def silence_torchao_import() -> None:
    """Install the torchao filters (idempotent); must run before torchao is first imported."""
    for name in (TORCHAO_LOGGER, PYTREE_LOGGER):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTorchaoImportNoise) for f in logger.filters):
            logger.addFilter(_DropTorchaoImportNoise())
