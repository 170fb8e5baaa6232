"""IA3: learned rescaling vectors on keys, values and the MLP input (peft's defaults per
architecture, or the recipe's modules)."""

from __future__ import annotations

from typing import Optional

from qlora_cli.errors import ConfigError
from qlora_cli.model.adapters.registry import AdapterMethod, register
from qlora_cli.train.layer_lr import layer_index


def ia3_modules(recipe, model_type: str) -> tuple[list[str], list[str]]:
    """(target, feed-forward) module names for IA3: the recipe's, else peft's defaults for the architecture."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    section = recipe.adapter.ia3
    targets = section.target_modules or TARGETS.get(model_type)
    if targets is None:
        raise ConfigError(f"peft has no default IA3 modules for {model_type}; set adapter.ia3.target_modules and feedforward_modules")
    feedforward = section.feedforward_modules if section.feedforward_modules is not None else [
        name for name in FEEDFORWARD.get(model_type, []) if name in targets
    ]
    return list(targets), list(feedforward)


def _in_layers(leaves: list[str], layers: list[int], module_names: list[str]) -> list[str]:
    return [name for name in module_names if name.rpartition(".")[2] in leaves and layer_index(name) in layers]


def peft_config(recipe, modules_to_save: Optional[list[str]], model_type: str, module_names: list[str]):
    import peft

    targets, feedforward = ia3_modules(recipe, model_type)
    layers = recipe.adapter.layers_to_transform
    if layers is not None:  # peft's IA3Config has no layers_to_transform: name the modules
        targets, feedforward = (_in_layers(names, layers, module_names) for names in (targets, feedforward))
    return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM", modules_to_save=modules_to_save or None)


register(AdapterMethod(name="ia3", peft_type="IA3", peft_config=peft_config,
                       description="learned rescaling of keys, values and the MLP input"))
