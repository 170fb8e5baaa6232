"""The model families the test suite trains (4- and 16-bit), evaluates, merges and estimates, on a
tiny random-weight model of each (tests/unit/test_families.py), and the note printed at start-up
for a causal LM outside them. No torch here: `qlora estimate` prints the note too.
"""

from __future__ import annotations

from typing import Optional

TESTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "mixtral", "qwen2_moe")
TESTED_NAMES = "Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text-only and multimodal), Phi-3/Phi-4, Mixtral, Qwen2-MoE"


def untested_note(model_type: str, loaded_as: str = "") -> Optional[str]:
    """One line for a model_type outside TESTED (None for a tested one): what is tested, and that it may still work."""
    if model_type in TESTED:
        return None
    loaded = f" (transformers loads it as {loaded_as})" if loaded_as else ""
    return (f"model_type {model_type!r} is not among the families qlora is tested on ({TESTED_NAMES}); "
            f"it may still work{loaded}")
