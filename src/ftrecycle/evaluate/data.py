"""Read JSONL data files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftrecycle.errors import DataError


def read_jsonl(path: str | Path, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects.

    Args:
        path: the file.
        required: fields every line must have (as non-empty strings).

    Raises:
        DataError: missing or empty file, a line that is not a JSON object, a missing field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {'not a regular file' if p.exists() else 'no such data file'}")
    rows: list[dict[str, Any]] = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            except RecursionError as e:
                raise DataError(f"{p}:{n}: JSON nested too deeply; each line must be one flat JSON object") from e
            if not isinstance(row, dict):
                raise DataError(f"{p}:{n}: a JSON {type(row).__name__}, expected an object")
            for key in required:
                if not isinstance(row.get(key), str) or not row[key]:
                    raise DataError(f"{p}:{n}: missing field {key!r} (a non-empty string)")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise DataError(f"{p}: empty data file")
    return rows


def read_gsm8k(path: str | Path) -> list[dict[str, Any]]:
    """Read GSM8K-format items (``question``, ``answer`` ending in ``#### N``).

    Raises:
        DataError: as :func:`read_jsonl`, or an answer without ``#### ``.
    """
    rows = read_jsonl(path, required=("question", "answer"))
    for r in rows:
        if "#### " not in r["answer"]:
            raise DataError(f"{path}:{r['_line']}: answer does not end with '#### N' (GSM8K format)")
    return rows
