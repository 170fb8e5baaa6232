"""The adapter methods, one entry each: what the recipe calls it, what peft (or we) save it as,
its files, whether it folds into the base weights, and how it is built. A new method is one file
in this folder that calls `register`, plus its recipe section (recipe/adapter_section.py) and its
trainable tensors for the estimate (estimate/methods.py); tests/unit/test_adapter_registry.py
checks that the three agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from qlora_cli.errors import ModelError
from qlora_cli.rundir import ADAPTER_FILES


@dataclass(frozen=True)
class AdapterMethod:
    name: str  # adapter.method in the recipe
    peft_type: str  # "peft_type" in the saved config (peft's PeftType, or ours)
    description: str
    # recipe, modules_to_save, model_type, module names -> a peft config; None for our own adapters
    peft_config: Optional[Callable] = None
    # model, recipe, unfrozen module names -> settings saved with the adapter (our own adapters only)
    attach: Optional[Callable] = None
    files: tuple[str, str] = ADAPTER_FILES["peft"]  # (config, weights) in a run directory
    virtual_tokens: bool = False  # adds tokens once per sequence: rows cannot be packed
    why_not_mergeable: Optional[str] = None  # None: `qlora merge` folds it into the weights


METHODS: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    METHODS[method.name] = method
    return method


def method(name: str) -> AdapterMethod:
    return METHODS[name]


def by_peft_type(peft_type: str) -> Optional[AdapterMethod]:
    """The method that saved an adapter of this peft_type (DoRA saves as LORA), or None."""
    return next((entry for entry in METHODS.values() if entry.peft_type == peft_type.upper()), None)


def check_mergeable(peft_type: str, where) -> None:
    entry = by_peft_type(peft_type)
    why = entry.why_not_mergeable if entry else "only LoRA, DoRA and IA3 adapters fold into the base weights"
    if why:
        raise ModelError(
            f"{where} holds a {peft_type} adapter, which cannot be merged: {why}; "
            "use it unmerged (qlora evaluate / qlora generate load it on the base)"
        )
