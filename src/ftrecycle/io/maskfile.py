"""A sign-mask file: one int8 tensor of -1/0/+1 per floating tensor of a model, in one safetensors file.

``ftrecycle mask`` writes the sign of the target's descent direction ``-grad L(C)`` (GradFix); a
masked transfer keeps an entry of the diff only where its sign equals the mask's. The tensors are
named as the model's checkpoint names them; ``__metadata__`` holds ``format`` (:data:`MASK_FORMAT`)
and ``ftrecycle``, a JSON object of how the mask was made (calibration file SHA-256, examples, the
target's identity).

The file is read like any other input: its header strictly (as a checkpoint's), its values checked
to be -1, 0 or +1 while its SHA-256 is computed, and by element range afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftrecycle.dtypes import I8
from ftrecycle.errors import CheckpointError, short
from ftrecycle.io.checkpoint import Checkpoint, metadata_cost
from ftrecycle.io.hub import ResolvedRef
from ftrecycle.io.jsonfile import open_regular
from ftrecycle.io.output import replaced_file
from ftrecycle.io.safetensors_format import PlannedTensor, build_header, read_header

#: The ``format`` a mask file's ``__metadata__`` names.
MASK_FORMAT = "ftrecycle-sign-mask"
#: Bytes read at a time while hashing and checking a mask file.
_BLOCK = 1 << 20
_FIX = "make it again with `ftrecycle mask`"


@dataclass
class MaskFile:
    """An opened mask file.

    Attributes:
        path: the file.
        ckpt: its tensors, readable by element range (close it when done).
        info: what the file records about how it was made (its ``ftrecycle`` metadata).
        sha256: the file's SHA-256.
    """

    path: Path
    ckpt: Checkpoint
    info: dict[str, Any]
    sha256: str

    def close(self) -> None:
        """Close the open file."""
        self.ckpt.close()


def open_mask(path: str | Path, *, max_metadata_bytes: int | None = None) -> MaskFile:
    """Open and check a mask file: its header, its format, and every value (-1, 0 or +1).

    Args:
        path: the ``.safetensors`` mask file.
        max_metadata_bytes: memory its index may take (as :func:`~ftrecycle.io.checkpoint.open_checkpoint`).

    Returns:
        The opened mask; close it when done.

    Raises:
        CheckpointError: not a regular file, a corrupt header, another format, a tensor that is not
            int8, or a value other than -1, 0 and +1 (each naming the file and the fix).
        MemoryBudgetError: the header would take more than ``max_metadata_bytes`` to index.
    """
    p = Path(path).expanduser()
    if not os.path.lexists(p):  # anything else (a FIFO, a directory) is refused by the header reader
        raise CheckpointError(f"mask file {p}: no such file; make one with `ftrecycle mask` or pass --mask grad-sign")
    cost = metadata_cost([p])
    if max_metadata_bytes is not None and cost > max_metadata_bytes:
        raise CheckpointError(f"mask file {p}: its header needs {cost} bytes of memory, more than --max-memory leaves")
    tensors, metadata = read_header(p)
    if metadata.get("format") != MASK_FORMAT:
        raise CheckpointError(
            f"{p}: not a mask file (its metadata's format is {short(metadata.get('format'))}, not "
            f"{MASK_FORMAT}); {_FIX}"
        )
    for name, t in tensors.items():
        if t.dtype is not I8:
            raise CheckpointError(f"{p}: mask tensor {short(name)} is {t.dtype}, not int8; {_FIX}")
    try:
        info = json.loads(metadata.get("ftrecycle", "{}"))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise CheckpointError(f"{p}: its 'ftrecycle' metadata is not a JSON object; {_FIX}")
    data_start = min((t.offset for t in tensors.values()), default=os.path.getsize(p))
    digest = _hash_and_check(p, data_start)
    ckpt = Checkpoint(ResolvedRef(str(path), p.parent), {}, tensors, [p], metadata_bytes=cost)
    return MaskFile(p, ckpt, info, digest)


def _hash_and_check(path: Path, data_start: int) -> str:
    """The file's SHA-256; every byte from ``data_start`` on must be an int8 -1, 0 or +1."""
    h = hashlib.sha256()
    fd = open_regular(path, what="mask file")
    try:
        at = 0
        while block := os.pread(fd, _BLOCK, at):
            h.update(block)
            data = np.frombuffer(block, dtype=np.int8)[max(0, data_start - at) :]
            if data.size and (int(data.max()) > 1 or int(data.min()) < -1):
                raise CheckpointError(f"{path}: holds values other than -1, 0 and +1; {_FIX}")
            at += len(block)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e}); check the file") from e
    finally:
        os.close(fd)
    return h.hexdigest()


def write_mask(path: Path, signs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write ``signs`` (int8 arrays of -1/0/+1, by tensor name) as a mask file; ``path`` appears only when complete.

    Args:
        path: the file to write (checked by the caller: not an input, absent unless forced).
        signs: the mask tensors, in the order to store them.
        info: how the mask was made, recorded as the ``ftrecycle`` metadata (JSON).

    Raises:
        OutputError: the file cannot be written.
    """
    planned, at = [], 0
    for name, s in signs.items():
        t = PlannedTensor(name, I8, tuple(s.shape), at)
        planned.append(t)
        at += t.nbytes
    header = build_header(planned, {"format": MASK_FORMAT, "ftrecycle": json.dumps(info, sort_keys=True)})
    with replaced_file(path) as f:
        f.write(header)
        for s in signs.values():
            f.write(np.ascontiguousarray(s, dtype=np.int8).tobytes())
