"""`qlora merge`: the adapter folded into its base, written as a checkpoint and/or GGUF file, verified."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from qlora_cli.cli.console import JsonOption, SetOption, err, kv_table, out
from qlora_cli.cli.tables import drift_table, gguf_table
from qlora_cli.errors import VerificationError


def merge(
    run_dir: Path = typer.Argument(..., help="Run directory of a finished `qlora train` (adapter + recipe.yaml)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the standalone checkpoint (new or empty)."),
    base: str = typer.Option(
        "original", "--base",
        help="original: merge into the original 16-bit weights; dequantized: into the NF4-dequantized weights a QLoRA adapter trained against.",
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="Dtype of the written weights: bf16, fp16 or fp32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output folder."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the merged model with base + adapter on eval rows; drift fails the command."),
    verify_samples: int = typer.Option(64, "--verify-samples", min=1, help="Eval rows used by the verification."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward pass during verification."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
    format_: str = typer.Option(
        "hf", "--format",
        help="hf (safetensors checkpoint), gguf (one merged file for llama.cpp / Ollama), gguf-lora (base GGUF + adapter GGUF for --lora), or hf,gguf.",
    ),
    gguf_type: str = typer.Option(
        "f16", "--gguf-type",
        help="Tensor type of the GGUF file: f16, bf16, q8_0 (written here) or q4_k_m, q5_k_m, q6_k, q4_0 (llama.cpp's quantizer).",
    ),
    imatrix: bool = typer.Option(False, "--imatrix", help="Guide llama.cpp's quantizer with an importance matrix measured on the run's training rows."),
) -> None:
    """Merge the LoRA / DoRA adapter into its base: a standalone Hugging Face checkpoint and/or GGUF file, verified."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.merge.fold import run_merge
    from qlora_cli.merge.preflight import REPORT_NAME

    result = run_merge(run_dir, output, base, dtype, max_shard_size, force, verify, verify_samples, batch_size, set_,
                       show_progress=not as_json, formats=format_, gguf_type=gguf_type, imatrix=imatrix)
    report, check = result.report, result.report["verification"]
    if as_json:
        print(json.dumps(report))
    else:
        summary = {"output": str(result.output), "base": f"{base} (trained on {report['trained_on']})", "dtype": dtype,
                   "parameters": report["parameters"], "files": ", ".join(report["files"]), "vllm": report["vllm"]}
        if report["update_rounding"] is not None:
            summary["update lost to rounding"] = f"{100 * report['update_rounding']:.1f}% of the adapter's update (norm) in {dtype}"
        out.print(kv_table("qlora merge", summary))
        if check:
            out.print(drift_table(check))
        if report.get("gguf"):
            out.print(gguf_table(report["gguf"]))
            skipped = (report["gguf"].get("llamacpp") or {}).get("skipped")
            if skipped:
                err.print(f"[yellow]note:[/] llama.cpp checks not run: {skipped}")
        out.print(f"wrote {result.output} ({REPORT_NAME} inside), {report['wall_time_s']} s")
        if (report["update_rounding"] or 0) > 0.1:
            err.print(f"[yellow]warning:[/] {dtype} rounding lost {100 * report['update_rounding']:.0f}% of the adapter's update; "
                      "--dtype fp16 rounds 8x finer, --dtype fp32 keeps all of it")
    if result.gguf_failures and not result.failures:
        raise VerificationError(
            f"the GGUF file does not reproduce the merged model: {'; '.join(result.gguf_failures)}. It is in {result.output} with {REPORT_NAME}; "
            "a higher --gguf-type (f16) rounds less, --no-verify accepts it as it is"
        )
    if result.failures:
        raise VerificationError(
            f"the merged model drifts from base + adapter: {'; '.join(result.failures + result.gguf_failures)}. The checkpoint is in {result.output} "
            f"with {REPORT_NAME}; --dtype fp32 avoids rounding the merged weights, --no-verify accepts them as they are"
        )
