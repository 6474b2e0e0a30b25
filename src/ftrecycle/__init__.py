"""ftrecycle: recycle fine-tuning across versions of a language model.

The diff vector ``delta = finetuned - base`` of one model version, added to the next
version's base, approximates fine-tuning that new base ("Efficient Model
Development through Recycling Fine-tuning").

The operations (:func:`transfer`, :func:`diff`, :func:`apply_delta`) take their options as
flat keywords (``transfer(a, b, c, out, alpha=0.5, vocab="overlap")``) or as typed groups
(``transfer(a, b, c, out, options=TransferOptions(scaling=Scaling(alpha=0.5)))``); keywords
override the groups' fields. Every option is declared once, in :mod:`ftrecycle.options`.
"""

from ftrecycle.diagnose.tokens import TokenRowReport, input_warnings, token_rows
from ftrecycle.diagnose.verdict import Diagnosis, best_alpha, diagnose
from ftrecycle.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FtRecycleError,
    HubError,
    IncompatibleModelsError,
    MemoryBudgetError,
    NonFiniteError,
    OutputError,
)
from ftrecycle.finetune.calibrate import CalibrationResult, calibrate, calibrated_diff, sensitivity
from ftrecycle.finetune.gradmask import MaskResult, grad_sign_mask
from ftrecycle.ops._model import TransferResult
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import DiffResult, diff
from ftrecycle.ops.export import ExportResult, export_lora
from ftrecycle.ops.inspect import inspect_delta
from ftrecycle.ops.transfer import transfer
from ftrecycle.options import (
    ApplyOptions,
    Checks,
    DeltaStorage,
    DiffOptions,
    Inputs,
    Masking,
    ModelFiles,
    Output,
    Policies,
    Precision,
    Resources,
    Scaling,
    TokenRows,
    TransferOptions,
)
from ftrecycle.version import __version__

__all__ = [
    "ApplyOptions",
    "CalibrationResult",
    "CheckpointError",
    "Checks",
    "ConfigError",
    "DataError",
    "DeltaStorage",
    "Diagnosis",
    "DiffOptions",
    "DiffResult",
    "ExportResult",
    "FtRecycleError",
    "HubError",
    "IncompatibleModelsError",
    "Inputs",
    "MaskResult",
    "Masking",
    "MemoryBudgetError",
    "ModelFiles",
    "NonFiniteError",
    "Output",
    "OutputError",
    "Policies",
    "Precision",
    "Resources",
    "Scaling",
    "TokenRowReport",
    "TokenRows",
    "TransferOptions",
    "TransferResult",
    "__version__",
    "apply_delta",
    "best_alpha",
    "calibrate",
    "calibrated_diff",
    "diagnose",
    "diff",
    "export_lora",
    "grad_sign_mask",
    "input_warnings",
    "inspect_delta",
    "sensitivity",
    "token_rows",
    "transfer",
]
