"""The operations on models and deltas: transfer, diff, apply, export, inspect."""
