"""The recipe's `adapter:` section: which PEFT method trains (LoRA keeps its own `lora:`
section), each method's settings, and selective training (layers, unfrozen modules,
layer-wise learning rates). Cross-checks against the rest of the recipe live here too.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

Method = Literal["lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck"]
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
METHOD_SECTIONS = ("ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, recipe) -> None:
        """Combinations with the rest of the recipe that this method's settings refuse (ValueError, one line)."""


class _PromptSection(_Section):
    """A prompt-learning method: virtual tokens added once per sequence."""

    def check(self, recipe) -> None:
        method = recipe.adapter.method
        if recipe.data.packing:
            raise ValueError(f"data.packing cannot be used with {method}: its virtual tokens are added once per sequence, not per packed row; set data.packing: false")
        if recipe.adapter.layers_to_transform is not None:
            raise ValueError(f"adapter.layers_to_transform applies to lora, ia3 and bottleneck, not {method}")


class IA3Section(_Section):
    target_modules: Optional[list[str]] = Field(
        None, description="Modules whose activations IA3 rescales; default: peft's choice for the architecture (Llama: k_proj, v_proj, down_proj)."
    )
    feedforward_modules: Optional[list[str]] = Field(
        None, description="Which of target_modules are feed-forward (their input is scaled, not their output); default: peft's (Llama: down_proj)."
    )


class PromptTuningSection(_PromptSection):
    num_virtual_tokens: int = Field(20, gt=0, le=4096, description="Trainable soft-prompt vectors prepended to every sequence.")
    init_text: Optional[str] = Field(None, description="Initialise the soft prompt from this text's token embeddings; default: random.")


class PrefixTuningSection(_PromptSection):
    num_virtual_tokens: int = Field(20, gt=0, le=4096, description="Trainable key/value prefix positions added to every attention layer.")
    projection: bool = Field(False, description="Reparameterise the prefix through a two-layer MLP (more parameters, often more stable).")
    encoder_hidden_size: int = Field(512, gt=0, description="Hidden width of the projection MLP (used with projection: true).")

    def check(self, recipe) -> None:
        super().check(recipe)
        if recipe.train.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing cannot be used with prefix_tuning (peft refuses it); set it to false")


class PTuningSection(_PromptSection):
    num_virtual_tokens: int = Field(20, gt=0, le=4096, description="Virtual tokens produced by the prompt encoder and prepended to every sequence.")
    encoder_hidden_size: int = Field(128, gt=0, description="Hidden width of the MLP prompt encoder.")


class BottleneckSection(_Section):
    size: int = Field(64, gt=0, description="Bottleneck width: down-projection hidden -> size, non-linearity, up-projection size -> hidden.")
    placement: list[Literal["attention", "mlp"]] = Field(
        ["attention", "mlp"], description="Where adapters go: after the attention block and/or after the MLP of each adapted layer."
    )
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="Non-linearity between the two projections.")

    @field_validator("placement")
    @classmethod
    def _placement(cls, value):
        if not value or len(set(value)) != len(value):
            raise ValueError("name attention and/or mlp, each once")
        return value

    def check(self, recipe) -> None:
        if recipe.distributed.strategy in ("fsdp", "deepspeed"):
            raise ValueError(f"adapter.method bottleneck cannot be sharded by {recipe.distributed.strategy}; use distributed.strategy ddp")


class AdapterSection(_Section):
    method: Method = Field(
        "lora",
        description="PEFT method: lora (settings in `lora:`), ia3, prompt_tuning, prefix_tuning, p_tuning, or bottleneck (our "
        "down/up-projection residual adapter).",
    )
    ia3: IA3Section = Field(default_factory=IA3Section, description="IA3 settings (method: ia3).")
    prompt_tuning: PromptTuningSection = Field(default_factory=PromptTuningSection, description="Prompt-tuning settings (method: prompt_tuning).")
    prefix_tuning: PrefixTuningSection = Field(default_factory=PrefixTuningSection, description="Prefix-tuning settings (method: prefix_tuning).")
    p_tuning: PTuningSection = Field(default_factory=PTuningSection, description="P-tuning settings (method: p_tuning).")
    bottleneck: BottleneckSection = Field(default_factory=BottleneckSection, description="Bottleneck-adapter settings (method: bottleneck).")
    layers_to_transform: Optional[list[int]] = Field(
        None, description="lora / ia3 / bottleneck: adapt only these decoder layers (0 = nearest the input); default: all."
    )
    unfreeze: list[str] = Field(
        [], description="Sparse fine-tuning: module-name patterns (fnmatch, e.g. '*.input_layernorm', 'model.norm') trained in full "
        "and saved with the adapter. Quantized (4/8-bit) layers cannot be unfrozen.",
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1,
        description="Layer-wise learning rates: decoder layer i of L trains at learning_rate x decay^(L-1-i) (lower near the input), "
        "embeddings and prompts at decay^L, the rest at learning_rate; 1 = one rate for all.",
    )

    @field_validator("layers_to_transform")
    @classmethod
    def _layers(cls, value):
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("list distinct layer indices >= 0 (or leave it out for all layers)")
        return value


def prepare_raw(data: dict) -> dict:
    """Before validation: `lora: null` (e.g. --set lora=null) removes the section; prompt-based methods
    get packing off, prefix tuning gradient checkpointing off, unless the recipe asks for them (refused later)."""
    if isinstance(data, dict):
        if "lora" in data and data["lora"] is None:
            data = {k: v for k, v in data.items() if k != "lora"}
        adapter = data.get("adapter")
        method = adapter.get("method") if isinstance(adapter, dict) else None
        section = data.get("data")
        if method in PROMPT_METHODS and isinstance(section, dict) and "packing" not in section:
            data = {**data, "data": {**section, "packing": False}}
        train = data.get("train") if isinstance(data.get("train"), dict) else {}
        if method == "prefix_tuning" and "gradient_checkpointing" not in train:
            data = {**data, "train": {**train, "gradient_checkpointing": False}}
    return data


def cross_check(recipe) -> None:
    """Combinations the schema alone cannot refuse; raises ValueError with a one-line message."""
    adapter, method = recipe.adapter, recipe.adapter.method
    if method != "lora" and "lora" in recipe.model_fields_set:
        raise ValueError(f"the recipe gives `lora` settings but adapter.method is {method}; remove the lora section (--set lora=null) or use method lora")
    for name in METHOD_SECTIONS:
        if name != method and name in adapter.model_fields_set:
            raise ValueError(f"the recipe gives `adapter.{name}` settings but adapter.method is {method}; remove them or set adapter.method: {name}")
    section = recipe.lora if method == "lora" else getattr(adapter, method)  # LoRA keeps its own top-level section
    section.check(recipe)


def method_sections_to_drop(recipe) -> tuple[set, set]:
    """(top-level sections, adapter sub-sections) that the method does not use, left out of the resolved recipe."""
    method = recipe.adapter.method
    top = set() if method == "lora" else {"lora"}
    return top, {name for name in METHOD_SECTIONS if name != method}


def describe(recipe) -> str:
    """The adapter in one line, as `qlora validate` shows it."""
    adapter, method = recipe.adapter, recipe.adapter.method
    if method == "lora":
        lora = recipe.lora
        extras = [name for name in ("use_dora", "use_rslora") if getattr(lora, name)] + ([f"init={lora.init}"] if lora.init != "default" else [])
        text = f"lora r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} targets={lora.target_modules}" + "".join(f" {e}" for e in extras)
    else:
        settings = getattr(adapter, method).model_dump(exclude_none=True)
        text = f"{method} " + " ".join(f"{key}={value}" for key, value in settings.items())
    if adapter.layers_to_transform is not None:
        text += f" layers={adapter.layers_to_transform}"
    if adapter.unfreeze:
        text += f" unfreeze={adapter.unfreeze}"
    if adapter.layer_lr_decay != 1.0:
        text += f" layer_lr_decay={adapter.layer_lr_decay:g}"
    return text
