"""Evaluation: loss, perplexity and bits per byte on text, SFT response loss and generation
metrics, an lm-evaluation-harness adapter, and the same tasks inside training (eval.py,
docs/EVALUATION.md)."""
