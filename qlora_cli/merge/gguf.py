"""The GGUF half of `qlora merge`: the file (written here, or for q4_0 and the k-quants by
llama.cpp's quantizer from our f16), the Ollama Modelfile beside it, and its two checks: transformers'
load-back (export/gguf_check.py) and llama.cpp itself (export/llamacpp_check.py), the latter only
where llama.cpp is installed; the report says when it is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qlora_cli import rundir
from qlora_cli.data.splits import split_rows, tokenize_rows
from qlora_cli.export import gguf_check, gguf_lora, gguf_writer, llamacpp_check, modelfile, quantize
from qlora_cli.recipe.schema import Recipe

ADAPTER_NAME = "adapter-lora.gguf"


def imatrix_rows(recipe: Recipe, tokenizer, limit: int = quantize.IMATRIX_ROWS) -> list[list[int]]:
    """Token ids of the first `limit` training rows, as training tokenized them."""
    train_rows, _ = split_rows(recipe.data, recipe.train.seed)
    train_rows = train_rows.select(range(min(limit, len(train_rows))))
    tokenized, _ = tokenize_rows(train_rows, recipe.data, tokenizer)
    return [list(row) for row in tokenized["input_ids"]]


def write_file(model, tokenizer, path: Path, gguf_type: str, name: str, recipe: Recipe, use_imatrix: bool) -> dict:
    if gguf_type in gguf_writer.QUANTIZED_TYPES:
        rows = imatrix_rows(recipe, tokenizer) if use_imatrix else None
        return quantize.write_quantized(model, tokenizer, path, gguf_type, name, rows)
    return gguf_writer.write_gguf(model, tokenizer, path, gguf_type, name)


def export(model, tokenizer, folder: Path, gguf_type: str, name: str, recipe: Recipe, use_imatrix: bool) -> dict:
    """Write the merged model's GGUF file (and its Modelfile) into `folder`; returns the writer's summary."""
    summary = write_file(model, tokenizer, folder / gguf_writer.gguf_file_name(gguf_type), gguf_type, name, recipe, use_imatrix)
    summary["modelfile"] = modelfile.write_modelfile(folder, summary["file"], tokenizer, getattr(model, "generation_config", None))
    return summary


def export_lora(base, tokenizer, folder: Path, gguf_type: str, name: str, recipe: Recipe, run_dir: Path, use_imatrix: bool) -> dict:
    """The base model's GGUF and the run's adapter as a LoRA GGUF beside it (llama.cpp `-m BASE --lora
    ADAPTER`, Ollama `FROM` + `ADAPTER`); returns the base file's summary with the adapter's inside."""
    summary = write_file(base, tokenizer, folder / f"base-{gguf_type}.gguf", gguf_type, name, recipe, use_imatrix)
    summary["adapter"] = gguf_lora.write_lora_gguf(run_dir, rundir.read_adapter_config(run_dir), base.config, folder / ADAPTER_NAME, name)
    summary["modelfile"] = modelfile.write_modelfile(folder, summary["file"], tokenizer, getattr(base, "generation_config", None),
                                                     adapter=ADAPTER_NAME)
    return summary


def verify(recipe: Recipe, folder: Path, exported: dict, tokenizer, gguf_type: str, samples: Optional[int], batch_size: int,
           show_progress: bool) -> list[str]:
    """Both checks of the GGUF in `folder` against the merged checkpoint beside it, recorded in
    `exported`; returns their failures. A base + LoRA pair is checked in llama.cpp only (transformers
    does not apply GGUF adapters)."""
    loras = [folder / exported["adapter"]["file"]] if "adapter" in exported else []
    failures = []
    if not loras:
        exported["verification"] = gguf_check.verify(recipe, folder, exported["file"], tokenizer, gguf_type, samples, batch_size, show_progress)
        failures += exported["verification"]["failures"]
    exported["llamacpp"] = llamacpp_check.verify(recipe, folder, exported["file"], tokenizer, gguf_type, samples, batch_size, show_progress,
                                                 loras=loras)
    return failures + exported["llamacpp"]["failures"]
