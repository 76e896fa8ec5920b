"""qcache: cache LLM activations at several quantizations, analyze them offline."""

__version__ = "0.1.0"
