"""ftrecycle: recycle fine-tuning across versions of a language model.

The diff vector ``delta = finetuned - base`` of one model version, added to the next
version's base, approximates fine-tuning that new base ("Efficient Model
Development through Recycling Fine-tuning").
"""

__version__ = "0.1.0"

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
from ftrecycle.ops.diff import diff
from ftrecycle.ops.export import ExportResult, export_lora
from ftrecycle.ops.inspect import inspect_delta
from ftrecycle.ops.transfer import TransferResult, apply_delta, transfer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Diagnosis",
    "ExportResult",
    "FtRecycleError",
    "HubError",
    "IncompatibleModelsError",
    "MemoryBudgetError",
    "NonFiniteError",
    "OutputError",
    "TransferResult",
    "__version__",
    "apply_delta",
    "best_alpha",
    "diagnose",
    "diff",
    "export_lora",
    "inspect_delta",
    "transfer",
]
