"""The GPU check's results made readable: parsers for what its steps print (pytest's verbose lines
and junit XML, scripts/bench_train.py's lines, the memory grid's JSON lines) and gpu_check.md, whose
tables are laid out as docs/performance.md and docs/estimate-validation.md record them.
Stdlib only: scripts/gpu_check.py imports it before any wheel is installed."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

# ---- step 1: pytest -------------------------------------------------------------------------

_VERBOSE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def tests_from_junit(path: Path) -> list[dict]:
    """One entry per test case of a junit XML file: name, outcome, seconds, message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or found.text or "").strip()
                break
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        cases.append({"test": name, "outcome": outcome, "seconds": round(float(case.get("time") or 0), 1), "message": message[:500]})
    return cases


def tests_from_output(text: str) -> list[dict]:
    """The outcomes pytest -v printed before it was stopped (no junit file then)."""
    return [{"test": m.group(1), "outcome": m.group(2).lower(), "seconds": None, "message": ""}
            for m in (_VERBOSE.match(line) for line in text.splitlines()) if m]


# ---- step 3: scripts/bench_train.py -------------------------------------------------------------

_BENCH = re.compile(
    r"^\((?P<side>[ab])\) .*?dtype (?P<dtype>\S+)\s+non-padding tokens/s\s+(?P<tokens_per_s>[\d.]+)\s+"
    r"peak memory (?P<peak_memory_gib>[\d.]+) GiB\s+final loss (?P<final_loss>\S+)(?:\s+MFU (?P<mfu_percent>[\d.]+)%)?"
)


def bench_from_output(text: str) -> dict:
    """{"baseline": {...}, "ours": {...}, "lines": [...]} from bench_train.py's printout."""
    result: dict = {"lines": [line for line in text.splitlines() if line.startswith(("device:", "(a)", "(b)", "ratio"))]}
    for line in text.splitlines():
        match = _BENCH.match(line)
        if match:
            values = match.groupdict()
            side = "baseline" if values.pop("side") == "a" else "ours"
            result[side] = {key: (value if key == "dtype" else float(value)) for key, value in values.items() if value is not None}
    if "baseline" in result and "ours" in result and result["baseline"]["tokens_per_s"]:
        result["speedup"] = round(result["ours"]["tokens_per_s"] / result["baseline"]["tokens_per_s"], 2)
        result["memory_ratio"] = round(result["ours"]["peak_memory_gib"] / result["baseline"]["peak_memory_gib"], 2)
    return result


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- gpu_check.md ---------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if cell is None else str(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return lines


def _install(result: dict) -> list[str]:
    probe = result.get("probe") or {}
    cuda = probe.get("cuda") or {}
    lines = [f"Installed from .whl: {', '.join(result.get('installed') or []) or 'nothing'}", ""]
    if cuda.get("available"):
        lines.append(f"GPU: {cuda.get('device')} (compute capability {cuda.get('capability')}, {cuda.get('memory_gib')} GiB, "
                     f"bf16 {'yes' if cuda.get('bf16') else 'no'}), torch CUDA {cuda.get('torch_cuda')}, driver {cuda.get('driver', '?')}; "
                     f"bitsandbytes NF4 round trip on CUDA: {cuda.get('bnb_nf4_roundtrip', cuda.get('bnb_error', '?'))}")
    lines += [""] + _table(["package", "version"], sorted(probe.get("packages", {}).items()))
    if probe.get("import_errors"):
        lines += ["", "Import errors:"] + [f"- `{name}`: {error}" for name, error in probe["import_errors"].items()]
    return lines


def _tests(result: dict) -> list[str]:
    cases = result.get("tests") or []
    counts = {}
    for case in cases:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    lines = [f"Model: {result.get('model', '?')}. " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())), ""]
    return lines + _table(["test", "outcome", "s", "message"], [[c["test"], c["outcome"], c["seconds"], c["message"][:200]] for c in cases])


def _memory(result: dict) -> list[str]:
    rows = []
    for row in result.get("rows") or []:
        setting = [row["model"].rpartition("/")[2], f"{row['bits']}-bit", f"{row['micro_batch']} x {row['seq_len']}",
                   "on" if row["gradient_checkpointing"] else "off"]
        if "measured" in row:
            est, got = row["estimate"], row["measured"]
            rows.append(setting + [row.get("loss_kernel"), est["total_gib"], got["peak_total_gib"], row["estimate_over_measured_total"],
                                   est["allocated_gib"], got["peak_allocated_gib"], got["peak_reserved_gib"], got["outside_pytorch_gib"], ""])
        else:
            rows.append(setting + [None] * 8 + [row.get("skipped") or row.get("error")])
    header = ["model", "base", "micro-batch x seq", "ckpt", "loss kernel", "estimate GiB", "measured peak GiB (reserved + outside PyTorch)",
              "estimate / measured", "estimate less context + allocator", "max_memory_allocated", "max_memory_reserved", "outside PyTorch", "note"]
    return ["LoRA r=16 all-linear, paged 8-bit AdamW, packed rows, 3 steps of worst-case random tokens (`estimate/measure.py`).", ""] + _table(header, rows)


def _throughput(result: dict) -> list[str]:
    lines = ["```", *result.get("lines", []), "```", ""]
    rows = [[label, r.get("dtype"), r.get("tokens_per_s"), r.get("peak_memory_gib"), r.get("final_loss"), r.get("mfu_percent")]
            for label, r in (("(a) HF + peft tutorial", result.get("baseline")), ("(b) `qlora train`", result.get("ours"))) if r]
    if "speedup" in result:
        rows.append(["ratio (b)/(a)", "", f"**{result['speedup']}x**", f"**{result['memory_ratio']}x**", "", ""])
    return lines + _table(["", "compute dtype", "non-padding tokens/s", "peak GiB (max allocated)", "final loss", "MFU %"], rows)


RENDERERS = {"install": _install, "tests": _tests, "memory": _memory, "throughput": _throughput}


def render_markdown(state: dict) -> str:
    """gpu_check.md: the summary of every step, then each step's figures."""
    lines = [f"# GPU check, {state.get('started_at', '')}", "",
             f"Planned {state['planned_total_s']} s in all; {'finished' if state.get('finished') else 'in progress or stopped'}.", ""]
    lines += _table(["step", "box s", "took s", "status", "note"],
                    [[f"{i}. {s['title']}", s["box_s"], s.get("seconds"), s["status"], s.get("reason", "")] for i, s in enumerate(state["steps"])])
    for index, step in enumerate(state["steps"]):
        result = step.get("result")
        if not result:
            continue
        lines += ["", f"## {index}. {step['title']}", ""]
        renderer = RENDERERS.get(step["key"])
        lines += renderer(result) if renderer else ["```", json.dumps(result, indent=2)[:4000], "```"]
    return "\n".join(lines) + "\n"
