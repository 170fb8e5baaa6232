"""Cheap checks before `qlora merge` loads any weights: the adapter can be merged, the base is
there, the output folder is free, the vocabulary fits, the disk has room, the options parse.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from qlora_cli import rundir
from qlora_cli.errors import ConfigError, ModelError, ResourceError, library_message
from qlora_cli.export import gguf_arch, gguf_lora, gguf_writer, llamacpp
from qlora_cli.model import loading
from qlora_cli.model.adapters.registry import check_mergeable
from qlora_cli.recipe.loader import load_recipe
from qlora_cli.recipe.paths import is_local_path
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train.storage import existing_ancestor, probe_writable

BASE_MODES = ("original", "dequantized")
FORMATS = ("hf", "gguf", "gguf-lora")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPORT_NAME = "merge_report.json"
# Config, tokenizer and generation config files beside the weights, plus filesystem slack.
_SIDE_FILES_BYTES = 64 * 2**20


def check_adapter(run_dir: Path) -> dict:
    config = rundir.read_adapter_config(run_dir)
    check_mergeable(str(config.get("peft_type") or "unknown").upper(), run_dir)
    return config


def check_base(recipe: Recipe, run_dir: Path) -> None:
    try:
        loading.check_model_path(recipe.model.path)
    except ConfigError as exc:
        raise ModelError(f"the base model of {run_dir} is missing ({exc}); restore it or point at it with --set model.path=FOLDER") from None


def check_output(output: Path, run_dir: Path, recipe: Recipe, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ResourceError(f"--output {output} is a file; give a folder path")
    protected = [run_dir] + ([Path(recipe.model.path).expanduser()] if is_local_path(recipe.model.path) else [])
    for folder in protected:
        folder = folder.resolve()
        if output.resolve() == folder or output.resolve() in folder.parents:
            raise ResourceError(f"--output {output} would replace {folder}; choose a new folder")
    if output.is_dir():
        rundir.check_unlocked(output, "this merge")
    if output.is_dir() and rundir.entries(output):
        if not force:
            raise ResourceError(f"--output {output} is not empty; choose a new or empty folder, or pass --force to replace it")
        # --force deletes the folder: only an earlier merge's output, never the user's files or the working directory.
        if rundir.holds_cwd(output):
            raise ResourceError(f"--output {output} holds the current directory, which --force would delete; choose a new folder")
        if not (output / REPORT_NAME).is_file():
            raise ResourceError(
                f"--force replaces an earlier qlora merge output (a folder with {REPORT_NAME}); --output {output} is not one: "
                "choose a new or empty folder"
            )
    probe_writable(output, "--output")  # also a parent that is a file, and /proc, which root "may" write


def load_run_tokenizer(run_dir: Path, recipe: Recipe):
    """The tokenizer the run trained with (saved beside the adapter), else the base's."""
    if not any((run_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return loading.load_tokenizer(recipe.model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir), trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer saved in {run_dir}: {library_message(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_config(recipe: Recipe):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(recipe.model.path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)


def embedding_rows(recipe: Recipe) -> int:
    return base_config(recipe).get_text_config().vocab_size


def parse_formats(formats: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip().lower() for part in formats.split(",") if part.strip()))
    if not chosen or any(part not in FORMATS for part in chosen):
        raise ConfigError(f"--format {formats!r}: choose hf, gguf, gguf-lora, or hf with one of the others (hf,gguf)")
    if "gguf" in chosen and "gguf-lora" in chosen:
        raise ConfigError(f"--format {formats!r}: gguf (merged) and gguf-lora (base + adapter) each write a Modelfile; choose one")
    return chosen


def check_vocabulary(tokenizer, rows: int, source: str) -> None:
    # Only a tokenizer larger than the embedding matrix is an error: its extra ids would index
    # past the last row. A smaller one is normal (vocabularies are padded to a multiple of 64
    # or 128 rows for fast matmuls), and those spare rows are never looked up.
    if len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer has {len(tokenizer):,} tokens but {source} has {rows:,} embedding rows; tokens were added "
            "without resizing the embeddings (or the tokenizer belongs to another model), so the merged model could "
            "not embed them. Use the base's own tokenizer, or resize the embeddings and train them (lora.modules_to_save)"
        )


def checkpoint_parameters(model_path: str) -> Optional[int]:
    """Parameters stored in a local safetensors checkpoint, read from the file headers only."""
    files = sorted(Path(model_path).expanduser().glob("*.safetensors")) if is_local_path(model_path) else []
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total


def check_disk_space(output: Path, parameters: int, dtype: torch.dtype, gguf_bytes: int = 0) -> int:
    """Raise unless the output's filesystem holds the checkpoint (and GGUF file); returns the expected bytes."""
    needed = parameters * dtype.itemsize + _SIDE_FILES_BYTES + gguf_bytes
    folder = existing_ancestor(output.parent)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ResourceError(
            f"the merged checkpoint needs about {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; "
            "free some space or choose another --output"
        )
    return needed


def parse_shard_size(size: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except (ValueError, AttributeError):
        value = 0
    if value <= 0:
        raise ConfigError(f"--max-shard-size {size!r}: give a size like 5GB, 500MB or 2GiB")
    return value


def check_gguf_options(gguf_type: str, imatrix: bool) -> None:
    gguf_writer.check_gguf_type(gguf_type)
    if imatrix and gguf_type not in gguf_writer.QUANTIZED_TYPES:
        raise ConfigError(f"--imatrix guides llama.cpp's quantizer, which makes {', '.join(gguf_writer.QUANTIZED_TYPES)}; "
                          f"--gguf-type {gguf_type} is written without it: drop --imatrix")
    if gguf_type in gguf_writer.QUANTIZED_TYPES:
        ready, reason = llamacpp.available()
        if not ready:
            raise ConfigError(f"--gguf-type {gguf_type} is made by llama.cpp's quantizer: {reason}")


def preflight(run_dir: Path, output: Path, base_mode: str, dtype: str, max_shard_size: str, force: bool, overrides=None,
              formats: tuple[str, ...] = ("hf",), gguf_type: str = "f16", imatrix: bool = False):
    """Every check that needs no weights; returns (recipe, tokenizer)."""
    if "gguf" in formats or "gguf-lora" in formats:
        check_gguf_options(gguf_type, imatrix)
    elif imatrix:
        raise ConfigError("--imatrix applies to --format gguf; add it or drop --imatrix")
    if "gguf-lora" in formats and base_mode != "original":
        raise ConfigError("--format gguf-lora pairs the adapter with the original base's GGUF; drop --base dequantized")
    if base_mode not in BASE_MODES:
        raise ConfigError(f"--base {base_mode!r}: choose original or dequantized")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    parse_shard_size(max_shard_size)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory; pass the output.dir of a finished `qlora train`")
    recipe = load_recipe(run_dir, overrides)
    check_adapter(run_dir)
    if base_mode == "dequantized" and recipe.quantization.bits != 4:
        raise ConfigError(
            f"--base dequantized merges into the 4-bit weights a QLoRA adapter trained against, but {run_dir} trained on a "
            f"{recipe.quantization.bits}-bit base; use --base original"
        )
    check_base(recipe, run_dir)
    check_output(output, run_dir, recipe, force)
    if "gguf" in formats or "gguf-lora" in formats:
        gguf_arch.check_architecture(base_config(recipe))
    if "gguf-lora" in formats:
        gguf_lora.check_lora(rundir.read_adapter_config(run_dir))
    tokenizer = load_run_tokenizer(run_dir, recipe)
    check_vocabulary(tokenizer, embedding_rows(recipe), f"the base {recipe.model.path}")
    parameters = checkpoint_parameters(recipe.model.path)
    if parameters is not None:
        check_disk_space(output, parameters, DTYPES[dtype], gguf_writer.expected_size(parameters, gguf_type) if {"gguf", "gguf-lora"} & set(formats) else 0)
    return recipe, tokenizer
