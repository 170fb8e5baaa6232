"""The GPU check's dry run, on CPU (`bash scripts/gpu_check.sh --dry-run`): the wheels and the demo
tokenizer a device call carries are here and consistent (a finding when not; `--strict` makes it a
failure), what the GPU steps import imports with CUDA hidden, the tests collect, the memory grid's
recipes validate and estimate, a random-weight model builds; then the plan of the real run
(scripts/gpu_check.py), its time boxes, and the exact device call."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from gpu_check import (
    BENCH_ARGS,
    BENCH_MODEL,
    CARRY,
    CUDA_ONLY,
    DEMO_SHAPE,
    FETCH_WHEELS,
    PLANNED_TOTAL_S,
    ROOT,
    STEPS,
    TEST_FILES,
    WHEELS,
    device_call,
    wheel_name,
    wheels,
)

TRAVEL_LIMIT_BYTES = 64 * 2**20  # what one device call may send
PIN = re.compile(r"^Requires-Dist:\s*([A-Za-z0-9_.-]+)\s*\(?\s*==\s*([^\s;,)]+)(?![^\n]*extra ==)", re.MULTILINE)


def check_wheels() -> tuple[bool, list[str]]:
    """(all there and consistent, lines): one wheel per needed package, pinned dependencies agreeing."""
    found = {}
    for path in wheels():
        name, version = wheel_name(path)
        found.setdefault(name, []).append(version)
    lines, good = [], True
    missing = [name for name in WHEELS if name not in found]
    doubled = [f"{name} ({', '.join(versions)})" for name, versions in found.items() if len(versions) > 1]
    if missing:
        good = False
        lines.append(f"missing wheels: {', '.join(missing)}; fetch them with: {FETCH_WHEELS}")
    if doubled:
        good = False
        lines.append(f"more than one version (the install would stop): {', '.join(doubled)}")
    for path in wheels():
        with zipfile.ZipFile(path) as archive:
            metadata = next((archive.read(item).decode() for item in archive.namelist() if item.endswith(".dist-info/METADATA")), "")
        for pin in PIN.finditer(metadata):
            pinned, version = pin.group(1).lower().replace("-", "_").replace(".", "_"), pin.group(2)
            if pinned in found and version not in found[pinned]:
                good = False
                lines.append(f"{path.name} needs {pinned}=={version}, .whl has {', '.join(found[pinned])}")
    size = sum(path.stat().st_size for path in wheels())
    if found:
        lines.insert(0, f"{len(wheels())} wheels, {size / 2**20:.1f} MiB: " + ", ".join(f"{n} {'/'.join(v)}" for n, v in sorted(found.items())))
    return good, lines


def travel_bytes() -> dict:
    """What a device call sends: the working tree (tracked and untracked, not ignored) and the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    tree = sum((ROOT / name).stat().st_size for name in listed.split("\0") if name and (ROOT / name).is_file())
    carried = {path: sum(f.stat().st_size for f in (ROOT / path).rglob("*") if f.is_file()) for path in CARRY if (ROOT / path).exists()}
    return {"tree": tree, **carried, "total": tree + sum(carried.values())}


def dry_run(python: str, strict: bool) -> int:
    """The CPU check: what the real run needs is here and imports; the plan and the device call."""
    started = time.monotonic()
    problems, findings = [], []
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def say(label: str, ok: bool, text: str) -> None:
        print(f"[{'ok' if ok else '!!'}] {label}: {text}", flush=True)

    good, lines = check_wheels()
    say("wheels (.whl)", good, "; ".join(lines) or f"none; fetch them with: {FETCH_WHEELS}")
    if not good:
        findings.append("wheels")
    tokenizer = ROOT / ".gpu" / "SmolLM2-135M-Instruct" / "tokenizer.json"
    say("demo tokenizer (.gpu)", tokenizer.is_file(), f"{tokenizer.parent.relative_to(ROOT)}" if tokenizer.is_file() else
        "missing; copy it with: bash scripts/gpu_check.sh --prepare (needs models/SmolLM2-135M-Instruct)")
    if not tokenizer.is_file():
        findings.append("tokenizer")
    sizes = travel_bytes()
    fits = sizes["total"] <= TRAVEL_LIMIT_BYTES
    say("travel size", fits, " + ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items() if k != "total")
        + f" = {sizes['total'] / 2**20:.1f} MiB of {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB")
    if not fits:
        problems.append("travel size")

    source = next((folder for folder in (ROOT / ".gpu" / "SmolLM2-135M-Instruct", ROOT / "models" / "SmolLM2-135M-Instruct")
                   if (folder / "tokenizer.json").is_file()), None)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-dry-"))
    checks = {  # independent: run side by side
        "probe": [python, "scripts/gpu_check.py", "--probe", scratch / "probe.json"],
        "collect": [python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *TEST_FILES],
        "grid": [python, "scripts/gpu_memory_grid.py", "--dry-run"],
        "bench": [python, "scripts/bench_train.py", "--help"],
        "train_help": [python, "-m", "qlora_cli", "train", "--help"],
    }
    if source is not None:
        checks["model"] = [python, "scripts/gpu_models.py", DEMO_SHAPE, scratch / "model", "--layers", "2", "--tokenizer", source]
    running = {name: subprocess.Popen([str(arg) for arg in argv], cwd=ROOT, env={**hidden, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, argv in checks.items()}
    outputs = {name: child.communicate() for name, child in running.items()}
    done = {name: (running[name].returncode, *outputs[name]) for name in running}

    code, _, err = done["probe"]
    info = json.loads((scratch / "probe.json").read_text()) if code == 0 else {"import_errors": {"probe": err[-500:]}, "packages": {}}
    errors = {name: error for name, error in info["import_errors"].items() if name not in CUDA_ONLY}
    say("imports, CUDA hidden", not errors, ", ".join(f"{k} {v}" for k, v in sorted(info["packages"].items()))
        + "".join(f"; CANNOT IMPORT {name}: {error}" for name, error in errors.items())
        + "".join(f"; {name}: not here (CUDA only, from .whl there)" for name in sorted(CUDA_ONLY & set(info["import_errors"]))))
    if errors:
        problems.append("imports")

    code, out, err = done["collect"]
    names = [line for line in out.splitlines() if "::" in line]
    say("step 1 tests", code == 0, f"{len(names)} collected: " + ", ".join(n.split("::", 1)[1] for n in names) if code == 0 else out[-1500:] + err[-1500:])
    if code:
        problems.append("test collection")

    code, out, err = done["grid"]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    say("step 2 memory grid", code == 0 and len(rows) >= 8, f"{len(rows)} settings, estimates (GiB) "
        + ", ".join(f"{r['model'].rpartition('/')[2]} {r['bits']}-bit {r['micro_batch']}x{r['seq_len']}{' ckpt' if r['gradient_checkpointing'] else ''} "
                    f"{r['estimate']['total_gib']}" for r in rows) if rows else err[-1500:])
    if code or len(rows) < 8:
        problems.append("memory grid")

    code, _, err = done["bench"]
    bench_command = f"python scripts/bench_train.py --model <random {BENCH_MODEL} shape> {' '.join(BENCH_ARGS)}"
    say("step 3 throughput", code == 0, bench_command if code == 0 else err[-1500:])
    if code:
        problems.append("bench_train.py")

    code, out, err = done["train_help"]
    say("step 4 auto-fit", code == 0, ("qlora train --help lists --auto-fit: the step will run it" if "--auto-fit" in out
                                       else "qlora train --help does not list --auto-fit: the step will skip, saying so") if code == 0 else err[-1500:])
    if code:
        problems.append("qlora train --help")

    if source is None:
        say("random-weight model", True, "not tried: no demo tokenizer here")
    else:
        code, _, err = done["model"]
        say("random-weight model", code == 0, f"a 2-layer {DEMO_SHAPE} shape with the tokenizer of {source.relative_to(ROOT)}, built on CPU"
            if code == 0 else err[-1500:])
        if code:
            problems.append("gpu_models.py")
    shutil.rmtree(scratch, ignore_errors=True)

    print("\nplan of the real run (each step's time box; results written after each):")
    for index, step in enumerate(STEPS):
        print(f"  {index}. {step.key:<11}{step.box_s:>4} s  {step.title}")
    total = sum(step.box_s for step in STEPS)
    print(f"  total {total} s planned ({total / 60:.1f} min; limit {PLANNED_TOTAL_S} s); results: $OUT/gpu_check.json, gpu_check.md, gpu_check.log")
    if total > PLANNED_TOTAL_S:
        problems.append("plan over 8 minutes")
    print(f"\ndevice call:\n  {device_call()}")
    if findings:
        print(f"\nbefore the device call: {FETCH_WHEELS} && bash scripts/gpu_check.sh --prepare")
    failed = problems + (findings if strict else [])
    print(f"\ndry run {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in {time.monotonic() - started:.0f} s"
          + (f" (to fix before a device call: {', '.join(findings)})" if findings and not strict else ""))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="missing wheels or demo tokenizer fail the dry run (before a device call)")
    return dry_run(sys.executable, parser.parse_args().strict)


if __name__ == "__main__":
    sys.exit(main())
