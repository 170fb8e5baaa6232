"""Training throughput, side by side in one run: a plain tutorial-style HF Trainer + peft +
bitsandbytes QLoRA script (a) against `qlora train` (b), same model, data, steps, seed and
effective batch. Each runs in its own process so peak memory is its own.

Prints, for each: non-padding tokens/s, peak memory (RSS on CPU, max allocated on CUDA),
final loss (and MFU on GPU); the last line is the ratio (b)/(a).

    .venv/bin/python scripts/bench_train.py                       # demo model, CPU
    .venv/bin/python scripts/bench_train.py --model PATH --steps 20 --micro-batch 8 --max-len 1024

The baseline follows the QLoRA tutorials: NF4 + double quant, prepare_model_for_kbit_training
(fp32 upcast of every non-quantized weight, reentrant gradient checkpointing), rows padded to
the longest of the batch by DataCollatorForSeq2Seq, paged 8-bit AdamW. Its compute dtype is the
one `qlora train` picks on this machine (fp32 on CPUs without native bf16), so the ratio measures
the training path, not a dtype choice; `--baseline-dtype bfloat16` runs the tutorials' literal bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [json.loads(line)["messages"][0]["content"].split("\n\n")[1] for line in (ROOT / "data/quickstart/train.jsonl").open()]


def make_rows(count: int, min_len: int, max_len: int, seed: int, tokenizer) -> list[dict]:
    """Copy task with log-uniform lengths: the prompt lists sentences, the completion repeats them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        target = int(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        picked, length = [], 0
        while length < target // 2 or not picked:
            sentence = rng.choice(SENTENCES)
            picked.append(sentence)
            length += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        text = " ".join(picked)
        rows.append({"prompt": f"Repeat these sentences exactly:\n{text}\nAnswer:", "completion": " " + text})
    return rows


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_baseline(args) -> dict:
    """(a) The tutorial script, written as the QLoRA tutorials write it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from qlora_cli.data.sources import load_rows
    from qlora_cli.data.splits import tokenize_rows
    from qlora_cli.model.loading import resolve_dtype
    from qlora_cli.recipe.schema import DataSection

    dtype = resolve_dtype(args.baseline_dtype)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = DataSection(train=args.data, format="prompt_completion", max_seq_len=args.max_len)
    dataset, _ = tokenize_rows(load_rows(args.data), data, tokenizer)  # same tokens and labels as (b)
    dataset = dataset.remove_columns(["length"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=dtype, device_map=device_map)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = Trainer(
        model=model,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        args=TrainingArguments(
            output_dir=str(Path(args.workdir) / "baseline"), per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, optim="paged_adamw_8bit", seed=args.seed,
            data_seed=args.seed, save_strategy="no", report_to=[], bf16=dtype == torch.bfloat16, disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        ),
    )
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "tokens": trainer.state.num_input_tokens_seen,
        "train_runtime": output.metrics["train_runtime"],
        "final_loss": losses[-1],
        "peak_memory_gib": peak_memory_gib(),
        "dtype": str(dtype),
    }


def run_ours(args) -> dict:
    """(b) `qlora train` on the same rows, through the real command line."""
    import yaml

    out = Path(args.workdir) / "ours"
    recipe = {
        "model": {"path": args.model},
        "quantization": {"bits": 4},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": args.data, "format": "prompt_completion", "max_seq_len": args.max_len},
        "train": {"max_steps": args.steps, "learning_rate": args.lr, "lr_scheduler": "constant", "warmup_steps": 0,
                  "micro_batch_size": args.micro_batch, "logging_steps": 1, "save_steps": 10**6, "seed": args.seed,
                  "gradient_checkpointing": True},
        "output": {"dir": str(out)},
    }
    recipe_path = Path(args.workdir) / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    overrides = [f"--set={item}" for item in args.ours_set or []]
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "train", str(recipe_path), "--force", *overrides], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"qlora train failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    runtime = next(entry["train_runtime"] for entry in metrics["log_history"] if "train_runtime" in entry)
    return {"tokens": metrics["tokens_seen"], "train_runtime": runtime, "final_loss": metrics["last_loss"],
            "peak_memory_gib": metrics["peak_memory_gib"], "dtype": metrics["compute_dtype"]}


# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10G": 70, "L4": 121}


def model_flops_per_token(model_path: str) -> float:
    """6 * parameters: forward + backward of a dense decoder, attention scores excluded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + config.vocab_size * h
    return 6 * params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--ours-set", action="append", metavar="KEY=VALUE",
                        help="Extra recipe override for (b), e.g. train.loss_kernel=standard (repeatable).")
    parser.add_argument("--variant", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # child process: run one side, print its JSON
        print(json.dumps((run_baseline if args.variant == "baseline" else run_ours)(args)))
        return

    from transformers import AutoTokenizer

    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = make_rows(args.steps * args.micro_batch, args.min_len, args.max_len, args.seed, tokenizer)
    data = workdir / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["--model", args.model, "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--rank", str(args.rank),
              "--lr", str(args.lr), "--max-len", str(args.max_len), "--seed", str(args.seed), "--baseline-dtype", args.baseline_dtype,
              "--data", str(data), "--workdir", str(workdir), *(f"--ours-set={item}" for item in args.ours_set or [])]
    results = {}
    for variant in ("baseline", "ours"):
        started = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--variant", variant, *common], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{variant} failed:\n{child.stderr[-3000:]}")
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        results[variant]["wall_s"] = time.perf_counter() - started

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    flops = model_flops_per_token(args.model)
    print(f"device: {device}; model: {args.model}; {args.steps} steps x {args.micro_batch} rows, lengths {args.min_len}-{args.max_len} tokens")
    for name, label in (("baseline", "(a) HF+peft tutorial"), ("ours", "(b) qlora train")):
        r = results[name]
        r["tokens_per_s"] = r["tokens"] / r["train_runtime"]
        line = (f"{label:22s} dtype {r['dtype'].removeprefix('torch.'):9s} non-padding tokens/s {r['tokens_per_s']:8.1f}  "
                f"peak memory {r['peak_memory_gib']:.2f} GiB  final loss {r['final_loss']:.4f}")
        peak = next((tflops for card, tflops in PEAK_BF16_TFLOPS.items() if card in device), None)
        if peak:
            line += f"  MFU {r['tokens_per_s'] * flops / (peak * 1e12):.1%} (of {peak:g} TFLOP/s bf16 dense)"
        print(line)
    a, b = results["baseline"], results["ours"]
    print(f"ratio (b)/(a): tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.2f}x  peak memory {b['peak_memory_gib'] / a['peak_memory_gib']:.2f}x  "
          f"final loss {b['final_loss'] / a['final_loss']:.3f}x")


if __name__ == "__main__":
    main()
