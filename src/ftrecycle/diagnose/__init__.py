"""Diagnostics of the parameter-space relation between model versions (geometry, connectivity probe)."""
