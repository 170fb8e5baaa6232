"""Model families: what a base's config.json says about it before any weight loads. A model
transformers cannot load as a causal LM is one line here; `attention: auto` picks a kernel the
family supports (Gemma 2 has no sdpa: eager); on mixture-of-experts models `all-linear` is ours
to decide (see `moe_targets`), and the decision is printed at start-up.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Optional

import torch

from qlora_cli.errors import ModelError, library_message
from qlora_cli.model.tested import TESTED, untested_note
from qlora_cli.recipe.schema import ModelSection


@dataclass(frozen=True)
class Family:
    model_type: str
    causal_lm: str  # transformers class name ("Gemma2ForCausalLM"), "" for remote code
    supports_sdpa: bool = True
    supports_flash: bool = True
    experts: int = 0  # routed experts per MoE layer (0: a dense model)

    @property
    def tested(self) -> bool:
        return self.model_type in TESTED

    @property
    def note(self) -> Optional[str]:
        """The start-up note for a family outside the tested ones (others that transformers loads as
        causal LMs are attempted); None for a tested family."""
        return untested_note(self.model_type, self.causal_lm or "its own code (trust_remote_code)")


def read_config(model: ModelSection):
    """The base's transformers config (config.json only: a small download for a hub id)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model.path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        message = library_message(exc)
        if "model_type" in message or "does not recognize this architecture" in message:
            raise ModelError(
                f"model {model.path}: its config.json names a model type this transformers does not know; "
                "upgrade transformers, or set model.trust_remote_code: true if the model ships its own code"
            ) from None
        raise ModelError(f"cannot read the config of {model.path}: {message}") from None


def family(model: ModelSection, config=None) -> Family:
    """What qlora needs to know about the base's family; a ModelError (one line) when transformers
    cannot load it as a causal language model."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = config if config is not None else read_config(model)
    model_type = str(getattr(config, "model_type", ""))
    experts = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)
    if model.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return Family(model_type, "", experts=experts)
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if class_name is None:
        raise ModelError(
            f"model {model.path} is a {model_type!r} model, which transformers cannot load as a causal language model; "
            "qlora fine-tunes decoder LMs (Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral ...)"
        )
    cls = getattr(transformers, class_name, None)
    return Family(
        model_type, class_name,
        supports_sdpa=bool(getattr(cls, "_supports_sdpa", True)),
        supports_flash=bool(getattr(cls, "_supports_flash_attn", True)),
        experts=experts,
    )


def attention(model: ModelSection, found: Optional[Family] = None) -> str:
    """The attention kernel to load with: the recipe's, or for `auto` the best one the family has
    (flash_attention_2 on a GPU with flash-attn installed, else sdpa, else eager)."""
    if model.attn_implementation != "auto":
        return model.attn_implementation
    found = found or family(model)
    if found.supports_flash and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa" if found.supports_sdpa else "eager"


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}


def _linear_leaves(model) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        if _is_linear(module):
            names.add(name.rpartition(".")[2])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {name.rpartition(".")[2] for name, module in model.named_modules() if module is output}
    return sorted(names - heads)


def moe_targets(model) -> Optional[tuple[list[str], str]]:
    """On a mixture-of-experts base, what `all-linear` adapts, and the sentence printed at start-up;
    None on a dense model.

    Our decision: the linear layers (attention, and shared experts where the family has them),
    never the fused routed experts or the router. transformers 5 stores the experts as 3-D
    parameters, which bitsandbytes leaves in 16-bit and which peft adapts only through
    `target_parameters` (its ParamWrapper refuses lora_dropout, and merging it fails), and a LoRA
    on the router changes which experts each token reaches. Listing module names in
    lora.target_modules chooses otherwise.
    """
    config = getattr(model, "config", None)
    experts = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)
    if not experts:
        return None
    leaves = _linear_leaves(model)
    note = (
        f"mixture of experts: all-linear adapts the linear layers ({', '.join(leaves)}); the {experts} routed experts and the "
        "router of each layer stay frozen (name modules in lora.target_modules to choose otherwise)"
    )
    return leaves, note


def check_moe_targets(model, targets: list[str]) -> None:
    """On an MoE base, a listed module that is not a linear layer (the fused experts, the router)
    is one line: peft would wrap it in a ParamWrapper (no lora_dropout, no merge) or refuse it
    with its module's repr."""
    if moe_targets(model) is None:
        return
    for key in targets:
        for name, module in model.named_modules():
            if (name == key or name.endswith("." + key)) and not _is_linear(module):
                raise ModelError(
                    f"lora.target_modules: `{key}` is a {type(module).__name__} on this mixture-of-experts model, not a linear layer; "
                    f"qlora adapts linear layers only (routed experts and routers stay frozen): choose from {', '.join(_linear_leaves(model))}"
                )


def language_model_targets(model, targets) -> Optional[tuple[str, str]]:
    """On a multimodal checkpoint loaded for text (Gemma 3 4B and up: Gemma3ForConditionalGeneration,
    model_type gemma3), lora.target_modules restricted to its language model (a peft regex) and the
    sentence printed at start-up; None on a text-only model. Rows are text, so the vision tower and
    the projector stay frozen: all-linear (or a listed name such as q_proj, which the vision tower
    has too) means the language model's layers only."""
    inner = getattr(model, "model", None)
    language = getattr(inner, "language_model", None)
    if language is None or getattr(inner, "vision_tower", None) is None:
        return None
    leaves = _linear_leaves(language) if targets == "all-linear" else list(targets)
    pattern = rf"(.*\.)?language_model\..*\.({'|'.join(map(re.escape, leaves))})"
    note = (f"multimodal model: the adapter trains the language model ({', '.join(leaves)}); the vision tower and the "
            "projector stay frozen (rows are text only)")
    return pattern, note
