"""The extract phase: models at 4/8/16/32 bits, datasets, hooks, attributions, the run loop.

Everything here needs torch; nothing outside ``extract`` imports this package at module level.
"""

from qcache.extract.quant.quiet import silence_kernels_hub_warning, silence_torchao_import

silence_kernels_hub_warning()
silence_torchao_import()
