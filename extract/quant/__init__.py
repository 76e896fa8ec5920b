"""Quantization methods: bitsandbytes configs, CPU half-precision matmuls, library noise filters."""
