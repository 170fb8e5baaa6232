"""Deployable formats: the GGUF writer, its tokenizer half, and the check that reads it back."""
