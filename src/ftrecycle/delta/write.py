"""Writing a delta directory's manifest: built from what ``diff`` computed, completed once the
shards are written (checksums, norms, sizes), and written last, with the fine-tuned model's files.

The shards themselves are written by :func:`ftrecycle.pipeline.write_plan` from
:attr:`DeltaWriter.stored`; the schema is :mod:`ftrecycle.delta.manifest`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftrecycle.codecs import Compression, PartSpec, part_name
from ftrecycle.delta.manifest import FINETUNED_DIR, FORMAT, INDEX, MANIFEST, PREFIX, VERSION, dense_bytes
from ftrecycle.delta.store import checksums
from ftrecycle.dtypes import DType
from ftrecycle.errors import CheckpointError
from ftrecycle.io.checkpoint import _index_safetensors
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, copy_files
from ftrecycle.io.output import write_json
from ftrecycle.io.provenance import base_record
from ftrecycle.io.safetensors_format import TensorInfo
from ftrecycle.terms import OutTensor, Record


class DeltaWriter:
    """The manifest of a delta being written, and the tensors its shards store.

    Made by :meth:`start` before the shards are written; each compressed tensor's
    measurements are added by :meth:`compressed` as its encoder finishes; :meth:`finish`
    (the write pipeline's last step, in the temporary directory) completes the manifest
    from the written shards and writes it.

    Attributes:
        manifest: the manifest being built (also the diff's provenance).
        stored: the tensors the shards store: dense diffs and compressed tensors' parts.
        dtype: the delta's dtype.
        spec: the compression setting, if any.
        files: the directory the fine-tuned model's config and tokenizer files are copied from.
        threads: threads for the checksums.
    """

    def __init__(
        self,
        manifest: dict[str, Any],
        stored: list[OutTensor],
        dtype: DType,
        spec: Compression | None,
        files: Path,
        threads: int,
    ) -> None:
        self.manifest = manifest
        self.stored = stored
        self.dtype = dtype
        self.spec = spec
        self.files = files
        self.threads = threads

    @classmethod
    def start(
        cls,
        tensors: list[OutTensor],
        packed: dict[str, dict[str, PartSpec]],
        *,
        spec: Compression | None,
        specs: dict[str, Compression] | None = None,
        dtype: DType,
        compute_dtype: DType,
        inputs: dict[str, Any],
        base_config: dict[str, Any],
        aliases: dict[str, str],
        policies: dict[str, Any],
        records: list[Record],
        files: Path,
        threads: int,
    ) -> DeltaWriter:
        """The manifest of a new delta, before any shard is written.

        Args:
            tensors: the diff's tensors, as planned (dense).
            packed: the parts of each tensor stored compressed (the others stay dense).
            spec: the compression setting, if any.
            specs: each compressed tensor's own setting, where it differs from ``spec`` (recorded).
            dtype: the delta's dtype.
            compute_dtype: the dtype the diff was computed in.
            inputs: descriptions of the ``base`` and ``finetuned`` inputs.
            base_config: the base model's config.json.
            aliases: tied tensor name -> the stored tensor it shares.
            policies: the ``vocab`` and ``on_missing`` policies used.
            records: what was skipped or adapted, per tensor.
            files: the directory to copy the fine-tuned config and tokenizer files from.
            threads: threads for the checksums.

        Returns:
            The writer; write :attr:`stored` to the shards, then call :meth:`finish`.
        """
        stored: list[OutTensor] = []
        entries: dict[str, dict[str, Any]] = {}
        for t in tensors:
            entry: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype.name, "compression": None}
            if t.name in packed:
                own = (specs or {}).get(t.name, spec)
                entry["compression"] = {"method": own.method if own else None}
                if own is not None and own != spec:
                    entry["compression"]["spec"] = str(own)
                entry["parts"] = {k: part_name(t.name, k) for k in packed[t.name]}
                for k, (pdt, pshape) in packed[t.name].items():
                    stored.append(OutTensor(part_name(t.name, k), pdt, pshape, []))
            else:
                stored.append(t)
            entries[t.name] = entry
        manifest = base_record("diff")
        manifest.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "base": inputs["base"],
                "finetuned": inputs["finetuned"],
                "base_config": base_config,
                "dtype": dtype.name,
                "compute_dtype": compute_dtype.name,
                "compression": None if spec is None else {"spec": str(spec)},
                "aliases": aliases,
                "policies": policies,
                "records": records,
                "tensors": entries,
            }
        )
        return cls(manifest, stored, dtype, spec, files, threads)

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """The manifest's entry of each tensor (shared with :attr:`manifest`)."""
        entries: dict[str, dict[str, Any]] = self.manifest["tensors"]
        return entries

    def dense_names(self) -> list[str]:
        """The tensors stored dense."""
        return [name for name, e in self.entries.items() if not e.get("parts")]

    def compressed(self, name: str, found: dict[str, Any]) -> None:
        """Record what the encoder of compressed tensor ``name`` measured (norm, error, rank...)."""
        self.entries[name]["compression"].update(found)

    def finish(self, tmp: Path) -> None:
        """Complete the manifest from the written shards in ``tmp`` and write it, with the
        fine-tuned model's files under ``finetuned/``.

        Adds the SHA-256 of every stored tensor, each dense tensor's norm, each tensor's stored
        bytes, and (compressed) the delta's size against its dense size.

        Raises:
            CheckpointError: ``tmp`` holds no shards.
        """
        found = _index_safetensors(tmp, INDEX, PREFIX)
        if found is None:
            raise CheckpointError(f"{tmp}: the delta's shards were not written")
        infos = found[0]
        dense = self.dense_names()
        self.manifest["checksums"], norms = checksums(infos, self.threads, norms=frozenset(dense))
        self._sizes(infos, dense, norms)
        (tmp / FINETUNED_DIR).mkdir()
        copy_files(self.files, tmp / FINETUNED_DIR, CONFIG_FILES + TOKENIZER_FILES)
        write_json(tmp / MANIFEST, self.manifest)

    def _sizes(self, infos: dict[str, TensorInfo], dense: list[str], norms: dict[str, float]) -> None:
        entries = self.entries
        for name in dense:
            entries[name].update(norm=norms[name], error=None)
        for e in entries.values():
            e["bytes"] = sum(infos[p].nbytes for p in e["parts"].values()) if e.get("parts") else None
        for name in dense:
            entries[name]["bytes"] = infos[name].nbytes
        dense_total = dense_bytes(entries, self.dtype.itemsize)
        stored_total = sum(i.nbytes for i in infos.values())
        if self.spec is not None:
            self.manifest["compression"].update(
                {"bytes": stored_total, "dense_bytes": dense_total, "ratio": dense_total / max(stored_total, 1)}
            )
