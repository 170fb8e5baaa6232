"""The estimate against the trace for the objectives beyond SFT: one real DPO step and one real GRPO
step (generation + loss) of `qlora train` on a tiny Llama, traced on CPU
(qlora_cli/estimate/trace_trainer.py), next to `qlora estimate`'s arithmetic for the same recipe.

    PYTHONPATH=. .venv/bin/python scripts/estimate_objectives.py [--only N,M] [--write docs/estimate-validation.md]

The data fill the estimate's worst case: DPO prompts + responses cut to exactly max_seq_len,
GRPO prompts of max_seq_len tokens and a model that never samples its end of sequence early (its
eos logit is zero, about 1/1024), so the batch of completions is max_completion_len long. Without --write it
prints the table; with it, it replaces the objectives section of the document.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qlora_cli.estimate import estimate, plan_from_recipe, resolve  # noqa: E402
from qlora_cli.estimate.trace_trainer import trace_trainer_step  # noqa: E402
from qlora_cli.recipe.loader import validate_recipe  # noqa: E402
from tests.conftest import WORDS, build_tiny_llama, build_tiny_tokenizer  # noqa: E402

DEVICE_TERMS = ("allocator_overhead", "cuda_context")
MIB = 2**20
BEGIN, END = "<!-- objectives:begin -->", "<!-- objectives:end -->"
VOCAB = 1024

# (objective, overrides): 4-bit NF4, LoRA r=8 all-linear, float32 compute (the HF Trainer refuses bf16 on a
# CPU), sdpa, paged 8-bit AdamW.
ROWS = [
    ("dpo", {"seq": 256, "mb": 2, "ckpt": True}),
    ("dpo", {"seq": 256, "mb": 2, "ckpt": False}),
    ("dpo", {"seq": 256, "mb": 2, "ckpt": True, "loss": "standard"}),
    ("grpo", {"seq": 128, "mb": 4, "completion": 64, "ckpt": False}),
    ("grpo", {"seq": 128, "mb": 4, "completion": 64, "ckpt": True, "beta": 0.04}),
]


def tiny_model(folder: Path) -> Path:
    """The tiny Llama (vocabulary 1024) with the tests' word tokenizer; eos never sampled."""
    if not (folder / "config.json").is_file():
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_llama(VOCAB)
        with torch.no_grad():  # eos at logit 0 (~1/1024): GRPO's completions (padded to the longest) run to max_completion_len
            model.lm_head.weight[tokenizer.eos_token_id].zero_()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def words(count: int, offset: int) -> str:
    vocabulary = list(WORDS)
    return " ".join(vocabulary[(offset + i) % len(vocabulary)] for i in range(count))


def write_data(folder: Path, objective: str, seq: int) -> Path:
    path = folder / f"{objective}-{seq}.jsonl"
    if objective == "dpo":  # prompt + each response longer than seq: cut to exactly seq tokens
        rows = [{"prompt": words(seq // 2, i), "chosen": words(seq, i + 1), "rejected": words(seq, i + 2)} for i in range(16)]
    else:  # prompts of seq - 1 tokens: the longest the data allow (a prompt must leave room for a response)
        rows = [{"prompt": words(seq - 1, i)} for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_for(model: Path, data: Path, objective: str, row: dict):
    recipe = {
        "model": {"path": str(model), "dtype": "float32", "attn_implementation": "sdpa"},  # TrainingArguments refuses bf16 on CPU
        "quantization": {"bits": 4},
        "lora": {"r": 8, "dropout": 0.0},
        "data": {"train": str(data), "format": "preference" if objective == "dpo" else "prompt_only", "max_seq_len": row["seq"]},
        "train": {"objective": objective, "micro_batch_size": row["mb"], "gradient_checkpointing": row["ckpt"],
                  "loss_kernel": row.get("loss", "auto"), "optimizer": "paged_adamw_8bit", "max_steps": 2, "logging_steps": 1},
        "output": {"dir": "(trace)"},
    }
    if objective == "grpo":
        recipe["grpo"] = {"num_generations": 4, "max_completion_len": row["completion"], "beta": row.get("beta", 0.0),
                          "rewards": [{"function": "length_penalty", "target_tokens": 4}]}
    return validate_recipe(recipe, source="estimate objectives")


def describe(objective: str, row: dict) -> str:
    parts = [f"seq {row['seq']}", f"mb {row['mb']}"]
    if objective == "grpo":
        parts += [f"completion {row['completion']}", "4 generations", f"beta {row.get('beta', 0.0)}"]
    parts += ["ckpt" if row["ckpt"] else "no ckpt", row.get("loss", "auto loss")]
    return f"{objective} | " + ", ".join(parts)


def run_row(objective: str, row: dict, cache: Path) -> dict:
    model = tiny_model(cache / "tiny-llama-words")
    recipe = recipe_for(model, write_data(cache, objective, row["seq"]), objective, row)
    started = time.perf_counter()
    traced = trace_trainer_step(recipe)
    seconds = time.perf_counter() - started
    result = estimate(resolve(str(model)), plan_from_recipe(recipe))
    estimated = sum(v for k, v in result.breakdown.items() if k not in DEVICE_TERMS)
    return {"config": describe(objective, row), "traced": traced.peak, "estimated": estimated, "error": estimated / traced.peak - 1,
            "terms": traced.at_peak, "largest": traced.largest, "breakdown": result.breakdown, "seconds": seconds}


def table(results: list[dict]) -> str:
    lines = ["| # | objective | configuration | traced MiB | estimated MiB | error |", "|---|---|---|---:|---:|---:|"]
    for index, r in enumerate(results, 1):
        objective, config = r["config"].split(" | ")
        lines.append(f"| {index} | {objective} | {config} | {r['traced'] / MIB:.2f} | {r['estimated'] / MIB:.2f} | {100 * r['error']:+.1f}% |")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    document = path.read_text()
    section = f"{BEGIN}\n{text}\n{END}"
    path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, document, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated row numbers (1-based)")
    parser.add_argument("--write", type=Path, help="replace the objectives section of this markdown file")
    args = parser.parse_args()
    chosen = [int(n) for n in args.only.split(",")] if args.only else range(1, len(ROWS) + 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="qlora-objectives-") as cache:
        for number in chosen:
            objective, row = ROWS[number - 1]
            result = run_row(objective, row, Path(cache))
            results.append(result)
            print(f"{number:2d} {result['config']:70s} traced {result['traced'] / MIB:9.2f} est {result['estimated'] / MIB:9.2f} "
                  f"{100 * result['error']:+6.1f}%  ({result['seconds']:.0f}s)", flush=True)
            print(f"     trace {({k: round(v / MIB, 3) for k, v in result['terms'].items()})}", flush=True)
            print(f"     est   {({k: round(v / MIB, 3) for k, v in result['breakdown'].items() if k not in DEVICE_TERMS})}", flush=True)
            print("     largest at the peak: " + ", ".join(f"{s / MIB:.2f} {t} {op}" for s, t, op in result["largest"]), flush=True)
    print(table(results))
    if args.write:
        write_section(args.write, table(results))


if __name__ == "__main__":
    main()
