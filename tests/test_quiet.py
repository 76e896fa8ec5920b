"""bitsandbytes' "pip install kernels" warning is dropped; its other messages are not."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
import qcache.extract
import bitsandbytes
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. pip install kernels", "x")
log.warning("another bitsandbytes warning")
"""


def test_only_the_kernels_hub_warning_is_dropped():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert "another bitsandbytes warning" in out.stderr
    assert "kernels-community" not in out.stderr  # neither ours nor the one importing bitsandbytes logs here


def test_without_the_filter_the_warning_shows():
    script = SCRIPT.replace("import qcache.extract\n", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "kernels-community" in out.stderr
