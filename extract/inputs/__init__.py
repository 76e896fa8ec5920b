"""Inputs: datasets and dataset files, gold labels, prompting (chat templates), tokenization."""
