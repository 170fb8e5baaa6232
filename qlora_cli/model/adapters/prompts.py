"""The prompt-learning methods: prompt tuning (soft-prompt vectors), prefix tuning (key/value
prefixes in every attention layer) and p-tuning (virtual tokens from an MLP prompt encoder). Each
adds its tokens once per sequence, so their rows are padded, not packed, and none merges."""

from __future__ import annotations

from typing import Optional

from qlora_cli.model.adapters.registry import AdapterMethod, register


def _common(modules_to_save: Optional[list[str]]) -> dict:
    return {"task_type": "CAUSAL_LM", "modules_to_save": modules_to_save or None}


def prompt_tuning_config(recipe, modules_to_save, model_type, module_names):
    import peft

    section = recipe.adapter.prompt_tuning
    text = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": section.init_text, "tokenizer_name_or_path": recipe.model.path} if section.init_text else {}
    return peft.PromptTuningConfig(num_virtual_tokens=section.num_virtual_tokens, **text, **_common(modules_to_save))


def prefix_tuning_config(recipe, modules_to_save, model_type, module_names):
    import peft

    section = recipe.adapter.prefix_tuning
    return peft.PrefixTuningConfig(
        num_virtual_tokens=section.num_virtual_tokens, prefix_projection=section.projection,
        encoder_hidden_size=section.encoder_hidden_size, **_common(modules_to_save),
    )


def p_tuning_config(recipe, modules_to_save, model_type, module_names):
    import peft

    section = recipe.adapter.p_tuning
    return peft.PromptEncoderConfig(
        num_virtual_tokens=section.num_virtual_tokens, encoder_hidden_size=section.encoder_hidden_size,
        encoder_reparameterization_type="MLP", **_common(modules_to_save),
    )


register(AdapterMethod(
    name="prompt_tuning", peft_type="PROMPT_TUNING", peft_config=prompt_tuning_config, virtual_tokens=True,
    description="trainable soft-prompt vectors before every sequence",
    why_not_mergeable="its soft prompt is an input, not a change of weights",
))
register(AdapterMethod(
    name="prefix_tuning", peft_type="PREFIX_TUNING", peft_config=prefix_tuning_config, virtual_tokens=True,
    description="trainable key/value prefixes in every attention layer",
    why_not_mergeable="its prefixes are extra attention keys/values, not a change of weights",
))
register(AdapterMethod(
    name="p_tuning", peft_type="P_TUNING", peft_config=p_tuning_config, virtual_tokens=True,
    description="virtual tokens made by a small MLP prompt encoder",
    why_not_mergeable="its prompt encoder makes input vectors, not a change of weights",
))
