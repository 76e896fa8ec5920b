"""Models: the alias registry, loading (weights, tokenizer, device), meta-device
skeletons, and the architecture's sizes for planning.
"""
