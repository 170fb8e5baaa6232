"""The training knobs the memory estimate depends on, read from a validated Recipe.

A Plan is the Recipe minus everything that does not change memory (data paths, learning rate,
logging), with `auto` settings resolved the way they resolve on a CUDA GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

from qlora_cli.estimate import objectives
from qlora_cli.recipe.adapter_section import PROMPT_METHODS
from qlora_cli.recipe.schema import Recipe

ATTENTION_AUTO = "sdpa"  # what `auto` gives on a GPU without flash-attn installed (model/loading.attn_implementation)


@dataclass(frozen=True)
class Plan:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    dtype_bytes: int = 2  # unquantized weights and activations: bf16/fp16 = 2, float32 = 4
    lora_r: int = 16
    target_modules: Union[str, tuple[str, ...]] = "all-linear"
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    seq_len: int = 2048
    micro_batch: int = 1
    packing: bool = True
    gradient_checkpointing: bool = True
    optimizer: str = "paged_adamw_8bit"
    attention: str = ATTENTION_AUTO
    fused_loss: bool = True  # train.loss_kernel chunked / liger: no full-vocabulary fp32 logits
    processes: int = 1  # GPUs (processes) of the job
    strategy: str = "ddp"  # with processes > 1: ddp (replicated), fsdp (sharded) or deepspeed (shown as ddp)
    method: str = "lora"  # adapter.method
    layers: Optional[tuple[int, ...]] = None  # adapter.layers_to_transform
    unfreeze: tuple[str, ...] = ()
    ia3_targets: Optional[tuple[str, ...]] = None
    ia3_feedforward: Optional[tuple[str, ...]] = None
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    prefix_projection: bool = False
    bottleneck_size: int = 64
    bottleneck_placement: tuple[str, ...] = ("attention", "mlp")
    # Another stack's habit, for comparing published runs (never set from a recipe): peft's
    # prepare_model_for_kbit_training (TRL's and the HF examples' k-bit path) leaves every
    # unquantized base parameter (embeddings, lm_head, norms) in fp32; `qlora train` keeps them 16-bit.
    upcast_frozen: bool = False
    # transformers < 5's ForCausalLMLoss upcast the logits and copied them shifted (.contiguous()):
    # bf16 logits + fp32 copy + shifted fp32 copy + fp32 log_softmax alive at once, 14 B per logit
    # against our 12 (transformers 5 shifts the labels instead). 0 = our stack.
    loss_bytes_per_logit: int = 0
    # bitsandbytes before the release installed here kept each 4-bit matmul's input for backward
    # (MatMul4Bit: ctx.tensors = (A, B) in 0.41; the installed 0.50 keeps (None, B)), as 8-bit still does.
    bnb_keeps_input: bool = False
    objective: str = "sft"  # train.objective; estimate/objectives.py sets the fields below
    reference_forward: bool = False  # a no-grad reference forward beside the policy's (dpo, kto, grpo with beta)
    trl_head: bool = False  # TRL's chunked log-prob head scores the tokens instead of our loss kernel (dpo, grpo)

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch at worst: every row filled to seq_len (packing lays rows end to end)."""
        return self.micro_batch * self.seq_len

    def with_changes(self, **changes) -> "Plan":
        return replace(self, **changes)


def _dtype_bytes(recipe: Recipe) -> int:
    requested = recipe.quantization.compute_dtype
    if requested == "auto" or recipe.quantization.bits == 16:
        requested = recipe.model.dtype
    return 4 if requested == "float32" else 2  # auto: bf16 (or fp16 on pre-Ampere cards) on a GPU


def _method_fields(recipe: Recipe) -> dict:
    adapter = recipe.adapter
    method = adapter.method
    fields = {"method": method, "unfreeze": tuple(adapter.unfreeze),
              "layers": tuple(adapter.layers_to_transform) if adapter.layers_to_transform else None}
    if method == "ia3":
        ia3 = adapter.ia3
        fields["ia3_targets"] = tuple(ia3.target_modules) if ia3.target_modules else None
        fields["ia3_feedforward"] = tuple(ia3.feedforward_modules) if ia3.feedforward_modules is not None else None
    elif method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        section = getattr(adapter, method)
        fields["num_virtual_tokens"] = section.num_virtual_tokens
        fields["encoder_hidden_size"] = getattr(section, "encoder_hidden_size", 128)
        fields["prefix_projection"] = getattr(section, "projection", False)
    elif method == "bottleneck":
        fields["bottleneck_size"] = adapter.bottleneck.size
        fields["bottleneck_placement"] = tuple(adapter.bottleneck.placement)
    return fields


def _fused_loss(recipe: Recipe) -> bool:
    """Whether `train.loss_kernel` gets a fused loss (kernels.unsupported_reason, by the recipe alone)."""
    lora = recipe.lora
    targets = () if isinstance(lora.target_modules, str) else lora.target_modules
    if recipe.adapter.method in PROMPT_METHODS:
        return False  # prompt-learning adapters change the forward: the standard loss
    if any("lm_head" in pattern for pattern in recipe.adapter.unfreeze):
        return False  # a trained (wrapped) lm_head: the standard loss
    return recipe.train.loss_kernel != "standard" and "lm_head" not in (lora.modules_to_save or ()) and "lm_head" not in targets


def plan_from_recipe(recipe: Recipe, processes: int = 1) -> Plan:
    lora, quant, train = recipe.lora, recipe.quantization, recipe.train
    attention = recipe.model.attn_implementation
    strategy = recipe.distributed.strategy
    return objectives.adjust_plan(recipe, Plan(
        bits=quant.bits,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        dtype_bytes=_dtype_bytes(recipe),
        lora_r=lora.r,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules),
        lora_dropout=lora.dropout,
        lora_bias=lora.bias,
        use_dora=lora.use_dora,
        modules_to_save=tuple(lora.modules_to_save or ()),
        seq_len=recipe.data.max_seq_len,
        micro_batch=train.micro_batch_size,
        packing=recipe.data.packing,
        gradient_checkpointing=train.gradient_checkpointing,
        optimizer=train.optimizer,
        attention=ATTENTION_AUTO if attention == "auto" else attention,
        fused_loss=_fused_loss(recipe),
        processes=processes,
        strategy="ddp" if strategy == "auto" else strategy,
        **_method_fields(recipe),
    ))
