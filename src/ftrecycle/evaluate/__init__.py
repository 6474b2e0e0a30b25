"""Evaluation: a fast in-process GSM8K-format evaluator and an lm-evaluation-harness adapter."""
