"""Memory ground truth for `qlora estimate` (step 2 of scripts/gpu_check.py): random-weight models
of catalog shapes (scripts/gpu_models.py), a grid of recipes, each measured by the code of
`qlora estimate --measure` (estimate/measure.py: the model, loss kernel and optimizer `qlora train`
builds, 3 steps on worst-case random tokens) next to `qlora estimate` of the same recipe.
One JSON line per setting, written as soon as it is measured.

    python scripts/gpu_memory_grid.py --dry-run                 # the grid and its estimates, no GPU
    python scripts/gpu_memory_grid.py --models /tmp/m --out grid.jsonl --budget-s 120

The grid: Llama-3.2-1B's shape at 4-bit and 16-bit x 512 and 2048 tokens x micro-batch 1 and 4
x gradient checkpointing on and off (16 settings), then two points each on Qwen2.5-0.5B and
Llama-3.2-3B and one on Llama-3.1-8B, each only while the time budget allows.
To keep to the budget, one loaded model serves every setting that loads it alike (same model,
bits and checkpointing); the peak is reset after loading, so each setting's peak is its own steps'.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

GRID_MODEL = "meta-llama/Llama-3.2-1B"
# (model, bits, seq_len, micro_batch, gradient_checkpointing), ordered so that settings sharing a load are adjacent.
GRID = [(GRID_MODEL, bits, seq, batch, ckpt) for bits in (4, 16) for ckpt in (True, False) for seq in (512, 2048) for batch in (1, 4)]
EXTRA = [
    ("Qwen/Qwen2.5-0.5B", 4, 2048, 2, True), ("Qwen/Qwen2.5-0.5B", 16, 2048, 2, True),
    ("meta-llama/Llama-3.2-3B", 4, 2048, 2, True), ("meta-llama/Llama-3.2-3B", 4, 2048, 2, False),
    ("meta-llama/Llama-3.1-8B", 4, 2048, 2, True),
]
# Seconds a model's first setting needs beyond the others' (random weights drawn and saved, then loaded).
BUILD_SECONDS = {"Qwen/Qwen2.5-0.5B": 15, GRID_MODEL: 20, "meta-llama/Llama-3.2-3B": 35, "meta-llama/Llama-3.1-8B": 80}


def folder_name(model: str) -> str:
    return model.rpartition("/")[2]


def recipe_dict(path: str, bits: int, seq: int, batch: int, ckpt: bool) -> dict:
    """The recipe measured: qlora's defaults (NF4 + double quant, paged 8-bit AdamW, packing, loss
    kernel auto) with LoRA r=16 on all linear layers."""
    return {
        "model": {"path": path},
        "quantization": {"bits": bits},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": "(measure)", "format": "text", "max_seq_len": seq},
        "train": {"micro_batch_size": batch, "gradient_checkpointing": ckpt},
        "output": {"dir": "(measure)"},
    }


def estimated(recipe) -> dict:
    """`qlora estimate RECIPE --json`'s numbers for this recipe."""
    from qlora_cli.cli.estimate import to_json
    from qlora_cli.estimate import estimate, plan_from_recipe, resolve

    payload = to_json(estimate(resolve(recipe.model.path), plan_from_recipe(recipe)), None)
    breakdown = payload["breakdown"]
    return {
        "total_gib": payload["total_gib"],
        # What an allocator-reported peak can be compared with: the total less the two terms outside it.
        "allocated_gib": round(payload["total_gib"] - breakdown.get("cuda_context", 0) - breakdown.get("allocator_overhead", 0), 2),
        "breakdown": breakdown,
        "fused_loss": payload["plan"]["fused_loss"],
        "total_params": payload["total_params"],
    }


def dry_run() -> list[dict]:
    """Every setting with its estimate from the catalog shape: arithmetic only."""
    from qlora_cli.recipe.loader import validate_recipe

    rows = []
    for model, bits, seq, batch, ckpt in GRID + EXTRA:
        recipe = validate_recipe(recipe_dict(model, bits, seq, batch, ckpt), source="gpu_memory_grid")
        rows.append({"model": model, "bits": bits, "seq_len": seq, "micro_batch": batch, "gradient_checkpointing": ckpt,
                     "estimate": estimated(recipe)})
    return rows


class CachedBuild:
    """measure_peak builds the model for each recipe; this hands back the last one built while
    model, bits and checkpointing stay the same, and frees it before building another."""

    def __init__(self, build):
        self.build = build
        self.key = None
        self.built = None

    def __call__(self, recipe):
        import torch

        key = (recipe.model.path, recipe.quantization.bits, recipe.train.gradient_checkpointing)
        if key != self.key:
            self.key, self.built = None, None
            gc.collect()
            torch.cuda.empty_cache()
            self.built, self.key = self.build(recipe), key
        return self.built


def measure(models: Path, out: Path, budget_s: float) -> None:
    import torch
    from gpu_models import build, tokenizer_source

    from qlora_cli.estimate import measure as measure_module
    from qlora_cli.recipe.loader import validate_recipe

    started = time.perf_counter()
    source = tokenizer_source()
    if source is None:
        raise SystemExit("no demo tokenizer: run `qlora demo-model` or `bash scripts/gpu_check.sh --prepare`")
    cached = CachedBuild(measure_module.build_model)
    measure_module.build_model = cached
    built_models = set()
    with out.open("a") as sink:
        for model, bits, seq, batch, ckpt in GRID + EXTRA:
            row = {"model": model, "bits": bits, "seq_len": seq, "micro_batch": batch, "gradient_checkpointing": ckpt}
            left = budget_s - (time.perf_counter() - started)
            needed = 8 + (BUILD_SECONDS.get(model, 30) if model not in built_models else 0)
            if left < needed:
                row["skipped"] = f"time: {left:.0f} s left of the step's {budget_s:.0f} s, about {needed} s needed"
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                continue
            setting_started = time.perf_counter()
            try:
                folder = build(model, models / folder_name(model), source, device="cuda")
                built_models.add(model)
                recipe = validate_recipe(recipe_dict(str(folder), bits, seq, batch, ckpt), source="gpu_memory_grid")
                row["estimate"] = estimated(recipe)
                row["measured"] = measure_module.measure_peak(recipe)
                row["loss_kernel"] = cached.built[1].name
                row["estimate_over_measured_total"] = round(row["estimate"]["total_gib"] / row["measured"]["peak_total_gib"], 3)
                row["estimate_over_measured_allocated"] = round(row["estimate"]["allocated_gib"] / row["measured"]["peak_allocated_gib"], 3)
            except Exception as exc:  # one setting's failure (an OOM, a load error) is its row, not the end of the grid
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                gc.collect()
                torch.cuda.empty_cache()
            row["seconds"] = round(time.perf_counter() - setting_started, 1)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the grid with its estimates; no GPU needed")
    parser.add_argument("--models", type=Path, default=Path("/tmp/gpu_check/models"), help="where the random-weight models go")
    parser.add_argument("--out", type=Path, default=Path("memory_grid.jsonl"))
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop starting settings that would not finish in this many seconds")
    args = parser.parse_args()
    if args.dry_run:
        for row in dry_run():
            print(json.dumps(row))
        return
    measure(args.models, args.out, args.budget_s)


if __name__ == "__main__":
    main()
