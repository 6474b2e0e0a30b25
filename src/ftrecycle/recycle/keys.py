"""What makes two recycle products "the same": model identities, alpha, and the transfer options that
change the weights written.

A product (a merged start, a delta, a fine-tuned model) is reused only when its key is unchanged, so
a key holds exactly what decides the product's bits: not the threads or memory it was made with,
not where it was written.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from ftrecycle.errors import ConfigError
from ftrecycle.io.state import file_identity, model_identity
from ftrecycle.options import (
    Bundle,
    DeltaStorage,
    ModelFiles,
    Output,
    Policies,
    Precision,
    Scaling,
    TokenRows,
    TransferOptions,
)

B = TypeVar("B", bound=Bundle)

#: Transfer settings every recycle-finetune key and record holds (the ones it has recorded from the start).
RECORDED = ("compute_dtype", "out_dtype", "config_from", "tokenizer_from", "vocab", "on_missing", "tie_mismatch")
#: Every option that changes the weights or model files written (alpha aside: see :func:`alpha_key`).
WEIGHT_FIELDS = tuple(f.name for g in (Precision, DeltaStorage, Policies, ModelFiles, TokenRows) for f in fields(g))
#: Options of the output group: a recycle step writes its own outputs (and its ``force`` is its own).
OUTPUT_FIELDS = frozenset(f.name for f in fields(Output))
#: Options resolved before a transfer runs (``alpha: auto`` with its calibration data becomes a number).
SCALING_FIELDS = frozenset(f.name for f in fields(Scaling))
_DEFAULTS = TransferOptions().flat()


def complete(path: Path) -> bool:
    """Whether a product is there: every output ftrecycle writes appears by an atomic rename, so it is complete."""
    return path.is_dir()


def model_key(ref: str) -> dict[str, Any]:
    """A model argument as a key: a local directory by content identity, a hub id by the id."""
    return model_identity(ref) if Path(ref).expanduser().is_dir() else {"ref": ref}


def changed(options: TransferOptions, names: tuple[str, ...]) -> dict[str, Any]:
    """The options among ``names`` set to other than their defaults (so a key made without them is unchanged)."""
    flat = options.flat()
    return {k: flat[k] for k in names if flat[k] != _DEFAULTS[k]}


def weight_fields(bundle: type[Bundle]) -> tuple[str, ...]:
    """The options an operation's bundle takes that change the weights it writes."""
    return tuple(k for k in bundle().flat() if k in WEIGHT_FIELDS and k not in bundle.not_applicable)


def step_options(bundle: type[B], options: TransferOptions, alpha: float | None = None) -> B:
    """A chain's or a recycle run's transfer options as the bundle of one of its steps (a diff, an
    apply, the merged start's transfer): its own outputs (replaced, under its own name) and, once
    resolved, alpha as a number. Options the step does not take (a diff's ``out_dtype``) are left at
    their defaults by :meth:`~ftrecycle.options.Bundle.sharing`."""
    groups: dict[str, Any] = {"output": Output(force=True)}
    if alpha is not None:
        groups["scaling"] = Scaling(alpha=alpha)
    return bundle.sharing(options, **groups)


def alpha_key(scaling: Scaling) -> dict[str, Any]:
    """Alpha as it enters a key: the number, or ``auto`` with the calibration file's content identity.

    An ``auto`` alpha is keyed by what decides it (the models, keyed beside it, and the calibration data),
    so that a finished product is recognised without running the search again.
    """
    if scaling.alpha != "auto":
        return {"alpha": float(scaling.alpha)}
    return {"alpha": "auto", "calibration": file_identity(scaling.calibration)}


def refuse_output_options(names: set[str], where: str, fix: str) -> None:
    """Refuse output options given where a recycle step writes its own outputs.

    Raises:
        ConfigError: naming the options, ``where`` they were given, and ``fix``.
    """
    own = sorted(names & OUTPUT_FIELDS)
    if own:
        raise ConfigError(f"{where}: {', '.join(own)} cannot be set here; {fix}")
