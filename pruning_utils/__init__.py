"""Shared code of the pruning book."""
