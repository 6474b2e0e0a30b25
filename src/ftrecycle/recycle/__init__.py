"""Recycling-then-fine-tuning (paper §5) and its iterative form over a chain of versions (Algorithm 1).

- :mod:`~ftrecycle.recycle.start`: :func:`recycle_finetune`, FT(target + alpha * diff) in one call;
- :mod:`~ftrecycle.recycle.chainfile`: :class:`ChainSpec`, an ``iterate`` chain read from YAML;
- :mod:`~ftrecycle.recycle.chain`: :func:`iterate`, the chain's products, each reused while its key holds;
- :mod:`~ftrecycle.recycle.keys`: what goes into those keys (models, alpha, weight-changing options).
"""

from ftrecycle.recycle.chain import SUMMARY, PlannedStep, describe_chain, iterate, plan_chain, summary_table
from ftrecycle.recycle.chainfile import MAX_CHAIN_BYTES, MAX_CHAIN_DEPTH, ChainSpec
from ftrecycle.recycle.start import recycle_finetune

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_CHAIN_DEPTH",
    "SUMMARY",
    "ChainSpec",
    "PlannedStep",
    "describe_chain",
    "iterate",
    "plan_chain",
    "recycle_finetune",
    "summary_table",
]
