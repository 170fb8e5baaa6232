"""Per GGUF type, the figures `qlora merge --format gguf` reports for a finished run, in one table:
file size, llama.cpp tokenization agreement with transformers, greedy agreement with the merged
model, exact match (llama.cpp and merged), answers stopping by themselves, and the merge's wall time.

    .venv/bin/python scripts/gguf_figures.py runs/quickstart [--types f16,bf16,q8_0,q4_k_m] [--samples 50] [--imatrix]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qlora_cli.export import gguf_writer
from qlora_cli.merge import fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--types", default=",".join(gguf_writer.GGUF_TYPES))
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--imatrix", action="store_true", help="k-quants and q4_0 guided by an importance matrix")
    parser.add_argument("--lora", action="store_true", help="also --format gguf-lora (f16 base + adapter)")
    args = parser.parse_args()
    rows = []
    kinds = [("gguf", gguf_type) for gguf_type in args.types.split(",")] + ([("gguf-lora", "f16")] if args.lora else [])
    with tempfile.TemporaryDirectory() as scratch:
        for index, (fmt, gguf_type) in enumerate(kinds):
            started = time.perf_counter()
            result = fold.run_merge(args.run_dir, Path(scratch) / f"{index}", dtype="fp32", formats=fmt, gguf_type=gguf_type,
                                    verify_samples=args.samples, show_progress=False,
                                    imatrix=args.imatrix and gguf_type in gguf_writer.QUANTIZED_TYPES)
            exported = result.report["gguf"]
            check, logits = exported["llamacpp"], (exported.get("verification") or {}).get("logits") or {}
            tokens = check["tokenization"]
            size = exported["bytes"] + exported.get("adapter", {}).get("bytes", 0)
            rows.append([
                f"{gguf_type}{' + LoRA' if fmt == 'gguf-lora' else ''}", f"{size / 1e6:.1f} MB",
                f"{tokens['identical']}/{tokens['texts']} (+{tokens['explained']} fractions)", f"{100 * check['greedy_agreement']:.0f}%",
                f"{100 * check['exact_match']:.0f}% ({100 * check['merged_exact_match']:.0f}%)",
                f"{check['stopped']}/{check['rows']} ({check['merged_stopped']}/{check['rows']})",
                f"{100 * logits['top1_agreement']:.2f}%" if logits else "-",
                "PASS" if not result.gguf_failures else "FAIL: " + "; ".join(result.gguf_failures),
                f"{time.perf_counter() - started:.0f} s",
            ])
            print(json.dumps({"type": gguf_type, "format": fmt, "llamacpp": check, "bytes": size}), flush=True)
    header = ["type", "file", "tokenization = transformers", "greedy = merged", "exact match (merged)", "stopped (merged)",
              "top-1 (transformers load)", "checks", "merge time"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
