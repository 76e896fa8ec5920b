"""Launching: one child process per device or CPU share, torchrun shards."""
