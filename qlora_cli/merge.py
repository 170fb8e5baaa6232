"""`qlora merge`: fold a LoRA / DoRA adapter into its base and write a standalone Hugging Face
checkpoint (safetensors shards, config, generation config, tokenizer, chat template).

Cheap checks run first (adapter type, base present, output free, vocabulary fits, disk
space); the checkpoint is written into a temporary sibling folder and renamed into place
at the end, so a crash or Ctrl-C never leaves half a checkpoint. Verification: drift.py.
`--format gguf` also writes one GGUF file (gguf_export.py), verified by gguf_check.py; the
Hugging Face checkpoint is its source and reference, and is dropped after when not asked for.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora_cli import drift, gguf_export, inference, modeling
from qlora_cli.adapters import MERGEABLE, WHY_NOT_MERGEABLE
from qlora_cli.config import Recipe, load_recipe
from qlora_cli.errors import ConfigError, ModelError, ResourceError
from qlora_cli.storage import existing_ancestor

BASE_MODES = ("original", "dequantized")
FORMATS = ("hf", "gguf")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPORT_NAME = "merge_report.json"
# Config, tokenizer and generation config files beside the weights, plus filesystem slack.
_SIDE_FILES_BYTES = 64 * 2**20


@dataclass
class MergeResult:
    output: Path
    report: dict
    failures: list[str] = field(default_factory=list)  # the merged model against base + adapter
    gguf_failures: list[str] = field(default_factory=list)  # the GGUF file against the merged model


# ---- preflight: cheap checks before loading any weights ---------------------------------


def check_adapter(run_dir: Path) -> dict:
    config = inference.read_adapter_config(run_dir)
    peft_type = str(config.get("peft_type") or "unknown").upper()
    if peft_type not in MERGEABLE:
        why = WHY_NOT_MERGEABLE.get(peft_type, "only LoRA, DoRA and IA3 adapters fold into the base weights")
        raise ModelError(
            f"{run_dir} holds a {peft_type} adapter, which cannot be merged: {why}; "
            "use it unmerged (qlora evaluate / qlora generate load it on the base)"
        )
    return config


def check_base(recipe: Recipe, run_dir: Path) -> None:
    try:
        modeling.check_model_path(recipe.model.path)
    except ConfigError as exc:
        raise ModelError(f"the base model of {run_dir} is missing ({exc}); restore it or point at it with --set model.path=FOLDER") from None


def check_output(output: Path, run_dir: Path, recipe: Recipe, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ResourceError(f"--output {output} is a file; give a folder path")
    protected = [run_dir] + ([Path(recipe.model.path).expanduser()] if modeling.is_local_model(recipe.model.path) else [])
    for folder in protected:
        folder = folder.resolve()
        if output.resolve() == folder or output.resolve() in folder.parents:
            raise ResourceError(f"--output {output} would replace {folder}; choose a new folder")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise ResourceError(f"--output {output} is not empty; choose a new or empty folder, or pass --force to replace it")
        # --force deletes the folder: only an earlier merge's output, never the user's files or the working directory.
        if Path.cwd().resolve().is_relative_to(output.resolve()):
            raise ResourceError(f"--output {output} holds the current directory, which --force would delete; choose a new folder")
        if not (output / REPORT_NAME).is_file():
            raise ResourceError(
                f"--force replaces an earlier qlora merge output (a folder with {REPORT_NAME}); --output {output} is not one: "
                "choose a new or empty folder"
            )
    parent = existing_ancestor(output.parent)
    if not os.access(parent, os.W_OK):
        raise ResourceError(f"--output {output}: {parent} is not writable; choose another folder")


def load_run_tokenizer(run_dir: Path, recipe: Recipe):
    """The tokenizer the run trained with (saved beside the adapter), else the base's."""
    if not any((run_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return modeling.load_tokenizer(recipe.model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir), trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer saved in {run_dir}: {str(exc).splitlines()[0]}") from None
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
        raise ConfigError(f"--format {formats!r}: choose hf, gguf or hf,gguf")
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
    files = sorted(Path(model_path).expanduser().glob("*.safetensors")) if modeling.is_local_model(model_path) else []
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


def preflight(run_dir: Path, output: Path, base_mode: str, dtype: str, max_shard_size: str, force: bool, overrides=None,
              formats: tuple[str, ...] = ("hf",), gguf_type: str = "f16"):
    """Every check that needs no weights; returns (recipe, tokenizer)."""
    if "gguf" in formats:
        gguf_export.check_gguf_type(gguf_type)
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
    if "gguf" in formats:
        gguf_export.check_architecture(base_config(recipe))
    tokenizer = load_run_tokenizer(run_dir, recipe)
    check_vocabulary(tokenizer, embedding_rows(recipe), f"the base {recipe.model.path}")
    parameters = checkpoint_parameters(recipe.model.path)
    if parameters is not None:
        check_disk_space(output, parameters, DTYPES[dtype], gguf_export.expected_size(parameters, gguf_type) if "gguf" in formats else 0)
    return recipe, tokenizer


# ---- the merge ----------------------------------------------------------------------------


def working_dtype(base_mode: str, output_dtype: torch.dtype, recipe: Recipe) -> torch.dtype:
    """The dtype the merge adds in: the output's, unless dequantized values need a wider one."""
    dequantized_in = modeling.compute_dtype(recipe)
    if base_mode == "original" or dequantized_in == output_dtype:
        return output_dtype
    return torch.float32


def with_dtype(recipe: Recipe, dtype: torch.dtype) -> Recipe:
    name = str(dtype).removeprefix("torch.")
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": name})})


def load_base_for_merge(recipe: Recipe, base_mode: str, dtype: torch.dtype):
    """The 16-bit base; for `dequantized`, its 4-bit layers hold the NF4 values training saw."""
    from qlora_cli.dequantize import dequantized_weights

    base = modeling.load_base_model(with_dtype(recipe, dtype), bits=16)
    if base_mode == "dequantized":
        # Loaded exactly as training loaded it, so the quantization is bit-for-bit the same.
        quantized = modeling.load_base_model(recipe)
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
        raise ModelError(f"cannot merge the adapter in {run_dir} into {recipe.model.path}: {str(exc).splitlines()[0][:300]}") from None
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


def drop_checkpoint(folder: Path, keep: str) -> None:
    """Remove the Hugging Face files that were only the GGUF's source and reference."""
    for path in folder.iterdir():
        if path.name == keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def install(staging: Path, output: Path) -> None:
    """Rename the finished staging folder to `output`, replacing what --force allowed."""
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp creates 0700, and transformers writes shards through 0600 temporary files.
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
    if output.exists():
        replaced = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
        os.replace(output, replaced / output.name)
        os.replace(staging, output)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, output)


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
) -> MergeResult:
    """Merge, write atomically, verify; the report is in output/merge_report.json.

    A failed verification still installs the checkpoint (its report says why it failed) and
    returns the failures; the caller decides the exit code.
    """
    started = time.perf_counter()
    run_dir, output = Path(run_dir), Path(output)
    chosen = parse_formats(formats)
    recipe, tokenizer = preflight(run_dir, output, base_mode, dtype, max_shard_size, force, overrides, chosen, gguf_type)
    output_dtype = DTYPES[dtype]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-", dir=output.parent))
    try:
        model, rounding = merged_model(recipe, run_dir, base_mode, output_dtype, tokenizer)
        parameters = sum(param.numel() for param in model.parameters())
        gguf_bytes = gguf_export.expected_size(parameters, gguf_type) if "gguf" in chosen else 0
        expected_bytes = check_disk_space(output, parameters, output_dtype, gguf_bytes)
        write_checkpoint(model, tokenizer, staging, max_shard_size)
        exported = None
        if "gguf" in chosen:
            exported = gguf_export.write_gguf(
                model, tokenizer, staging / gguf_export.gguf_file_name(gguf_type), gguf_type,
                gguf_export.display_name(recipe.model.path, run_dir),
            )
        del model
        gc.collect()
        report = {
            "run_dir": str(run_dir),
            "output": str(output),
            "base_model": recipe.model.path,
            "base": base_mode,
            "trained_on": modeling.quantization_label(recipe.quantization),
            "dtype": dtype,
            "parameters": parameters,
            "update_rounding": rounding,
            "expected_bytes": expected_bytes,
            "formats": list(chosen),
        }
        failures: list[str] = []
        gguf_failures: list[str] = []
        if verify:
            report["verification"] = drift.verify(recipe, run_dir, staging, tokenizer, base_mode, dtype, verify_samples, batch_size, show_progress)
            failures = report["verification"]["failures"]
        else:
            report["verification"] = None
        if exported is not None:
            from qlora_cli import gguf_check

            exported["verification"] = (
                gguf_check.verify(recipe, staging, exported["file"], tokenizer, gguf_type, verify_samples, batch_size, show_progress)
                if verify else None
            )
            gguf_failures = exported["verification"]["failures"] if verify else []
            report["gguf"] = exported
        if "hf" not in chosen:
            drop_checkpoint(staging, keep=exported["file"])
        report["files"] = sorted(path.name for path in staging.iterdir())
        report["wall_time_s"] = round(time.perf_counter() - started, 1)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        install(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(output=output, report=report, failures=failures, gguf_failures=gguf_failures)
