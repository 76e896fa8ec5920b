"""Tap points of any decoder-only causal LM, found from its module structure and confirmed by a probe.

``discovery`` reads the modules (works on the meta device), ``probe`` checks the guess on one forward
pass, ``moe`` finds mixture-of-experts layers (or says why one is refused) and ``experts`` recomputes their
per-expert values.
"""

from .discovery import LayerMLP, LayerTaps, Structure, discover
from .probe import probe

__all__ = ["LayerMLP", "LayerTaps", "Structure", "discover", "probe"]
