"""The lab: the paper's controlled experiments, end to end, on small models made locally."""

from ftrecycle.lab.config import PRESETS, LabConfig, preset
from ftrecycle.lab.run import LabResult, run_lab

__all__ = ["PRESETS", "LabConfig", "LabResult", "preset", "run_lab"]
