"""Published peak-memory figures of QLoRA/LoRA runs next to `qlora estimate` of the same run,
expressed as a Plan with the run's own stack where we can model it (peft's fp32 upcast of the
unquantized base, full-logit loss, rank, targets, precision), and each remaining difference named.

    PYTHONPATH=. .venv/bin/python scripts/estimate_published.py [--write docs/estimate-validation.md]

A row is a measured peak (GB as published), an OOM on a card, or the largest sequence length that
fit a card. The script fails (exit 1) if a run that ran out of memory is called "fits", or if our
largest fitting length exceeds a published maximum (the answers must be conservative).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_cli.estimate import GIB, Plan, estimate, resolve  # noqa: E402
from qlora_cli.estimate.advice import FITS, solve, state_of  # noqa: E402
from qlora_cli.estimate.architecture import FUSED, PER_EXPERT, from_config  # noqa: E402
from qlora_cli.estimate.catalog import find_model  # noqa: E402

BEGIN, END = "<!-- published:begin -->", "<!-- published:end -->"
DEVICE_TERMS = ("allocator_overhead", "cuda_context")

LITGPT = "LitGPT resource tables (tutorials/resource-tables.md, A100-SXM4-40GB, 10/2023)"
LITGPT_STACK = ("bf16-true (bf16 LoRA, bf16 AdamW states), r 8 on q,v, micro-batch 1, no checkpointing, longest Alpaca "
                "row 1304 tokens (the peak row may be shorter), LitGPT's lm_head chunks; peak = max_memory_allocated; 4-bit rows: "
                "modelled, bitsandbytes 0.41.1 keeping every 4-bit matmul's input for backward (MatMul4Bit ctx.tensors = (A, B))")
UNSLOTH_70B = "Unsloth, Llama 3.3 blog / README 'Llama 3.3 (70B) max. context length' (HF + FA2 column)"
UNSLOTH_8B = "Unsloth README 'Llama 3.1 (8B) max. context length' (HF + FA2 column)"
# The cards behind the 8B table's "16 GB" and "24 GB" columns: Unsloth's Llama 3.1 blog benchmarks the 8B
# on "1xL4 24GB" and runs its notebooks on "a free Tesla T4" (16 GB class); their usable MiB from the catalog.
T4_GIB, L4_GIB = 15360 / 1024, 23034 / 1024
HF_STACK = ("TRL + peft + FA2, r 32 all-linear, batch 1, rows padded to the length, checkpointing; modelled: peft's "
            "fp32 upcast of embeddings/head/norms (so the residual stream and the checkpointed layer inputs are fp32), "
            "transformers 4.4x's loss (fp32 logits + a shifted fp32 copy: 14 B/logit); not modelled: fp32 norm outputs "
            "inside a layer, FA2's own buffers, the allocator's fragmentation with rows of varying length")
XTUNER = "xtuner Mixtral README (InternLM/xtuner, configs/mixtral): 'QLoRA only need a single A100-80G'"
XTUNER_STACK = ("transformers 4.36-era Mixtral (one nn.Linear per expert, so NF4 experts), DeepSpeed ZeRO-2 on one GPU; "
                "r, length and targets assumed (r 64 all-linear, 2048 tokens, micro-batch 1, checkpointing): not given there")
XTUNER_PLAN = dict(lora_r=64, seq_len=2048, micro_batch=1, gradient_checkpointing=True, optimizer="adamw_torch", fused_loss=False,
                   upcast_frozen=True, loss_bytes_per_logit=14)
OURS_PLAN = dict(lora_r=64, seq_len=2048, micro_batch=1, gradient_checkpointing=True)  # `qlora train` defaults otherwise
QLORA_PAPER = "QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), abstract; artidoro/qlora scripts/finetune_guanaco_65b.sh"
QLORA_STACK = ("r 64 all linear layers, micro-batch 4 of rows <= 528 tokens (worst case all 528), checkpointing, paged_adamw_32bit, "
               "eager attention, fp32 upcast of the unquantized base (prepare_model_for_kbit_training)")
QLORA_PLAN = dict(lora_r=64, seq_len=528, micro_batch=4, packing=False, gradient_checkpointing=True, optimizer="paged_adamw_32bit",
                  fused_loss=False, attention="eager", upcast_frozen=True, loss_bytes_per_logit=14)
LITGPT_PLAN = dict(lora_r=8, target_modules=("q_proj", "v_proj"), seq_len=1304, micro_batch=1, packing=False,
                   gradient_checkpointing=False, optimizer="adamw_torch", fused_loss=False, attention="sdpa")
LITGPT_4BIT = dict(LITGPT_PLAN, bnb_keeps_input=True)
HF_PLAN = dict(lora_r=32, lora_dropout=0.0, micro_batch=1, packing=False, gradient_checkpointing=True, optimizer="adamw_8bit",
               fused_loss=False, attention="flash_attention_2", upcast_frozen=True, loss_bytes_per_logit=14)


ANSWERAI = "Answer.AI fsdp_qlora benchmarks_03_2024.md (2x RTX 3090/4090, Llama-2-7B, peak reserved GiB per GPU)"
ANSWERAI_STACK = ("their train.py: pure bf16 (LoRA weights, gradients and AdamW states bf16: ours fp32), r 64 all linear, dropout 0.1, "
                  "full-length dummy rows, reentrant checkpointing, sdpa, transformers 4.38 loss (14 B/logit); figure = max_memory_reserved "
                  "(compared: our total less the CUDA context); loading quantizes on the GPU (low_memory), residue in the pool not modelled")
ANSWERAI_PLAN = dict(lora_r=64, lora_dropout=0.1, packing=True, gradient_checkpointing=True, optimizer="adamw_torch", fused_loss=False,
                     attention="sdpa", loss_bytes_per_logit=14, processes=2, strategy="fsdp")
FMS = ("fms-hf-tuning / fms-acceleration benchmark (scripts/benchmarks/refs/a100_80gb.csv, 02/2025, baseline-peft-bnb, "
       "A100-80GB, peak_torch_mem_alloc)")
FMS_STACK = ("SFTTrainer + peft + bnb NF4 (TRL's k-bit preparation: fp32 embeddings/head/norms), r 16 on q,k,v,o, dropout 0.1, packed "
             "4096, FA2, checkpointing, adamw_torch, transformers 4.4x loss (14 B/logit); Mixtral experts one nn.Linear each (NF4); "
             "2 GPUs = FSDP")
FMS_PLAN = dict(lora_r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), lora_dropout=0.1, seq_len=4096, packing=True,
                gradient_checkpointing=True, optimizer="adamw_torch", fused_loss=False, attention="flash_attention_2", upcast_frozen=True,
                loss_bytes_per_logit=14)
FMS_FSDP = dict(FMS_PLAN, processes=2, strategy="fsdp")


@dataclass(frozen=True)
class Row:
    source: str
    model: str
    setting: str
    card: str
    card_gib: float
    plan: dict
    stack: str
    peak_gb: Optional[float] = None  # published peak in GB (10^9)
    peak_gib: Optional[float] = None  # published peak in GiB
    reserved: bool = False  # the published peak is max_memory_reserved (compared with our total less the CUDA context)
    oom: bool = False
    max_seq: Optional[int] = None  # published largest length that fit the card
    ran: bool = False  # published as running on the card, no figure
    upper_bound: bool = False  # the plan is the run's worst case (its batches were mostly shorter)
    expert_layout: Optional[str] = None


ROWS = [
    Row(LITGPT, "meta-llama/Llama-2-7b-hf", "nf4 + dq", "A100 40GB", 40, LITGPT_4BIT, LITGPT_STACK, peak_gb=13.84),
    Row(LITGPT, "meta-llama/Llama-2-7b-hf", "nf4", "A100 40GB", 40, {**LITGPT_4BIT, "double_quant": False}, LITGPT_STACK, peak_gb=14.14),
    Row(LITGPT, "meta-llama/Llama-2-13b-hf", "nf4 + dq", "A100 40GB", 40, LITGPT_4BIT, LITGPT_STACK, peak_gb=22.55),
    Row(LITGPT, "meta-llama/Llama-2-13b-hf", "nf4", "A100 40GB", 40, {**LITGPT_4BIT, "double_quant": False}, LITGPT_STACK, peak_gb=23.14),
    Row(LITGPT, "meta-llama/Llama-2-7b-hf", "bf16, micro-batch 1", "A100 40GB", 40, {**LITGPT_PLAN, "bits": 16}, LITGPT_STACK, peak_gb=21.30),
    Row(LITGPT, "meta-llama/Llama-2-7b-hf", "bf16, micro-batch 2", "A100 40GB", 40, {**LITGPT_PLAN, "bits": 16, "micro_batch": 2}, LITGPT_STACK, peak_gb=29.07),
    Row(LITGPT, "meta-llama/Llama-2-7b-hf", "bf16, micro-batch 4", "A100 40GB", 40, {**LITGPT_PLAN, "bits": 16, "micro_batch": 4}, LITGPT_STACK, oom=True),
    Row(LITGPT, "meta-llama/Llama-2-13b-hf", "bf16, micro-batch 1", "A100 40GB", 40, {**LITGPT_PLAN, "bits": 16}, LITGPT_STACK, peak_gb=38.12),
    Row(LITGPT, "meta-llama/Llama-2-13b-hf", "bf16, micro-batch 2", "A100 40GB", 40, {**LITGPT_PLAN, "bits": 16, "micro_batch": 2}, LITGPT_STACK, oom=True),
    Row(UNSLOTH_70B, "meta-llama/Llama-3.3-70B-Instruct", "QLoRA, any length", "48 GB", 48, {**HF_PLAN, "seq_len": 256}, HF_STACK, oom=True),
    Row(UNSLOTH_70B, "meta-llama/Llama-3.3-70B-Instruct", "QLoRA, largest length", "80 GB", 80, HF_PLAN, HF_STACK, max_seq=6916),
    Row(UNSLOTH_8B, "meta-llama/Llama-3.1-8B-Instruct", "QLoRA, any length", "8 GB", 8, {**HF_PLAN, "seq_len": 256}, HF_STACK, oom=True),
    Row(UNSLOTH_8B, "meta-llama/Llama-3.1-8B-Instruct", "QLoRA, largest length", "16 GB (T4: 15 GiB)", T4_GIB, HF_PLAN, HF_STACK,
        max_seq=2551),
    Row(UNSLOTH_8B, "meta-llama/Llama-3.1-8B-Instruct", "QLoRA, largest length", "24 GB (L4: 22.5 GiB)", L4_GIB, HF_PLAN, HF_STACK,
        max_seq=5789),
    Row(UNSLOTH_8B, "meta-llama/Llama-3.1-8B-Instruct", "QLoRA, largest length", "80 GB", 80, HF_PLAN, HF_STACK, max_seq=28454),
    Row(XTUNER, "mistralai/Mixtral-8x7B-Instruct-v0.1", "QLoRA, experts NF4 (per-expert nn.Linear)", "A100 80GB", 80, XTUNER_PLAN,
        XTUNER_STACK, ran=True, expert_layout=PER_EXPERT),
    Row(XTUNER, "mistralai/Mixtral-8x7B-Instruct-v0.1", "QLoRA as installed here (fused 16-bit experts)", "A100 80GB", 80, OURS_PLAN,
        "the same recipe with the installed transformers 5, whose fused experts bitsandbytes leaves 16-bit", expert_layout=FUSED),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", "QLoRA FSDP x2, batch 1, 512 tokens", "RTX 3090 24GB", 24, {**ANSWERAI_PLAN, "seq_len": 512},
        ANSWERAI_STACK, peak_gib=4.98, reserved=True),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", "QLoRA FSDP x2, batch 1, 2048 tokens", "RTX 3090 24GB", 24, {**ANSWERAI_PLAN, "seq_len": 2048},
        ANSWERAI_STACK, peak_gib=5.21, reserved=True),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", "QLoRA FSDP x2, batch 4, 2048 tokens", "RTX 3090 24GB", 24,
        {**ANSWERAI_PLAN, "seq_len": 2048, "micro_batch": 4}, ANSWERAI_STACK, peak_gib=11.22, reserved=True),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", "QLoRA FSDP x2, batch 10, 2048 tokens", "RTX 3090 24GB", 24,
        {**ANSWERAI_PLAN, "seq_len": 2048, "micro_batch": 10}, ANSWERAI_STACK, peak_gib=20.97, reserved=True),
    Row(ANSWERAI, "meta-llama/Llama-2-7b-hf", "LoRA (bf16 base) FSDP x2, batch 6, 2048 tokens", "RTX 3090 24GB", 24,
        {**ANSWERAI_PLAN, "bits": 16, "seq_len": 2048, "micro_batch": 6}, ANSWERAI_STACK, peak_gib=21.35, reserved=True),
    Row(FMS, "mistralai/Mistral-7B-v0.1", "QLoRA, micro-batch 4", "A100 80GB", 80, {**FMS_PLAN, "micro_batch": 4}, FMS_STACK, peak_gb=20.669),
    Row(FMS, "mistralai/Mistral-7B-v0.1", "QLoRA, micro-batch 8", "A100 80GB", 80, {**FMS_PLAN, "micro_batch": 8}, FMS_STACK, peak_gb=37.003),
    Row(FMS, "mistralai/Mixtral-8x7B-Instruct-v0.1", "QLoRA (NF4 experts), micro-batch 4", "A100 80GB", 80, {**FMS_PLAN, "micro_batch": 4},
        FMS_STACK, peak_gb=42.794, expert_layout=PER_EXPERT),
    Row(FMS, "mistralai/Mixtral-8x7B-Instruct-v0.1", "QLoRA (NF4 experts), micro-batch 8", "A100 80GB", 80, {**FMS_PLAN, "micro_batch": 8},
        FMS_STACK, peak_gb=60.546, expert_layout=PER_EXPERT),
    Row(FMS, "meta-llama/Llama-2-70b-hf", "QLoRA, micro-batch 4", "A100 80GB", 80, {**FMS_PLAN, "micro_batch": 4}, FMS_STACK, oom=True),
    Row(FMS, "meta-llama/Llama-2-70b-hf", "QLoRA FSDP x2, micro-batch 2", "A100 80GB", 80, {**FMS_FSDP, "micro_batch": 2}, FMS_STACK,
        peak_gb=46.685),
    Row(FMS, "meta-llama/Llama-2-70b-hf", "QLoRA FSDP x2, micro-batch 4", "A100 80GB", 80, {**FMS_FSDP, "micro_batch": 4}, FMS_STACK, oom=True),
    Row(QLORA_PAPER, "huggyllama/llama-65b", "Guanaco-65B QLoRA", "48 GB", 48, QLORA_PLAN, QLORA_STACK, ran=True, upper_bound=True),
]


def architecture(row: Row):
    if row.expert_layout:
        hub_id, config = find_model(row.model)
        return from_config(config, hub_id, "shipped catalog", expert_layout=row.expert_layout)
    return resolve(row.model)


def evaluate(row: Row) -> dict:
    arch, plan = architecture(row), Plan(**row.plan)
    card = int(row.card_gib * GIB)
    result = estimate(arch, plan)
    allocated = sum(v for k, v in result.breakdown.items() if k not in DEVICE_TERMS)
    out = {"row": row, "total": result.total, "pageable": result.pageable, "allocated": allocated, "state": state_of(result.total, card), "problems": []}
    if row.peak_gb is not None:
        out["error"] = allocated / (row.peak_gb * 1e9) - 1
    if row.peak_gib is not None:
        compared = result.total - result.breakdown["cuda_context"] if row.reserved else allocated
        out["compared"], out["error"] = compared, compared / (row.peak_gib * GIB) - 1
    if row.oom and out["state"] == FITS:
        out["problems"].append("an OOM run is called fits")
    if row.ran and not row.upper_bound and out["state"] == "does not fit":
        out["problems"].append("a run that ran is called does not fit")
    if row.max_seq is not None:
        out["solved"] = solve(arch, plan, card, "max_seq_len")
        if out["solved"] and out["solved"] > row.max_seq:
            out["problems"].append(f"largest fitting length {out['solved']} exceeds the published {row.max_seq}")
    return out


def published(r: dict) -> str:
    row = r["row"]
    if row.peak_gb is not None:
        return f"{row.peak_gb:.2f} GB peak"
    if row.peak_gib is not None:
        return f"{row.peak_gib:.2f} GiB peak {'reserved' if row.reserved else 'allocated'}"
    if row.oom:
        return "OOM"
    if row.ran:
        return "ran"
    return f"largest length {row.max_seq:,}" if row.max_seq else "(our stack only)"


def ours(r: dict) -> str:
    row = r["row"]
    if row.peak_gb is not None:
        return f"{r['allocated'] / 1e9:.2f} GB allocated ({100 * r['error']:+.0f}%), {r['state']} (total {r['total'] / GIB:.1f} GiB)"
    if row.peak_gib is not None:
        what = "reserved (total less context)" if row.reserved else "allocated"
        return f"{r['compared'] / GIB:.2f} GiB {what} ({100 * r['error']:+.0f}%), {r['state']} (total {r['total'] / GIB:.1f} GiB)"
    if row.max_seq is not None:
        if not r["solved"]:
            return "does not fit at any length >= 256"
        return f"largest that fits: {r['solved']:,} ({100 * (r['solved'] / row.max_seq - 1):+.0f}%)"
    worst = "worst case: " if row.upper_bound else ""
    paging = f"; {r['pageable'] / GIB:.1f} GiB of paged optimizer states can spill to CPU" if r["pageable"] else ""
    return f"{worst}{r['state']} (total {r['total'] / GIB:.1f} GiB at {row.plan.get('seq_len', 2048)} tokens{paging})"


def table(results: list[dict]) -> str:
    lines = ["| source | model | setting | card | published | our estimate | stack differences |", "|---|---|---|---|---|---|---|"]
    for r in results:
        row = r["row"]
        lines.append(f"| {row.source} | {row.model} | {row.setting} | {row.card} | {published(r)} | {ours(r)} | {row.stack} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the published-figures section of this markdown file")
    args = parser.parse_args()
    results = [evaluate(row) for row in ROWS]
    text = table(results)
    print(text)
    problems = [f"{r['row'].model} {r['row'].setting} on {r['row'].card}: {p}" for r in results for p in r["problems"]]
    for problem in problems:
        print("PROBLEM:", problem)
    if args.write:
        document = args.write.read_text()
        document = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", document, flags=re.S)
        args.write.write_text(document)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
