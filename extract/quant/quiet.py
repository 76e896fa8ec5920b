"""Drop one bitsandbytes log line that misleads on an offline CPU.

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
