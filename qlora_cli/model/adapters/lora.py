"""LoRA (with DoRA, rsLoRA and peft's initialisations): the peft LoraConfig of a recipe, and the
PiSSA / OLoRA / LoftQ starts that need the attached model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from qlora_cli.errors import ModelError, library_message
from qlora_cli.model.adapters.registry import AdapterMethod, register
from qlora_cli.recipe.schema import LoraSection

_LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}


def build_lora_config(lora: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )


def peft_config(recipe, modules_to_save: Optional[list[str]], model_type: str, module_names: list[str]):
    config = build_lora_config(recipe.lora)
    config.init_lora_weights = _LORA_INIT[recipe.lora.init]
    config.layers_to_transform = recipe.adapter.layers_to_transform
    if modules_to_save:
        config.modules_to_save = list(config.modules_to_save or []) + modules_to_save
    return config


def special_init(model, recipe) -> Optional[Path]:
    """LoftQ / PiSSA / OLoRA starts; returns the folder of the starting adapter that PiSSA / OLoRA
    are saved converted against (None otherwise)."""
    if recipe.lora.init == "loftq":
        from peft.utils.loftq_utils import replace_lora_weights_loftq

        try:
            path = Path(recipe.model.path).expanduser()
            replace_lora_weights_loftq(model, model_path=str(path) if path.is_dir() else None)
        except (ValueError, OSError, TypeError) as exc:
            raise ModelError(f"LoftQ initialisation failed: {library_message(exc)} (it needs the base's safetensors in a local folder)") from None
    elif recipe.lora.init in ("pissa", "olora"):
        # The adapter starts from principal (PiSSA) / orthonormal (OLoRA) directions taken out of the base
        # weights; saving it converted against this starting point gives a plain LoRA on the original base.
        initial = Path(tempfile.mkdtemp(prefix="qlora-initial-adapter-"))
        config = model.peft_config["default"]
        config.init_lora_weights, saved = True, config.init_lora_weights
        model.save_pretrained(str(initial))
        config.init_lora_weights = saved
        return initial
    return None


register(AdapterMethod(
    name="lora", peft_type="LORA", peft_config=peft_config,
    description="low-rank update B·A on the chosen linear layers (DoRA: with a learned magnitude)",
))
