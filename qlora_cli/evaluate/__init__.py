"""Evaluation: scores, batched inference, multi-adapter generation, and model-vs-model drift."""
