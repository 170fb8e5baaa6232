"""The recipe's schema: strict, frozen pydantic sections whose field descriptions are the
documentation (`qlora schema`, docs/recipe.schema.json and `qlora init`'s comments come from them).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qlora_cli.recipe import objective_section
from qlora_cli.recipe.adapter_section import AdapterSection, cross_check, prepare_raw
from qlora_cli.recipe.objective_section import GrpoSection, Objective, PreferenceSection

DType = Literal["auto", "bfloat16", "float16", "float32"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    path: str = Field(description="Local model folder or Hugging Face hub id of the base model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: DType = Field(
        "auto",
        description="Dtype of the weights that stay unquantized and of compute; auto = bf16 where "
        "the device multiplies bf16 fast, else fp16 on GPU / fp32 on CPU.",
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model (off unless you trust it).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = flash_attention_2 if installed on GPU, else sdpa, else eager (what the family supports)."
    )
    chat_template: Optional[str] = Field(
        None, description="A Jinja chat template file replacing the tokenizer's (e.g. one that renders tools); saved with the adapter."
    )
    init_adapter: Optional[str] = Field(
        None,
        description="Continue a trained LoRA adapter (a run directory) instead of a fresh one, e.g. DPO after SFT; "
        "its own settings replace the lora section, and dpo / kto / grpo use base + that adapter, frozen, as the reference.",
    )


class QuantizationSection(_Section):
    bits: Literal[4, 8, 16] = Field(4, description="4 = QLoRA (bitsandbytes 4-bit base), 8 = LLM.int8 base, 16 = plain LoRA on a 16-bit base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NormalFloat4 (QLoRA's) or FP4.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.37 bit/param).")
    compute_dtype: DType = Field("auto", description="Dtype the 4-bit weights are dequantized to for matmuls; auto follows model.dtype.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Storage dtype of packed 4-bit weights; auto = uint8, or the compute dtype under FSDP (which FSDP-QLoRA needs)."
    )


class LoraSection(_Section):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or all-linear (every linear layer but the output head)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: Optional[list[str]] = Field(None, description="Extra modules trained in full and saved with the adapter (e.g. [lm_head]).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default",
        description="Initialisation (peft's init_lora_weights): default = Kaiming-uniform A, zero B; gaussian; pissa / olora "
        "(principal / orthonormal directions, saved converted to plain LoRA); loftq (4-bit nf4 base only).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be all-linear")
        return value

    def check(self, recipe) -> None:
        """Initialisations the rest of the recipe refuses (ValueError, one line)."""
        quant = recipe.quantization
        if self.init in ("pissa", "olora") and self.use_dora:
            raise ValueError(f"lora.init {self.init} cannot be combined with lora.use_dora; pick one")
        if self.init == "pissa" and quant.bits != 16:
            raise ValueError("lora.init pissa needs a 16-bit base (peft takes the SVD of unquantized weights); set quantization.bits: 16")
        if self.init == "loftq" and (quant.bits != 4 or quant.quant_type != "nf4"):
            raise ValueError(
                "lora.init loftq fits the adapter to the NF4 rounding error of a 4-bit base (peft's replace_lora_weights_loftq): "
                "set quantization.bits: 4 and quant_type: nf4"
            )
        if self.init == "loftq" and self.use_dora:
            raise ValueError("lora.init loftq cannot be combined with lora.use_dora; pick one")
        if recipe.distributed.strategy in ("fsdp", "deepspeed") and self.init in ("pissa", "olora"):
            raise ValueError(f"lora.init {self.init} cannot be saved from {recipe.distributed.strategy} shards; use distributed.strategy ddp or lora.init gaussian")


class ColumnsSection(_Section):
    text: str = Field("text", description="Column with the raw text (format: text).")
    instruction: str = Field("instruction", description="Instruction column (format: alpaca).")
    input: str = Field("input", description="Optional input/context column (format: alpaca).")
    output: str = Field("output", description="Response column (format: alpaca).")
    messages: str = Field("messages", description="Column with a list of {role, content} messages (format: chat).")
    prompt: str = Field("prompt", description="Prompt column (format: prompt_completion).")
    completion: str = Field("completion", description="Completion column (format: prompt_completion, unpaired_preference).")
    chosen: str = Field("chosen", description="Preferred response: text or an assistant message (format: preference).")
    rejected: str = Field("rejected", description="Dispreferred response: text or an assistant message (format: preference).")
    label: str = Field("label", description="true = desirable completion, false = undesirable (format: unpaired_preference).")
    reference: str = Field("reference", description="Optional reference answer that rewards and evaluation read (format: prompt_only).")
    tools: str = Field("tools", description="Optional column with the row's tool (function) schemas, passed to the chat template (format: chat).")
    system: str = Field("system", description="Optional column with a per-row system prompt, put first when the messages have none (format: chat).")


Format = Literal["text", "alpaca", "chat", "prompt_completion", "preference", "unpaired_preference", "prompt_only"]


class SourceSection(_Section):
    path: str = Field(description="A jsonl/json/csv/parquet file, a saved HF dataset folder, or a hub dataset id.")
    format: Optional[Format] = Field(None, description="This source's format; default: data.format.")
    columns: Optional[ColumnsSection] = Field(None, description="This source's column names; default: data.columns.")
    split: Optional[str] = Field(None, description="Split of a hub id or saved DatasetDict; default: data.split.")
    subset: Optional[str] = Field(None, description="Hub dataset subset (configuration) name.")
    weight: Optional[float] = Field(None, gt=0, description="Share of the mixed training rows drawn from this source, relative to the other weights (rows repeat when it asks for more than the source has).")
    take: Optional[int] = Field(None, gt=0, description="Use exactly the first N rows of this source (instead of a weight).")

    @field_validator("path")
    @classmethod
    def _names_a_path(cls, value):
        if not value.strip():
            raise ValueError("must name a file, dataset folder or hub id")
        return value

    @model_validator(mode="after")
    def _weight_or_take(self):
        if self.weight is not None and self.take is not None:
            raise ValueError("give a source weight or take, not both")
        return self


class DataSection(_Section):
    train: Union[str, list[Union[str, SourceSection]]] = Field(
        description="Training data: jsonl/json/csv/parquet file(s), a saved HF dataset folder, or a hub dataset id; or a list of "
        "sources ({path, format, columns, split, subset, weight | take}) mixed by weight."
    )
    format: Format = Field(
        description="How rows turn into text and which tokens are scored; preference (prompt, chosen, rejected) for dpo / orpo, "
        "unpaired_preference (prompt, completion, label) for kto, prompt_only (prompt, optional reference) for grpo."
    )
    columns: ColumnsSection = Field(default_factory=ColumnsSection, description="Column names, when they differ from the defaults.")
    split: str = Field("train", description="Split to read from a hub id or saved DatasetDict.")
    eval: Optional[Union[str, list[str]]] = Field(None, description="Evaluation data, same kinds as train. Overrides eval_split.")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of train rows held out for evaluation when no eval data is given.")
    max_seq_len: int = Field(1024, gt=0, description="Rows are cut to this many tokens (see overlong).")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with rows longer than max_seq_len.")
    train_on_prompt: bool = Field(False, description="Score prompt tokens too; by default the loss covers responses only.")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Chat: train every assistant turn of a conversation, or only the last (each with its end-of-turn token)."
    )
    packing: bool = Field(
        True,
        description="Padding-free batches: rows are concatenated with per-row position ids so no token is padding "
        "and attention never crosses rows. Off: rows are padded, batches grouped by length.",
    )
    max_rows: Optional[int] = Field(None, gt=0, description="Use only the first N training rows (for quick trials).")
    streaming: bool = Field(
        False,
        description="Read data.train as training consumes it instead of loading it into memory (files bigger than memory, "
        "hub datasets); needs train.max_steps. Weighted sources are interleaved by weight; validate and the start-up "
        "statistics read the first 1,000 rows; eval rows come from data.eval (eval_split cannot hold rows out of a stream).",
    )

    @field_validator("train", "eval")
    @classmethod
    def _names_a_source(cls, value):
        if isinstance(value, list) and not value or isinstance(value, str) and not value.strip():
            raise ValueError("must name at least one file, dataset folder or hub id")
        if isinstance(value, list) and any(isinstance(item, str) and not item.strip() for item in value):
            raise ValueError("has an empty entry; give file, dataset folder or hub id names")
        return value

    @field_validator("train")
    @classmethod
    def _weights_for_all(cls, value):
        if isinstance(value, list):
            weighted = [isinstance(item, SourceSection) and item.weight is not None for item in value]
            taken = [isinstance(item, SourceSection) and item.take is not None for item in value]
            if any(weighted) and not all(w or t for w, t in zip(weighted, taken)):
                raise ValueError("when one source has a weight, every source needs a weight (or a take)")
        return value

    @model_validator(mode="after")
    def _streamable(self):
        if not self.streaming:
            return self
        if self.eval_split:
            raise ValueError("data.eval_split cannot hold rows out of a stream (data.streaming: true); give the held-out rows in data.eval")
        sources = [item for item in self.train if isinstance(item, SourceSection)] if isinstance(self.train, list) else []
        if any(s.weight is not None for s in sources) and any(s.take is not None for s in sources):
            raise ValueError("with data.streaming a weighted mix interleaves every source by its weight; give each source a weight, not a take")
        return self


class TrainSection(_Section):
    objective: Objective = Field(
        "sft", description="What the adapter learns from: sft (supervised), dpo, kto, orpo (preferences), grpo (rewards on its own generations)."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up (used when warmup_steps is not set).")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per forward pass (per device).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (non-reentrant): less memory, ~30% more compute.")
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"] = Field(
        "paged_adamw_8bit", description="Optimizer; paged ones spill state to CPU on memory spikes (CUDA only; CPU falls back to the unpaged one)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    logging_steps: int = Field(10, gt=0, description="Log loss / lr / throughput every N steps.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N steps (needs eval data); default: at the end only.")
    save_steps: int = Field(100, gt=0, description="Write a checkpoint every N steps.")
    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(["none"], description="Experiment trackers fed by the Trainer.")
    compile: bool = Field(
        False,
        description="torch.compile the model (GPU, long runs): compilation costs minutes up front; off by default (on this project's 2-core CPU one step did not finish compiling in 20 min).",
    )
    loss_kernel: Literal["auto", "chunked", "liger", "standard"] = Field(
        "auto",
        description="Cross-entropy over the vocabulary: chunked (never builds fp32 logits for all tokens), liger (fused, CUDA), standard (full logits); auto picks the best the model allows.",
    )

    @model_validator(mode="after")
    def _none_alone(self):
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError("report_to: 'none' cannot be combined with other trackers")
        return self


class OutputSection(_Section):
    dir: str = Field(description="Run directory: adapter, tokenizer, resolved recipe, metrics and checkpoints go here.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints to keep (oldest are deleted).")


class DistributedSection(_Section):
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto",
        description="Under torchrun / accelerate launch / --nproc: ddp (each rank holds the whole model), fsdp (sharded), deepspeed (needs deepspeed_config); auto = ddp.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend; auto = nccl on GPUs, gloo on CPUs.")
    deepspeed_config: Optional[str] = Field(None, description="DeepSpeed JSON config (ZeRO-2/3) for strategy deepspeed.")
    fsdp_cpu_offload: bool = Field(False, description="FSDP: keep sharded parameters in CPU memory between uses (slower, less GPU memory).")

    @model_validator(mode="after")
    def _deepspeed_needs_config(self):
        if self.strategy == "deepspeed" and not self.deepspeed_config:
            raise ValueError("strategy deepspeed needs deepspeed_config: the path of a DeepSpeed JSON config")
        if self.deepspeed_config and self.strategy != "deepspeed":
            raise ValueError("deepspeed_config is only used with strategy: deepspeed")
        if self.fsdp_cpu_offload and self.strategy != "fsdp":
            raise ValueError("fsdp_cpu_offload is only used with strategy: fsdp")
        return self


class Recipe(_Section):
    model: ModelSection = Field(description="The base model.")
    quantization: QuantizationSection = Field(default_factory=QuantizationSection, description="How the frozen base is stored.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="The PEFT method and selective training.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA adapter (adapter.method: lora).")
    data: DataSection = Field(description="Training and evaluation data.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    output: OutputSection = Field(description="Where results go.")
    preference: PreferenceSection = Field(default_factory=PreferenceSection, description="Preference objectives (train.objective dpo, kto, orpo).")
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="GRPO: generations, rewards and KL (train.objective grpo).")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Multi-GPU / multi-node training (used only when launched with several processes).")

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data):
        return objective_section.prepare_raw(prepare_raw(data))

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.distributed.strategy == "fsdp" and self.quantization.bits == 8:
            raise ValueError("FSDP cannot shard an 8-bit (LLM.int8) base; use quantization.bits 4 or 16, or distributed.strategy ddp")
        if self.distributed.strategy == "fsdp" and self.quantization.bits == 4 and self.quantization.quant_storage == "uint8":
            raise ValueError("FSDP-QLoRA needs the 4-bit weights stored in the compute dtype: set quantization.quant_storage to auto or bfloat16")
        if self.lora.use_dora and self.quantization.bits == 8:
            raise ValueError("lora.use_dora is not supported with an 8-bit base; use bits 4 or 16")
        if self.data.streaming and not self.train.max_steps:
            raise ValueError("data.streaming needs train.max_steps: a stream has no length to count epochs by")
        if self.data.streaming and self.train.objective != "sft":
            raise ValueError(f"data.streaming trains objective sft only; set data.streaming: false for {self.train.objective}")
        cross_check(self)
        objective_section.check(self)
        return self


def recipe_schema() -> dict:
    """JSON schema of the recipe, generated from the field descriptions."""
    return Recipe.model_json_schema()
