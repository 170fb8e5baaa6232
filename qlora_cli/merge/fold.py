"""`qlora merge`: fold a LoRA / DoRA / IA3 adapter into its base and write a standalone Hugging
Face checkpoint (safetensors shards, config, generation config, tokenizer, chat template).

The checkpoint is written into a temporary sibling folder and renamed into place at the end, so
a crash or Ctrl-C never leaves half a checkpoint. Verification: evaluate/drift.py. `--format gguf`
also writes one GGUF file (export/), whose source and reference is the Hugging Face checkpoint,
dropped after when not asked for.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora_cli import rundir
from qlora_cli.atomic import remove_stale_stagings, staged_folder
from qlora_cli.errors import ModelError, library_message
from qlora_cli.evaluate import drift
from qlora_cli.export import gguf_writer
from qlora_cli.merge import gguf
from qlora_cli.merge.preflight import DTYPES, REPORT_NAME, check_disk_space, check_vocabulary, parse_formats, preflight
from qlora_cli.model import loading
from qlora_cli.model.adapters import vllm_rules
from qlora_cli.model.quantized import dequantized_weights
from qlora_cli.recipe.schema import Recipe


@dataclass
class MergeResult:
    output: Path
    report: dict
    failures: list[str] = field(default_factory=list)  # the merged model against base + adapter
    gguf_failures: list[str] = field(default_factory=list)  # the GGUF file against the merged model


def working_dtype(base_mode: str, output_dtype: torch.dtype, recipe: Recipe) -> torch.dtype:
    """The dtype the merge adds in: the output's, unless dequantized values need a wider one."""
    dequantized_in = loading.compute_dtype(recipe)
    if base_mode == "original" or dequantized_in == output_dtype:
        return output_dtype
    return torch.float32


def with_dtype(recipe: Recipe, dtype: torch.dtype) -> Recipe:
    name = str(dtype).removeprefix("torch.")
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": name})})


def load_base_for_merge(recipe: Recipe, base_mode: str, dtype: torch.dtype):
    """The 16-bit base; for `dequantized`, its 4-bit layers hold the NF4 values training saw."""
    base = loading.load_base_model(with_dtype(recipe, dtype), bits=16)
    if base_mode == "dequantized":
        # Loaded exactly as training loaded it, so the quantization is bit-for-bit the same.
        quantized = loading.load_base_model(recipe)
        for name, _, weight in dequantized_weights(quantized):
            base.get_submodule(name).weight.data.copy_(weight)
        del quantized
        gc.collect()
    return base


def update_rounding(peft_model, output_dtype: torch.dtype) -> Optional[float]:
    """||round(W + BA) - (W + BA)|| / ||BA|| over all adapted weights: the share of the adapter's
    update that storing in `output_dtype` loses (None for DoRA, whose merge also rescales W).

    A short or low-learning-rate run makes updates smaller than bf16's spacing near W, and they
    round away: a 10-step LoRA on SmolLM2 loses ~50% in bf16, ~8% in fp16, none in fp32.
    """
    from peft.tuners.lora import LoraLayer

    error, update = 0.0, 0.0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if module.use_dora.get(name):
                return None
            delta = module.get_delta_weight(name).float()
            exact = module.get_base_layer().weight.float() + delta
            error += float((exact.to(output_dtype).float() - exact).square().sum())
            update += float(delta.square().sum())
    return math.sqrt(error / update) if update else None


def merged_model(recipe: Recipe, run_dir: Path, base_mode: str, output_dtype: torch.dtype, tokenizer):
    """(merged model in the output dtype, update_rounding)."""
    from peft import PeftModel

    base = load_base_for_merge(recipe, base_mode, working_dtype(base_mode, output_dtype, recipe))
    check_vocabulary(tokenizer, base.get_input_embeddings().weight.shape[0], "its embedding matrix")
    try:
        model = PeftModel.from_pretrained(base, str(run_dir), is_trainable=False)
        rounding = update_rounding(model, output_dtype)
        merged = model.merge_and_unload(safe_merge=True)
    except (OSError, ValueError, RuntimeError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"cannot merge the adapter in {run_dir} into {recipe.model.path}: {library_message(exc)}") from None
    merged = merged.to(output_dtype)
    # A 16-bit load carries no quantization_config; drop any inherited one so nothing asks for bitsandbytes.
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    merged.config.use_cache = True
    return merged, rounding


def write_checkpoint(model, tokenizer, folder: Path, max_shard_size: str) -> None:
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(folder))
    if not (folder / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))


def drop_checkpoint(folder: Path, keep: set[str]) -> None:
    """Remove the Hugging Face files that were only the GGUF's source and reference."""
    for path in folder.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_merge(
    run_dir: Path,
    output: Path,
    base_mode: str = "original",
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    force: bool = False,
    verify: bool = True,
    verify_samples: Optional[int] = 64,
    batch_size: int = 16,
    overrides: Optional[list[str]] = None,
    show_progress: bool = True,
    formats: str = "hf",
    gguf_type: str = "f16",
    imatrix: bool = False,
) -> MergeResult:
    """Merge, write atomically, verify; the report is in output/merge_report.json.

    A failed verification still installs the checkpoint (its report says why it failed) and
    returns the failures; the caller decides the exit code.
    """
    started = time.perf_counter()
    run_dir, output = Path(run_dir), Path(output)
    chosen = parse_formats(formats)
    recipe, tokenizer = preflight(run_dir, output, base_mode, dtype, max_shard_size, force, overrides, chosen, gguf_type, imatrix)
    output_dtype = DTYPES[dtype]
    # One writer per output folder (rundir.writer_lock), and the folder replaced whole or not at all.
    with rundir.writer_lock(output, "this merge"), staged_folder(output, "merging") as staging:
        remove_stale_stagings(output, "merging", keep=staging)  # what killed merges left; the lock says none is running
        model, rounding = merged_model(recipe, run_dir, base_mode, output_dtype, tokenizer)
        parameters = sum(param.numel() for param in model.parameters())
        gguf_bytes = gguf_writer.expected_size(parameters, gguf_type) if {"gguf", "gguf-lora"} & set(chosen) else 0
        expected_bytes = check_disk_space(output, parameters, output_dtype, gguf_bytes)
        write_checkpoint(model, tokenizer, staging, max_shard_size)
        exported = None
        if "gguf" in chosen:  # "gguf-lora" writes its files once the merged model is gone
            exported = gguf.export(model, tokenizer, staging, gguf_type, gguf_writer.display_name(recipe.model.path, run_dir), recipe, imatrix)
        del model
        gc.collect()
        if "gguf-lora" in chosen:
            base = load_base_for_merge(recipe, "original", output_dtype)
            exported = gguf.export_lora(base, tokenizer, staging, gguf_type, gguf_writer.display_name(recipe.model.path, run_dir), recipe,
                                        run_dir, imatrix)
            del base
            gc.collect()
        report = {
            "run_dir": str(run_dir),
            "output": str(output),
            "base_model": recipe.model.path,
            "base": base_mode,
            "trained_on": loading.quantization_label(recipe.quantization),
            "dtype": dtype,
            "parameters": parameters,
            "update_rounding": rounding,
            "expected_bytes": expected_bytes,
            "formats": list(chosen),
            "vllm": vllm_rules.summary(rundir.read_adapter_config(run_dir), True, merged=str(output) if "hf" in chosen else None),
        }
        failures: list[str] = []
        gguf_failures: list[str] = []
        if verify:
            report["verification"] = drift.verify(recipe, run_dir, staging, tokenizer, base_mode, dtype, verify_samples, batch_size, show_progress)
            failures = report["verification"]["failures"]
        else:
            report["verification"] = None
        if exported is not None:
            exported["verification"] = exported["llamacpp"] = None
            if verify:
                gguf_failures = gguf.verify(recipe, staging, exported, tokenizer, gguf_type, verify_samples, batch_size, show_progress)
            report["gguf"] = exported
        if "hf" not in chosen:
            drop_checkpoint(staging, keep={exported["file"], exported["modelfile"]["file"], *([exported["adapter"]["file"]] if "adapter" in exported else [])})
        report["files"] = sorted(path.name for path in staging.iterdir())
        report["wall_time_s"] = round(time.perf_counter() - started, 1)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return MergeResult(output=output, report=report, failures=failures, gguf_failures=gguf_failures)
