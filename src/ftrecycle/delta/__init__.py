"""Diff vectors: compute them, store them as a directory, read them back."""
