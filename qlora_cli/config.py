"""The recipe: a strict, frozen pydantic schema and its one reader, `load_recipe`.

Every field carries a description; the JSON schema (`qlora schema`) and the docs come
from it. Unknown keys, wrong types and out-of-range values are ConfigErrors that name
the key, its YAML line, and the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_cli.adapter_config import AdapterSection, cross_check, method_sections_to_drop, prepare_raw
from qlora_cli.errors import ConfigError

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
        "auto", description="Attention kernel; auto = flash_attention_2 if installed on GPU, else sdpa."
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


class ColumnsSection(_Section):
    text: str = Field("text", description="Column with the raw text (format: text).")
    instruction: str = Field("instruction", description="Instruction column (format: alpaca).")
    input: str = Field("input", description="Optional input/context column (format: alpaca).")
    output: str = Field("output", description="Response column (format: alpaca).")
    messages: str = Field("messages", description="Column with a list of {role, content} messages (format: chat).")
    prompt: str = Field("prompt", description="Prompt column (format: prompt_completion).")
    completion: str = Field("completion", description="Completion column (format: prompt_completion).")


class DataSection(_Section):
    train: Union[str, list[str]] = Field(
        description="Training data: jsonl/json/csv/parquet file(s), a saved HF dataset folder, or a hub dataset id."
    )
    format: Literal["text", "alpaca", "chat", "prompt_completion"] = Field(description="How rows turn into text and which tokens are scored.")
    columns: ColumnsSection = Field(default_factory=ColumnsSection, description="Column names, when they differ from the defaults.")
    split: str = Field("train", description="Split to read from a hub id or saved DatasetDict.")
    eval: Optional[Union[str, list[str]]] = Field(None, description="Evaluation data, same kinds as train. Overrides eval_split.")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of train rows held out for evaluation when no eval data is given.")
    max_seq_len: int = Field(1024, gt=0, description="Rows are cut to this many tokens (see overlong).")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with rows longer than max_seq_len.")
    train_on_prompt: bool = Field(False, description="Score prompt tokens too; by default the loss covers responses only.")
    packing: bool = Field(
        True,
        description="Padding-free batches: rows are concatenated with per-row position ids so no token is padding "
        "and attention never crosses rows. Off: rows are padded, batches grouped by length.",
    )
    max_rows: Optional[int] = Field(None, gt=0, description="Use only the first N training rows (for quick trials).")

    @field_validator("train", "eval")
    @classmethod
    def _names_a_source(cls, value):
        if isinstance(value, list) and not value or isinstance(value, str) and not value.strip():
            raise ValueError("must name at least one file, dataset folder or hub id")
        if isinstance(value, list) and any(not item.strip() for item in value):
            raise ValueError("has an empty entry; give file, dataset folder or hub id names")
        return value


class TrainSection(_Section):
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
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Multi-GPU / multi-node training (used only when launched with several processes).")

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data):
        return prepare_raw(data)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.distributed.strategy == "fsdp" and self.quantization.bits == 8:
            raise ValueError("FSDP cannot shard an 8-bit (LLM.int8) base; use quantization.bits 4 or 16, or distributed.strategy ddp")
        if self.distributed.strategy == "fsdp" and self.quantization.bits == 4 and self.quantization.quant_storage == "uint8":
            raise ValueError("FSDP-QLoRA needs the 4-bit weights stored in the compute dtype: set quantization.quant_storage to auto or bfloat16")
        if self.lora.use_dora and self.quantization.bits == 8:
            raise ValueError("lora.use_dora is not supported with an 8-bit base; use bits 4 or 16")
        cross_check(self)
        return self


# Names people bring from peft, the Trainer, axolotl and torchtune: a near-miss gets pointed home.
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target": "target_modules",
    "lr": "learning_rate", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "grad_accum": "gradient_accumulation_steps",
    "optim": "optimizer", "output_dir": "dir", "sequence_len": "max_seq_len", "max_length": "max_seq_len",
    "seq_len": "max_seq_len", "model_name_or_path": "path", "base_model": "path", "name": "path",
    "load_in_4bit": "bits", "bnb_4bit_quant_type": "quant_type", "scheduler": "lr_scheduler",
    "lr_scheduler_type": "lr_scheduler", "dataset": "train", "path": "path",
}


def valid_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. `lora.target_modules`."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, dotted + "."))
    return keys


def suggest_key(bad_key: str) -> Optional[str]:
    """The closest valid dotted key to `bad_key`, or None."""
    keys = valid_keys()
    section, _, leaf = bad_key.rpartition(".")
    if leaf in _ALIASES:
        aliased = f"{section}.{_ALIASES[leaf]}" if section else _ALIASES[leaf]
        if aliased in keys:
            return aliased
        matches = [k for k in keys if k.endswith("." + _ALIASES[leaf])]
        if matches:
            return matches[0]
    same_section = [k for k in keys if k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(bad_key, same_section, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.6)
    if not close:  # the leaf name alone, in any section ("lr_scheduler" misplaced under data)
        by_leaf = {k.rpartition(".")[2]: k for k in keys}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[leaf_match[0]]] if leaf_match else []
    return close[0] if close else None


def _key_lines(node: yaml.Node, prefix: str = "", lines: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Map dotted keys of a composed YAML document to their 1-based line numbers."""
    lines = {} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[f"{prefix}{index}"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}{index}.", lines)
    return lines


def _parse_yaml(text: str, source: str) -> tuple[dict, dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}{where}: YAML syntax error: {problem}; fix the YAML and try again") from None
    if data is None:
        raise ConfigError(f"{source}: the recipe is empty; start from configs/quickstart.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping of sections (model, lora, data, ...), not a {type(data).__name__}")
    return data, _key_lines(node)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (['train', 'learning_rate'], 0.0001); the value is read as YAML."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw recipe dict with each `a.b=value` override applied."""
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        path, value = parse_override(assignment)
        dotted = ".".join(path)
        node = data
        for part in path[:-1]:
            existing = node.get(part)
            if existing is None:
                node[part] = existing = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"--set {dotted}: `{part}` is not a section")
            node = existing
        node[path[-1]] = value
    return data


def _format_validation_error(exc: ValidationError, lines: dict[str, int], source: str) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-after", "literal[", "list["))]
    # Union branches add their type name to loc; drop those that are not keys of our schema.
    loc = [part for part in loc if part not in {"str", "int", "float", "bool"}]
    dotted = ".".join(loc)
    line = None
    probe = dotted
    while probe and line is None:
        line = lines.get(probe)
        probe = probe.rpartition(".")[0]
    where = f"{source} line {line}" if line else source
    if error["type"] == "extra_forbidden":
        hint = suggest_key(dotted)
        tip = f"; did you mean `{hint}`?" if hint else "; see `qlora schema` for the valid keys"
        return f"{where}: unknown key `{dotted}`{tip}"
    if error["type"] == "missing":
        return f"{where}: missing required key `{dotted}`; add it to the recipe (see configs/quickstart.yaml)"
    message = error["msg"]
    if error["type"] == "value_error" and not dotted:  # a cross-check of the whole recipe says it all
        return f"{where}: {message.removeprefix('Value error, ')}"
    if error["type"] == "literal_error":
        message = message.replace("Input should be", "must be one of:")
    value = error.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, (dict, list)) else ""
    return f"{where}: `{dotted or 'recipe'}` {message[0].lower() + message[1:]}{shown}"


def validate_recipe(data: dict, lines: Optional[dict[str, int]] = None, source: str = "recipe") -> Recipe:
    """Validate a raw dict into a Recipe, raising a one-line ConfigError."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, lines or {}, source)) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read, override and validate a YAML recipe. The only way recipes enter the program."""
    path = Path(path)
    run_dir = None
    if path.is_dir():
        candidate = path / "recipe.yaml"
        if not candidate.is_file():
            raise ConfigError(f"{path} is a directory without a recipe.yaml; pass a recipe file or a finished run directory")
        run_dir, path = path, candidate
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; check the path (examples are in configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    data, lines = _parse_yaml(text, str(path))
    from qlora_cli.checkpointing import is_run_dir  # here, not at the top: checkpointing imports this module

    if run_dir is not None and is_run_dir(run_dir) and isinstance(data, dict) and isinstance(data.get("output"), dict):
        # A run directory is its own output.dir, also after it was moved or copied elsewhere.
        data["output"] = {**data["output"], "dir": str(run_dir)}
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, lines, str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (every default spelled out) as YAML text, loadable by load_recipe."""
    top, unused = method_sections_to_drop(recipe)
    data = recipe.model_dump(mode="json", exclude={**{name: True for name in top}, "adapter": unused})
    return yaml.safe_dump(data, sort_keys=False)


def recipe_schema() -> dict:
    """JSON schema of the recipe, generated from the field descriptions."""
    return Recipe.model_json_schema()
