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
from ftrecycle.io.card import Card, command_line, write_card
from ftrecycle.io.checkpoint import _index_safetensors
from ftrecycle.io.model_files import CONFIG_FILES, TOKENIZER_FILES, copy_files
from ftrecycle.io.output import write_json
from ftrecycle.io.provenance import RecordPaths, base_record, portable
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

    def finish(self, tmp: Path, out: Path | None = None, record_paths: RecordPaths = "relative") -> None:
        """Complete the manifest from the written shards in ``tmp`` and write it, with the
        fine-tuned model's files under ``finetuned/`` and the delta's card.

        The manifest on disk names local inputs relative to ``out`` (see
        :func:`~ftrecycle.io.provenance.portable`); :attr:`manifest` keeps them as they were.

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
        written = portable(self.manifest, out, record_paths) if out is not None else self.manifest
        write_json(tmp / MANIFEST, written)
        write_card(tmp, delta_card(written))

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


def delta_card(manifest: dict[str, Any]) -> Card:
    """The card of a delta directory: what it holds and how to apply it to a new base.

    Args:
        manifest: the delta's manifest (as written).

    Returns:
        The card (no ``base_model_relation``: a delta is no model; its ``base_model`` is the base A).
    """
    base, fin = manifest.get("base") or {}, manifest.get("finetuned") or {}
    names = [str(d.get("hub_id") or Path(str(d.get("ref") or "?")).name) for d in (fin, base)]
    entries = manifest.get("tensors") or {}
    packed = sum(1 for e in entries.values() if e.get("parts"))
    compression = manifest.get("compression") or {}
    rows = [("tensors", str(len(entries))), ("stored compressed", str(packed)), ("dtype", str(manifest.get("dtype")))]
    if compression.get("spec"):
        rows.append(("compression", str(compression["spec"])))
    if compression.get("ratio"):
        rows.append(("size ratio (dense / stored)", f"{compression['ratio']:.2f}"))
    return Card(
        title=f"Diff vector: {names[0]} − {names[1]}",
        summary=(
            f"A delta directory written by ftrecycle: the diff vector of a fine-tune (fine-tuned {names[0]} minus "
            f"its base {names[1]}), stored as safetensors shards with the manifest {MANIFEST} (checksums, norms, "
            "compression). Add it to a newer version of the base model to carry the fine-tune over."
        ),
        relation=None,
        base_models=tuple(b for b in (base.get("hub_id"),) if b),
        library_name=None,
        tags=("task-vector", "diff-vector", "delta"),
        license=base.get("license"),
        load=("sh", "ftrecycle apply --delta THIS_DIRECTORY --target-base NEW_BASE -o OUTPUT"),
        command=command_line(manifest, ["ftrecycle", "diff", "--base", names[1], "--finetuned", names[0]]),
        table=(("delta", "value"), rows),
        table_title="What it holds",
    )
