"""The base model of a run: dtypes, the bitsandbytes config, loading the base and its tokenizer,
and preparing a quantized base for adapter training. Builders return configured library objects;
nothing here subclasses transformers or peft.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from qlora_cli.errors import ConfigError, ModelError, library_message
from qlora_cli.model import families
from qlora_cli.recipe.paths import is_local_path
from qlora_cli.recipe.schema import ModelSection, QuantizationSection, Recipe

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 matmuls (AVX512-BF16 / AMX).

    Without them a bf16 matmul is emulated and runs ~10x slower than fp32 (measured on an
    AVX2-only EPYC: 11 vs 136 GFLOP/s), so "auto" must not pick bf16 there.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(requested: str) -> torch.dtype:
    """Turn a recipe dtype name into a torch dtype; `auto` picks the fastest safe one here."""
    if requested != "auto":
        return _DTYPES[requested]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype of activations and of the unquantized weights for this recipe."""
    requested = recipe.quantization.compute_dtype
    if requested == "auto" or recipe.quantization.bits == 16:
        requested = recipe.model.dtype
    return resolve_dtype(requested)


def quantization_label(quant: QuantizationSection) -> str:
    """How runs and reports name a base: "4-bit nf4", "8-bit", "16-bit"."""
    return f"{quant.bits}-bit" + (f" {quant.quant_type}" if quant.bits == 4 else "")


def build_quant_config(quant: QuantizationSection, dtype: torch.dtype, sharded: bool = False):
    """A transformers BitsAndBytesConfig for 4/8-bit bases, None for a 16-bit base.

    `sharded` (FSDP): the packed 4-bit weights are stored in the compute dtype, so FSDP can
    flatten them with the other parameters into uniform shards.
    """
    if quant.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant.quant_storage == "auto":
        storage = dtype if sharded else torch.uint8
    else:
        storage = getattr(torch, quant.quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )


def attn_implementation(model: ModelSection) -> str:
    """The attention kernel the base loads with (see families.attention)."""
    return families.attention(model)


def check_model_path(path: str) -> None:
    """Fail fast, before any download, on a model path that cannot work."""
    if is_local_path(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            hint = " (run `qlora demo-model` to create the demo model)" if "SmolLM2" in path else ""
            raise ConfigError(f"model.path {path} does not exist{hint}; give a model folder or a hub id like org/name")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path {path} has no config.json; point it at a Hugging Face model folder")
        for weights in sorted(folder.glob("*.safetensors")):
            problem = safetensors_problem(weights)
            if problem:
                raise ModelError(f"model.path {path}: {weights.name} {problem}; download or copy the model again")


def safetensors_problem(file: Path) -> Optional[str]:
    """Why a safetensors file cannot be whole (a download or copy cut short), from its header and
    size alone, or None. Read before any load: safetensors itself fails deep in from_pretrained."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or 8 + header_length > size:
                return f"is truncated ({size:,} bytes, shorter than its own header)"
            header = json.loads(handle.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"is not a readable safetensors file ({library_message(exc)})"
    if 8 + header_length + end > size:
        return f"is truncated ({size:,} bytes of the {8 + header_length + end:,} its header describes)"
    return None


def load_tokenizer(model: ModelSection):
    """The base model's tokenizer, with a pad token (its eos when it has none)."""
    from transformers import AutoTokenizer

    check_model_path(model.path)
    families.family(model)  # a model we cannot train is one line before anything loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {model.path}: {library_message(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.chat_template:
        tokenizer.chat_template = read_chat_template(model.chat_template)
    return tokenizer


def read_chat_template(spec: str) -> str:
    """model.chat_template: a Jinja file, or the template text itself."""
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model.chat_template {spec}: cannot read it ({library_message(exc)}); give a Jinja file") from None


def device_map() -> dict:
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def load_base_model(recipe: Recipe, bits: Optional[int] = None):
    """Load the frozen base as the recipe says (4/8-bit or 16-bit), ready for inference."""
    from transformers import AutoModelForCausalLM

    check_model_path(recipe.model.path)
    found = families.family(recipe.model)
    dtype = compute_dtype(recipe)
    quant = recipe.quantization if bits is None else recipe.quantization.model_copy(update={"bits": bits})
    quant_config = build_quant_config(quant, dtype, sharded=recipe.distributed.strategy == "fsdp")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model.path,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            dtype=dtype,
            quantization_config=quant_config,
            attn_implementation=families.attention(recipe.model, found),
            device_map=device_map(),
        )
    except (OSError, ValueError, ImportError) as exc:
        raise load_failure(f"model {recipe.model.path}", exc) from None
    return model


# transformers refuses an attention implementation a model lacks with a paragraph whose advice is
# Python (`attn_implementation="eager"`): Gemma 2 has no sdpa (its logit soft-capping), some
# models no flash_attention_2.
_ATTENTION_REFUSED = re.compile(r"does not support (an attention implementation|Flash Attention|flash_attention|sdpa)", re.IGNORECASE)


def load_failure(what: str, exc: BaseException) -> ModelError:
    """A failed from_pretrained as one whole line, with the recipe's fix where we know it."""
    message = library_message(exc)
    if _ATTENTION_REFUSED.search(message):
        first_sentence = message.split(". ")[0].rstrip(".")
        return ModelError(f"cannot load {what}: {first_sentence}; add --set model.attn_implementation=eager")
    return ModelError(f"cannot load {what}: {message}")


def prepare_for_training(model, gradient_checkpointing: bool):
    """Freeze the base for adapter training without upcasting it.

    Unlike peft's prepare_model_for_kbit_training, the frozen norms and embeddings stay in
    the compute dtype: they receive no gradient, so fp32 copies would only cost memory.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no grad-requiring inputs and works under DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the linear layers (what target_modules can name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.rpartition(".")[2])
    return sorted(names)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting 4-bit packed weights at their logical size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            count = int(torch.Size(quant_state.shape).numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
