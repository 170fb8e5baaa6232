"""The estimate against the trace: one real training step per configuration, traced on CPU
(qlora_cli/estimate/trace.py), next to `qlora estimate`'s arithmetic for the same recipe.

    PYTHONPATH=. .venv/bin/python scripts/estimate_grid.py [--only N,M] [--write docs/estimate-validation.md]

Models: tiny random-weight models of every family we claim (tests/families.py, vocabulary 1024)
and, where marked, the demo model (models/SmolLM2-135M-Instruct). The compared figure is the
estimate without its device terms (CUDA context, allocator overhead): what the step allocates.
Without --write it prints the table; with it, it replaces the grid section of the document.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_cli.estimate import estimate, plan_from_recipe, resolve  # noqa: E402
from qlora_cli.estimate.trace import trace_step  # noqa: E402
from qlora_cli.recipe.loader import validate_recipe  # noqa: E402
from tests.families import build_family  # noqa: E402

DEMO = ROOT / "models" / "SmolLM2-135M-Instruct"
DEVICE_TERMS = ("allocator_overhead", "cuda_context")
MIB = 2**20
BEGIN, END = "<!-- grid:begin -->", "<!-- grid:end -->"

# (model, overrides) rows: defaults are QLoRA 4-bit, LoRA r=8 all-linear, dropout 0.05, packing,
# micro-batch 1, checkpointing on, loss kernel auto (chunked where the model allows it, else standard),
# paged_adamw_8bit, bf16 compute, sdpa.
GRID = [
    ("llama", {}),
    ("llama", {"seq": 1024}),
    ("llama", {"seq": 4096}),
    ("llama", {"seq": 1024, "mb": 4}),
    ("llama", {"seq": 1024, "ckpt": False}),
    ("llama", {"seq": 1024, "loss": "standard"}),
    ("llama", {"seq": 1024, "mb": 4, "packing": False}),
    ("llama", {"seq": 1024, "bits": 16}),
    ("llama", {"seq": 1024, "bits": 16, "ckpt": False, "loss": "standard"}),
    ("llama", {"seq": 1024, "method": "dora"}),
    ("llama", {"seq": 1024, "method": "ia3"}),
    ("llama", {"seq": 1024, "method": "prefix_tuning", "packing": False, "ckpt": False}),
    ("llama", {"seq": 1024, "method": "bottleneck"}),
    ("llama", {"seq": 4096, "mb": 4, "ckpt": False, "loss": "standard"}),
    ("mistral", {"seq": 1024}),
    ("qwen2", {"seq": 1024}),
    ("qwen2", {"seq": 4096, "ckpt": False}),
    ("qwen3", {"seq": 1024}),
    ("qwen3", {"seq": 1024, "mb": 4, "ckpt": False}),
    ("gemma2", {"seq": 1024, "attn": "eager"}),
    ("gemma2", {"seq": 1024, "attn": "eager", "ckpt": False}),
    ("gemma2", {"seq": 256, "attn": "eager"}),  # short: the soft-capped chunked loss is the peak
    ("gemma3", {"seq": 1024}),
    ("phi3", {"seq": 1024}),
    ("phi3", {"seq": 1024, "ckpt": False, "bits": 16}),
    ("mixtral", {"seq": 1024, "dropout": 0.0}),  # peft's expert ParamWrapper refuses lora dropout
    ("mixtral", {"seq": 1024, "ckpt": False, "dropout": 0.0}),
    ("qwen2_moe", {"seq": 1024, "dropout": 0.0}),
    ("qwen2_moe", {"seq": 1024, "ckpt": False, "dropout": 0.0}),  # every layer's shared expert kept
    ("llama", {"seq": 1024, "mb": 4, "packing": False, "dropout": 0.0}),  # LoRA input gradient without dropout
    ("demo", {"seq": 128}),
    ("demo", {"seq": 256, "ckpt": False}),
    ("demo", {"seq": 256, "loss": "standard", "bits": 16}),
]


def model_folder(family: str, cache: Path) -> Path:
    if family == "demo":
        return DEMO
    folder = cache / family
    if not (folder / "config.json").is_file():
        build_family(family, 1024).save_pretrained(folder)
    return folder


def recipe_for(folder: Path, row: dict):
    method = row.get("method", "lora")
    adapter = {"method": "lora" if method == "dora" else method}
    if method == "prefix_tuning":
        adapter["prefix_tuning"] = {"num_virtual_tokens": 16}
    recipe = {
        "model": {"path": str(folder), "dtype": "bfloat16", "attn_implementation": row.get("attn", "sdpa")},
        "quantization": {"bits": row.get("bits", 4)},
        "adapter": adapter,
        "data": {"train": "(grid)", "format": "text", "max_seq_len": row.get("seq", 128), "packing": row.get("packing", True)},
        "train": {"micro_batch_size": row.get("mb", 1), "gradient_checkpointing": row.get("ckpt", True),
                  "loss_kernel": row.get("loss", "auto"), "optimizer": "paged_adamw_8bit"},
        "output": {"dir": "(grid)"},
    }
    if adapter["method"] == "lora":
        recipe["lora"] = {"r": 8, "dropout": row.get("dropout", 0.05), "use_dora": method == "dora"}
    return validate_recipe(recipe, source="estimate grid")


def describe(family: str, row: dict) -> str:
    parts = [f"{row.get('bits', 4)}-bit", row.get("method", "lora"), f"seq {row.get('seq', 128)}", f"mb {row.get('mb', 1)}",
             "ckpt" if row.get("ckpt", True) else "no ckpt", row.get("loss", "auto loss"), "packed" if row.get("packing", True) else "padded"]
    if row.get("attn"):
        parts.append(row["attn"])
    if row.get("dropout") == 0.0:
        parts.append("no dropout")
    return f"{'SmolLM2-135M' if family == 'demo' else 'tiny ' + family} | " + ", ".join(parts)


def run_row(family: str, row: dict, cache: Path) -> dict:
    folder = model_folder(family, cache)
    recipe = recipe_for(folder, row)
    started = time.perf_counter()
    traced = trace_step(recipe)
    seconds = time.perf_counter() - started
    result = estimate(resolve(str(folder)), plan_from_recipe(recipe))
    estimated = sum(v for k, v in result.breakdown.items() if k not in DEVICE_TERMS)
    return {"config": describe(family, row), "traced": traced.peak, "estimated": estimated, "error": estimated / traced.peak - 1,
            "phase": traced.phase_at_peak, "terms": traced.as_estimate_terms(), "largest": traced.largest, "breakdown": result.breakdown, "seconds": seconds}


LOG_ROW = re.compile(r"^\s*\d+ (?P<config>.+?)\s+traced\s+(?P<traced>[\d.]+) est\s+(?P<est>[\d.]+)\s+(?P<err>[+-][\d.]+)%.*peak in (?P<phase>\w+)\)")


def rows_from_log(text: str) -> list[dict]:
    """The rows a run printed (figures in MiB as printed, error as printed)."""
    rows = []
    for match in (LOG_ROW.match(line) for line in text.splitlines()):
        if match:
            rows.append({"config": match["config"].strip(), "traced": float(match["traced"]) * MIB, "estimated": float(match["est"]) * MIB,
                         "error": float(match["err"]) / 100, "phase": match["phase"]})
    return rows


def table(results: list[dict]) -> str:
    lines = ["| # | model | configuration | traced MiB | estimated MiB | error | peak in |", "|---|---|---|---:|---:|---:|---|"]
    for index, r in enumerate(results, 1):
        model, config = r["config"].split(" | ")
        lines.append(f"| {index} | {model} | {config} | {r['traced'] / MIB:.2f} | {r['estimated'] / MIB:.2f} | {100 * r['error']:+.1f}% | {r['phase']} |")
    worst = max(results, key=lambda r: abs(r["error"]))
    errors = sorted(abs(r["error"]) for r in results)
    lines += ["", f"{len(results)} rows; median |error| {100 * errors[len(errors) // 2]:.1f}%, worst {100 * worst['error']:+.1f}% "
              f"({worst['config']}); {sum(abs(r['error']) <= 0.05 for r in results)} of {len(results)} within 5%."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated row numbers (1-based)")
    parser.add_argument("--write", type=Path, help="replace the grid section of this markdown file")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/qlora-estimate-grid"), help="where the tiny models are saved")
    parser.add_argument("--from-log", type=Path, help="rebuild the table from the printed lines of an earlier run's log")
    args = parser.parse_args()
    if args.from_log:
        results = rows_from_log(args.from_log.read_text())
        print(table(results))
        if args.write:
            write_section(args.write, table(results))
        return
    chosen = [int(n) for n in args.only.split(",")] if args.only else range(1, len(GRID) + 1)
    results = []
    for number in chosen:
        family, row = GRID[number - 1]
        result = run_row(family, row, args.cache)
        results.append(result)
        print(f"{number:2d} {result['config']:70s} traced {result['traced'] / MIB:9.2f} est {result['estimated'] / MIB:9.2f} "
              f"{100 * result['error']:+6.1f}%  ({result['seconds']:.0f}s, peak in {result['phase']})", flush=True)
        terms = {k: round(v / MIB, 3) for k, v in result["terms"].items()}
        shown = {k: round(v / MIB, 3) for k, v in result["breakdown"].items() if k not in DEVICE_TERMS}
        print(f"     trace {terms}\n     est   {shown}", flush=True)
        print("     largest at the peak: " + ", ".join(f"{size / MIB:.2f} {term} {op}" for size, term, op in result["largest"]), flush=True)
        if args.write:  # after every row: a run cut short still leaves the rows it finished
            write_section(args.write, table(results))
    print(table(results))


def write_section(path: Path, text: str) -> None:
    document = path.read_text()
    section = f"{BEGIN}\n{text}\n{END}"
    path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, document, flags=re.S))


if __name__ == "__main__":
    main()
