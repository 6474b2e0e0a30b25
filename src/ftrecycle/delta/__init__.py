"""Diff vectors stored as a directory, and PEFT adapters read as one.

- :mod:`~ftrecycle.delta.manifest`: the file names and the manifest's schema and checks.
- :mod:`~ftrecycle.delta.store`: :class:`~ftrecycle.delta.store.Delta`, the read side (open,
  check the parts, verify the checksums, the fine-tuned files); ``open_delta``/``read_manifest``.
- :mod:`~ftrecycle.delta.write`: :class:`~ftrecycle.delta.write.DeltaWriter`, the write side
  (the manifest built from what ``diff`` computed, completed and written after the shards).
- :mod:`~ftrecycle.delta.adapter`: a PEFT LoRA adapter read as a source of terms.
"""
