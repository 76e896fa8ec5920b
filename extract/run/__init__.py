"""The extraction run: spec, units, hooks, batching, and the answer readout."""
