"""Supervised fine-tuning on transformers' Trainer (so `accelerate launch` scales it out)."""
