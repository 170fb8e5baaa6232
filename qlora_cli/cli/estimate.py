"""The `qlora estimate` command: read a recipe (or build one from flags), estimate, print a rich
breakdown or one JSON object. Importing this module must not import torch or transformers: the
command answers in well under two seconds and downloads nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import List, Optional

import typer

from qlora_cli.cli.console import out
from qlora_cli.errors import ConfigError
from qlora_cli.estimate import GIB, Estimate, Gpu, Verdict, estimate, parse_memory, plan_from_recipe, resolve, resolve_gpu, verdict
from qlora_cli.estimate.advice import MIN_USEFUL_SEQ, safety_margin, solve
from qlora_cli.estimate.catalog import GPUS
from qlora_cli.estimate.gpu import cards_that_fit
from qlora_cli.model.tested import untested_note
from qlora_cli.recipe.loader import apply_overrides, load_recipe, validate_recipe

LABELS = {
    "base_weights": "base weights",
    "adapter_weights": "adapter weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_and_loss": "logits + loss",
    "allocator_overhead": "allocator overhead",
    "cuda_context": "CUDA context",
    "reference_forward": "reference forward (no grad)",
    "generation_kv_cache": "KV cache while generating",
}


def _flag_overrides(quant, rank, seq_len, batch, gradient_checkpointing, optimizer, target_modules, attn) -> list[str]:
    """The recipe-free flags as --set overrides, so both forms go through the recipe schema."""
    overrides = []
    if quant is not None:
        match = re.fullmatch(r"(4|8|16)\s*(bit|-bit)?", quant.strip().lower())
        if not match:
            raise ConfigError(f"--quant {quant!r}: use 4bit, 8bit or 16bit")
        overrides.append(f"quantization.bits={match.group(1)}")
    pairs = [("lora.r", rank), ("data.max_seq_len", seq_len), ("train.micro_batch_size", batch),
             ("train.optimizer", optimizer), ("model.attn_implementation", attn)]
    overrides += [f"{key}={value}" for key, value in pairs if value is not None]
    if gradient_checkpointing is not None:
        overrides.append(f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}")
    if target_modules is not None:
        names = [name.strip() for name in target_modules.split(",") if name.strip()]
        overrides.append("lora.target_modules=" + ("all-linear" if names == ["all-linear"] else json.dumps(names)))
    return overrides


def _load(recipe: Optional[Path], model: Optional[str], overrides: list[str]):

    if recipe is not None and model is not None:
        raise ConfigError("give a recipe or --model, not both (with a recipe, change the model with --set model.path=...)")
    if recipe is not None:
        return load_recipe(recipe, overrides)
    if model is None:
        raise ConfigError("give a recipe (e.g. configs/llama-3.1-8b-qlora.yaml) or --model NAME_OR_PATH; see qlora estimate --help")
    skeleton = {"model": {"path": model}, "data": {"train": "(estimate)", "format": "text"}, "output": {"dir": "(estimate)"}}
    return validate_recipe(apply_overrides(skeleton, overrides), source="qlora estimate flags")


def card_from_flags(gpu: Optional[str], gpu_memory: Optional[str]) -> Optional[Gpu]:
    """The card of --gpu NAME or --gpu-memory SIZE (None for neither)."""
    if gpu and gpu_memory:
        raise ConfigError("give --gpu or --gpu-memory, not both")
    if gpu:
        return resolve_gpu(gpu)
    if gpu_memory:
        return Gpu(f"{gpu_memory.strip()} card", parse_memory(gpu_memory))
    return None


def _gib(value: int) -> float:
    return round(value / GIB, 2)


def to_json(result: Estimate, judged: Optional[Verdict], measured: Optional[dict] = None, traced: Optional[dict] = None,
            solved: Optional[dict] = None) -> dict:
    """The machine-readable estimate: total_gib, gpu_gib, fits and breakdown (name -> GiB) at least."""
    plan = dataclasses.asdict(result.plan)
    plan["target_modules"] = result.plan.target_modules if isinstance(result.plan.target_modules, str) else list(result.plan.target_modules)
    details = result.details
    payload = {
        "model": result.arch.name,
        "architecture_source": result.arch.source,
        "plan": plan,
        "total_params": result.total_params,
        "trainable_params": result.trainable_params,
        "breakdown": {name: _gib(value) for name, value in result.breakdown.items()},
        "base_weights_gib": {name: _gib(value) for name, value in details["base_weights"].items()},
        "activations_gib": {name: _gib(value) for name, value in details["activations"].items()},
        "total_gib": _gib(result.total),
        "gpu": judged.gpu.name if judged else None,
        "gpu_gib": _gib(judged.gpu.bytes) if judged else None,
        "fits": judged.fits if judged else None,
        "verdict": judged.state if judged else None,
        "safety_margin_gib": _gib(safety_margin(result.total)),
        "headroom_gib": _gib(judged.headroom) if judged else None,
        "fits_with_paging": judged.fits_with_paging if judged else None,
        "suggestions": [{"change": s.change, "total_gib": _gib(s.total), "fits": s.fits} for s in judged.suggestions] if judged else [],
        "bigger_gpus": list(judged.bigger_cards) if judged else [],
        "fits_on": cards_that_fit(result.total),
        "notes": list(result.notes),
    }
    if measured is not None:
        payload["measured"] = measured
    if traced is not None:
        payload["traced"] = traced
    if solved is not None:
        payload["solved"] = solved
    return payload


SOLVABLE = {"max_seq_len": "data.max_seq_len", "micro_batch_size": "train.micro_batch_size"}


def _solve(result: Estimate, card: Optional[Gpu], field: str) -> dict:
    """The largest value of `field` that fits the card with the safety margin (None: none does)."""
    if field not in SOLVABLE:
        raise ConfigError(f"--solve {field!r}: give max_seq_len or micro_batch_size")
    if card is None:
        raise ConfigError(f"--solve {field} needs a card: add --gpu NAME or --gpu-memory SIZE")
    value = solve(result.arch, result.plan, card.bytes, field)
    changes = {"seq_len": value} if field == "max_seq_len" else {"micro_batch": value}
    total = estimate(result.arch, result.plan.with_changes(**changes)).total if value else None
    return {"field": field, "key": SOLVABLE[field], "value": value, "total_gib": _gib(total) if total else None}


def _trace(config, result: Estimate) -> dict:
    """One real step traced here, against the estimate without its device terms in the trace's dtype."""
    # The tracer loads torch and the model: imported when the command runs with --trace, so the estimate stays fast.
    from qlora_cli.estimate.trace import trace_step
    from qlora_cli.estimate.trace_trainer import trace_trainer_step

    # SFT: step.py's step (our loss kernel); other objectives: their TRL trainer's own step (generation, reference forward)
    traced = trace_step(config) if config.train.objective == "sft" else trace_trainer_step(config)
    plan = result.plan.with_changes(dtype_bytes=4 if traced.dtype == "float32" else 2)
    same = estimate(result.arch, plan).breakdown
    allocated = sum(v for k, v in same.items() if k not in ("allocator_overhead", "cuda_context"))
    return {"peak_gib": traced.peak / GIB, "estimated_gib": allocated / GIB, "error_pct": 100 * (allocated / traced.peak - 1),
            "dtype": traced.dtype, "device": traced.device, "terms_gib": {k: v / GIB for k, v in traced.as_estimate_terms().items()},
            "notes": traced.notes}


def _describe(result: Estimate) -> list[str]:
    plan, arch = result.plan, result.arch
    quant = {4: f"4-bit {plan.quant_type}" + (" + double quant" if plan.double_quant else ""), 8: "8-bit (LLM.int8)", 16: "16-bit"}[plan.bits]
    targets = plan.target_modules if isinstance(plan.target_modules, str) else ",".join(plan.target_modules)
    adapter = ("DoRA" if plan.use_dora else "LoRA") + f" r={plan.lora_r} on {targets}" if plan.method == "lora" else plan.method
    if plan.layers:
        adapter += f" (layers {','.join(map(str, plan.layers))})"
    share = 100 * result.trainable_params / max(1, result.total_params)
    return [
        f"[bold]{arch.name}[/] [dim]({arch.source})[/]  {result.total_params / 1e9:.2f}B params, "
        f"{result.trainable_params:,} trainable ({share:.2f}%)",
        f"{quant} base, {adapter}, {plan.optimizer}",
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens{' (packed)' if plan.packing else ''}, "
        f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, {plan.attention} attention, "
        f"{'fused' if plan.fused_loss else 'full-logits'} loss"
        + (f", {plan.processes} GPUs ({plan.strategy}, per-GPU figures)" if plan.processes > 1 else ""),
    ]


def _print_rich(result: Estimate, judged: Optional[Verdict], measured: Optional[dict]) -> None:
    from rich.table import Table


    for line in _describe(result):
        out.print(line)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("memory")
    table.add_column("GiB", justify="right")
    for name, value in result.breakdown.items():
        table.add_row(LABELS.get(name, name), f"{value / GIB:.2f}")
        if name == "base_weights":
            for part, part_bytes in result.details["base_weights"].items():
                table.add_row(f"[dim]  {part}[/]", f"[dim]{part_bytes / GIB:.2f}[/]")
        if name == "activations":
            kept = result.details["activations"]["kept until backward"]
            table.add_row("[dim]  kept until backward[/]", f"[dim]{kept / GIB:.2f}[/]")
            table.add_row("[dim]  one layer's backward, beyond the loss peak[/]", f"[dim]{(value - kept) / GIB:.2f}[/]")
    table.add_row("[bold]total[/]", f"[bold]{result.total / GIB:.2f}[/]")
    if judged:
        table.add_row(f"[bold]{judged.gpu.name}[/]", f"[bold]{judged.gpu.bytes / GIB:.2f}[/]")
    out.print(table)
    if measured:
        out.print(f"measured on {measured['device']}: peak {measured['peak_total_gib']:.2f} GiB "
                  f"(allocated {measured['peak_allocated_gib']:.2f}, reserved {measured['peak_reserved_gib']:.2f}, "
                  f"outside PyTorch {measured['outside_pytorch_gib']:.2f}) vs estimated {result.total / GIB:.2f} GiB")
    for note in result.notes:
        out.print(f"[yellow]note:[/] {note}")
    if judged is None:
        fitting = cards_that_fit(result.total)
        out.print(f"fits on: {', '.join(fitting) if fitting else 'none of ' + ', '.join(GPUS)}  (check one with --gpu NAME)")
        return
    margin = safety_margin(result.total)
    if judged.state == "fits":
        out.print(f"[green]fits[/] on {judged.gpu.name} with {judged.headroom / GIB:.2f} GiB headroom "
                  f"({100 * judged.headroom / judged.gpu.bytes:.0f}%; the safety margin is {margin / GIB:.2f} GiB)")
    elif judged.state == "tight":
        out.print(f"[yellow]tight[/] on {judged.gpu.name}: {judged.headroom / GIB:.2f} GiB headroom, inside the "
                  f"{margin / GIB:.2f} GiB safety margin: it may run out of memory; a change below makes room")
    else:
        paging = "; it fits only while the paged optimizer spills its states to CPU RAM" if judged.fits_with_paging else ""
        out.print(f"[red]does not fit[/] on {judged.gpu.name}: {-judged.headroom / GIB:.2f} GiB over{paging}")
    for suggestion in judged.suggestions:
        mark = "[green]fits[/]" if suggestion.fits else "[red]still over[/]"
        verb = "could go to" if judged.fits else "try"
        out.print(f"  {verb} --set {suggestion.change.replace(' ', ' --set ')}  -> {suggestion.total / GIB:.2f} GiB {mark}")
    if not judged.fits and not any("data.max_seq_len" in s.change for s in judged.suggestions):
        out.print(f"  no data.max_seq_len of {MIN_USEFUL_SEQ} tokens or more fits with the rest of the recipe as it is")
    if not judged.fits and not judged.suggestions:
        floor = result.breakdown["base_weights"] + result.breakdown["cuda_context"]
        out.print(f"  no recipe setting makes it fit: the frozen base and the CUDA context alone take {floor / GIB:.2f} GiB")
    if judged.bigger_cards and not judged.fits and judged.state != "tight":
        out.print(f"  {'or a' if judged.suggestions else 'use a'} card with more memory: {', '.join(judged.bigger_cards)}")


def estimate_command(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML. Without one, describe the run with --model and the flags below."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help=f"Check against a card: {', '.join(GPUS)}."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Or the card's memory: 24GiB, 24GB (10^9 bytes), 24576MiB."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe field, e.g. --set train.micro_batch_size=4 (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", help="Recipe-free: a model folder, a config.json, a catalog name or a hub id."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Base precision: 4bit (QLoRA), 8bit or 16bit."),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per row (data.max_seq_len)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Rows per micro-batch (train.micro_batch_size)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="paged_adamw_8bit, paged_adamw_32bit, adamw_8bit or adamw_torch."),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="all-linear, or a comma list like q_proj,v_proj."),
    attn: Optional[str] = typer.Option(None, "--attn", help="Attention kernel: sdpa, eager or flash_attention_2."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="GPUs the job trains on: per-GPU memory under distributed.strategy (ddp replicates, fsdp shards)."),
    measure: bool = typer.Option(False, "--measure", help="Also run 3 real training steps on random tokens (CUDA only) and print the measured peak."),
    trace: bool = typer.Option(False, "--trace", help="Also run one real training step here (CPU is fine; loads the model) and print its peak of live tensor bytes by term."),
    solve_for: Optional[str] = typer.Option(None, "--solve", help="With --gpu/--gpu-memory: the largest max_seq_len or micro_batch_size that fits with the safety margin."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for machines instead of tables."),
) -> None:
    """Estimate the peak GPU memory of a training step, term by term, and whether it fits a card."""
    overrides = _flag_overrides(quant, rank, seq_len, batch, gradient_checkpointing, optimizer, target_modules, attn)
    config = _load(recipe, model, overrides + list(set_ or []))
    card = card_from_flags(gpu, gpu_memory)
    result = estimate(resolve(config.model.path), plan_from_recipe(config, processes=nproc))
    if result.arch.model_type and (note := untested_note(result.arch.model_type)):
        result = dataclasses.replace(result, notes=(*result.notes, note))
    judged = verdict(result, card) if card else None
    solved = _solve(result, card, solve_for) if solve_for else None
    traced = _trace(config, result) if trace else None
    measured = None
    if measure:
        # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
        from qlora_cli.estimate.measure import measure_peak

        measured = measure_peak(config)
    if as_json:
        print(json.dumps(to_json(result, judged, measured, traced, solved)))
        return
    _print_rich(result, judged, measured)
    if traced:
        terms = ", ".join(f"{LABELS.get(k, k)} {v:.3f}" for k, v in traced["terms_gib"].items() if v)
        out.print(f"traced one step ({traced['dtype']}, {traced['device']}): peak {traced['peak_gib']:.3f} GiB of live tensors "
                  f"vs {traced['estimated_gib']:.3f} GiB estimated without the device terms ({traced['error_pct']:+.1f}%); at the peak: {terms}")
        for note in traced["notes"]:
            out.print(f"  note: {note}")
    if solved:
        value = solved["value"]
        if value is None:
            floor = "1 row" if solved["field"] == "micro_batch_size" else f"{MIN_USEFUL_SEQ} tokens"
            out.print(f"[red]--solve {solved['field']}:[/] nothing from {floor} up fits {card.name} with the safety margin; see the changes above")
        else:
            out.print(f"--solve {solved['field']}: [bold]{value}[/] is the largest that fits {card.name} with the safety margin "
                      f"(--set {solved['key']}={value}, {solved['total_gib']:.2f} GiB)")
