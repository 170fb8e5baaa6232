"""The GPU acceptance run: everything only CUDA can show, checked and measured in one command of at
most 8 minutes when a GPU is lent. `bash scripts/gpu_check.sh` runs it (its header: --prepare,
--dry-run, and where the results go). Each step runs in its own time box; its result goes into
OUT/gpu_check.json and OUT/gpu_check.md as soon as it ends, so a later step's failure or time-out
keeps the earlier ones; every command's output is appended to OUT/gpu_check.log as it is printed.

    0 install     the carried wheels into a local target (only where packages are missing); versions, GPU, a bitsandbytes NF4 round trip
    1 tests       tests/gpu (QLoRA, paged optimizer, fp16 resume, loss kernels, merge + GGUF, evaluate, estimate --measure)
    2 memory      scripts/gpu_memory_grid.py: measured peaks next to `qlora estimate` on random-weight 0.5B-8B shapes
    3 throughput  scripts/bench_train.py on a random-weight Llama-3.2-1B shape: tutorial baseline vs `qlora train`, MFU
    4 autofit     `qlora train --auto-fit` on one recipe, when `qlora train --help` lists it

Stdlib only at import: it runs before the wheels are installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check_report import bench_from_output, read_jsonl, render_markdown, tests_from_junit, tests_from_output

PLANNED_TOTAL_S = 480  # the whole real run, install included
REPORT_RESERVE_S = 5  # kept back from the last step for the final report
DEVICE_TIMEOUT_S = 540  # the device call's limit: the plan plus a minute of slack
CARRY = (".whl", ".gpu")  # ignored paths the device call must carry: the wheels, the demo tokenizer
DEVICE_COMMAND = "bash scripts/gpu_check.sh"
WORK = Path(os.environ.get("QLORA_GPU_WORK", Path(tempfile.gettempdir()) / "gpu_check"))
FETCH_WHEELS = "bash ../shared/device/fetch-wheels.sh gguf typing-extensions"
DEMO_SHAPE = "HuggingFaceTB/SmolLM2-135M-Instruct"
BENCH_MODEL = "meta-llama/Llama-3.2-1B"
BENCH_ARGS = ["--steps", "20", "--micro-batch", "8", "--max-len", "1024"]
TEST_FILES = ["tests/gpu/test_train_gpu.py", "tests/gpu/test_merge_gpu.py", "tests/gpu/test_kernels_gpu.py",
              "tests/gpu/test_estimate_gpu.py", "tests/unit/test_trainer_hooks.py"]  # the last: our Trainer hooks exist in the image's transformers

# Wheel (normalised name) -> module: what the GPU image lacks (../shared/device/fetch-wheels.sh and
# its arguments above). typing-extensions: pydantic 2.14 needs >= 4.16, newer than the image's may be.
WHEELS = {"bitsandbytes": "bitsandbytes", "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
          "pydantic": "pydantic", "pydantic_core": "pydantic_core", "annotated_types": "annotated_types",
          "typing_inspection": "typing_inspection", "liger_kernel": "liger_kernel", "gguf": "gguf", "typing_extensions": "typing_extensions"}
# What the steps import, probed on the machine (and in the dry run, with CUDA hidden).
PACKAGES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate", "bitsandbytes": "bitsandbytes",
            "datasets": "datasets", "pydantic": "pydantic", "pydantic_core": "pydantic-core", "gguf": "gguf", "typer": "typer", "rich": "rich",
            "yaml": "PyYAML", "safetensors": "safetensors", "tokenizers": "tokenizers", "typing_extensions": "typing_extensions",
            "pytest": "pytest", "liger_kernel": "liger_kernel", "triton": "triton", "flash_attn": "flash_attn"}
CUDA_ONLY = {"liger_kernel", "triton", "flash_attn"}  # not installable / not needed on a CPU machine
OPTIONAL = {"flash_attn"}  # used when present (attention auto); the GPU image has none
MODULES = ["qlora_cli.cli", "qlora_cli.train.run", "qlora_cli.estimate.measure", "qlora_cli.merge.fold", "qlora_cli.export.gguf_check",
           "qlora_cli.evaluate.scores", "gpu_models", "gpu_memory_grid"]


# ---- running a step ---------------------------------------------------------------------------


class StepEnded(Exception):
    """A step that did not pass: its status, the reason, and whatever result it had by then."""

    status = "failed"

    def __init__(self, reason: str, result: Optional[dict] = None, output: str = ""):
        super().__init__(reason)
        self.reason, self.result, self.output = reason, result, output


class StepFailed(StepEnded):
    status = "failed"


class StepTimedOut(StepEnded):
    status = "timed out"


class StepSkipped(StepEnded):
    status = "skipped"


@dataclass
class Context:
    python: str
    out: Path
    work: Path
    env: dict
    state: dict


class Runner:
    """Runs a step's commands from the repository root until the step's deadline, each in its own
    process group (killed whole at the deadline), its output streamed into the log."""

    def __init__(self, ctx: Context, deadline: float):
        self.ctx, self.deadline = ctx, deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, argv: list, env: Optional[dict] = None, check: bool = True) -> tuple[int, str]:
        argv = [str(arg) for arg in argv]
        log_path = self.ctx.out / "gpu_check.log"
        with log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            start = log.tell()
            log.flush()
            if self.left() <= 0:
                raise StepTimedOut("no time left in the step's box")
            child = subprocess.Popen(argv, cwd=ROOT, env={**self.ctx.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = child.wait(timeout=max(self.left(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                code = None
        with log_path.open("rb") as log:
            log.seek(start)
            output = log.read().decode(errors="replace")
        if code is None:
            raise StepTimedOut(f"`{' '.join(argv[:3])} ...` stopped at the step's time box", output=output)
        if check and code != 0:
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
            raise StepFailed(f"`{' '.join(argv[:3])} ...` exited {code}: {last[:300]}", output=output)
        return code, output


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    box_s: int
    run: Callable[[Context, Runner], dict]


def write_state(ctx: Context) -> None:
    """gpu_check.json and gpu_check.md, each replaced whole."""
    for name, text in (("gpu_check.json", json.dumps(ctx.state, indent=2) + "\n"), ("gpu_check.md", render_markdown(ctx.state))):
        staged = ctx.out / f".{name}.tmp"
        staged.write_text(text)
        staged.replace(ctx.out / name)


def run_steps(steps: list[Step], ctx: Context, total_s: float = PLANNED_TOTAL_S) -> dict:
    """Each step in its box (cut to what is left of `total_s`), the state written after each."""
    deadline = time.monotonic() + total_s - REPORT_RESERVE_S
    ctx.state["steps"] = [{"key": s.key, "title": s.title, "box_s": s.box_s, "status": "pending"} for s in steps]
    write_state(ctx)
    for step, record in zip(steps, ctx.state["steps"]):
        started = time.monotonic()
        if ctx.state.get("stop_reason"):
            record.update(status="not run", reason=ctx.state["stop_reason"])
        elif deadline - started <= 1:
            record.update(status="not run", reason=f"the run's {total_s:.0f} s were used up")
        else:
            record["status"] = "running"
            write_state(ctx)
            try:
                record.update(status="passed", result=step.run(ctx, Runner(ctx, min(started + step.box_s, deadline))))
            except StepEnded as ended:
                record.update(status=ended.status, reason=ended.reason, result=ended.result)
            except Exception as exc:  # a bug in a step's own code must not cost the steps after it
                record.update(status="failed", reason=f"{type(exc).__name__} in gpu_check.py: {exc}")
            record["seconds"] = round(time.monotonic() - started, 1)
        write_state(ctx)
    ctx.state["finished"] = True
    write_state(ctx)
    return ctx.state


# ---- the steps --------------------------------------------------------------------------------


def wheels() -> list[Path]:
    return sorted((ROOT / ".whl").glob("*.whl"))


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised project name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return name.lower().replace("-", "_").replace(".", "_"), version


def step_install(ctx: Context, run: Runner) -> dict:
    _, answer = run([ctx.python, "-c", "import torch; print(torch.cuda.is_available())"])
    if answer.strip().splitlines()[-1:] != ["True"]:
        ctx.state["stop_reason"] = "no CUDA device: the GPU steps cannot run here (`bash scripts/gpu_check.sh --dry-run` is the CPU check)"
        raise StepFailed(ctx.state["stop_reason"])
    site = ctx.work / "site"
    missing = [module for module in WHEELS.values() if importlib.util.find_spec(module) is None]
    installed = []
    if missing and wheels():
        run([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
             "--target", site, *wheels()])
        installed = [f"{name} {version}" for name, version in map(wheel_name, wheels())]
        ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), ctx.env["PYTHONPATH"]])
    probe_file = ctx.work / "probe.json"
    run([ctx.python, "scripts/gpu_check.py", "--probe", probe_file])
    result = {"installed": installed, "missing_before": missing, "probe": json.loads(probe_file.read_text())}
    errors = {name: error for name, error in result["probe"]["import_errors"].items() if name not in OPTIONAL}
    if errors:
        raise StepFailed(f"cannot import {', '.join(errors)} (see below)", result)
    return result


def gpu_model(ctx: Context, run: Runner) -> Path:
    """The demo model if its real weights are here, else a random-weight model of its shape."""
    demo = ROOT / "models" / "SmolLM2-135M-Instruct"
    if (demo / "model.safetensors").is_file():
        return demo
    folder = ctx.work / "models" / "SmolLM2-135M-Instruct-random"
    run([ctx.python, "scripts/gpu_models.py", DEMO_SHAPE, folder, "--device", "cuda"])
    return folder


def step_tests(ctx: Context, run: Runner) -> dict:
    model = gpu_model(ctx, run)
    junit = ctx.work / "tests.xml"
    junit.unlink(missing_ok=True)
    timeout = ["--timeout", "150"] if importlib.util.find_spec("pytest_timeout") else []
    argv = [ctx.python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA", "--tb=short", f"--junitxml={junit}", *timeout, *TEST_FILES]
    env = {"QLORA_GPU_MODEL": str(model), "COLUMNS": "160"}
    try:
        code, output = run(argv, env=env, check=False)
    except StepTimedOut as stopped:
        stopped.result = {"model": str(model), "tests": tests_from_output(stopped.output)}
        raise
    result = {"model": str(model), "tests": tests_from_junit(junit) if junit.is_file() else tests_from_output(output)}
    bad = [case["test"] for case in result["tests"] if case["outcome"] in ("failed", "error")]
    if code != 0:
        raise StepFailed(f"{len(bad)} of {len(result['tests'])} failed: {', '.join(bad)}" if bad else f"pytest exited {code}", result)
    return result


def step_memory(ctx: Context, run: Runner) -> dict:
    rows_file = ctx.work / "memory.jsonl"
    rows_file.unlink(missing_ok=True)
    argv = [ctx.python, "scripts/gpu_memory_grid.py", "--models", ctx.work / "models", "--out", rows_file,
            "--budget-s", f"{max(run.left() - 15, 1):.0f}"]  # its imports and the last setting's tail
    try:
        code, _ = run(argv, check=False)
    except StepTimedOut as stopped:
        stopped.result = {"rows": read_jsonl(rows_file)}
        raise
    result = {"rows": read_jsonl(rows_file)}
    measured = [row for row in result["rows"] if "measured" in row]
    if code != 0 or not measured or len(measured) < len([row for row in result["rows"] if "skipped" not in row]):
        raise StepFailed(f"exit {code}; {len(measured)} of {len(result['rows'])} settings measured", result)
    return result


def step_throughput(ctx: Context, run: Runner) -> dict:
    folder = ctx.work / "models" / BENCH_MODEL.rpartition("/")[2]  # the memory step built it already, unless it stopped first
    run([ctx.python, "scripts/gpu_models.py", BENCH_MODEL, folder, "--device", "cuda"])
    try:
        _, output = run([ctx.python, "scripts/bench_train.py", "--model", folder, *BENCH_ARGS])
    except StepEnded as ended:
        ended.result = bench_from_output(ended.output)
        raise
    return bench_from_output(output)


def step_autofit(ctx: Context, run: Runner) -> dict:
    _, help_text = run([ctx.python, "-m", "qlora_cli", "train", "--help"], env={"COLUMNS": "200"})
    if "--auto-fit" not in help_text:
        raise StepSkipped("`qlora train --help` does not list --auto-fit: the estimate issue's auto-fit has not landed")
    folder = ctx.work / "models" / BENCH_MODEL.rpartition("/")[2]
    run([ctx.python, "scripts/gpu_models.py", BENCH_MODEL, folder, "--device", "cuda"])
    out = ctx.work / "autofit-run"
    _, output = run([ctx.python, "-m", "qlora_cli", "train", "configs/quickstart.yaml", "--auto-fit", "--force",
                     "--set", f"model.path={folder}", "--set", f"output.dir={out}", "--set", "train.max_steps=5"], env={"COLUMNS": "160"})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"output_tail": output.splitlines()[-40:], "metrics": {k: metrics.get(k) for k in ("peak_memory_gib", "tokens_per_second", "last_loss")}}


STEPS = [
    Step("install", "Install the wheels; versions, GPU, bitsandbytes on CUDA", 45, step_install),
    Step("tests", "tests/gpu: QLoRA, paged optimizer, bf16/fp16 resume, loss kernels, merge + GGUF, evaluate, estimate --measure", 200, step_tests),
    Step("memory", "Memory: measured peaks next to qlora estimate", 125, step_memory),
    Step("throughput", "Throughput: scripts/bench_train.py, 1B-class", 85, step_throughput),
    Step("autofit", "qlora train --auto-fit", 20, step_autofit),
]


# ---- probe (on the machine, and in the dry run) -------------------------------------------------


def probe() -> dict:
    """Versions of what the steps import, the GPU, and bitsandbytes' NF4 kernels on it."""
    from importlib import metadata

    info: dict = {"python": sys.version.split()[0], "packages": {}, "import_errors": {}}
    for module, dist in PACKAGES.items():
        try:
            imported = importlib.import_module(module)
            try:
                info["packages"][dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                info["packages"][dist] = getattr(imported, "__version__", "?")
        except Exception as exc:  # any import failure is the finding
            info["import_errors"][module] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:
            info["import_errors"][module] = f"{type(exc).__name__}: {str(exc)[:300]}"
    import torch

    cuda: dict = {"available": torch.cuda.is_available()}
    if cuda["available"]:
        properties = torch.cuda.get_device_properties(0)
        cuda.update(device=properties.name, capability=f"{properties.major}.{properties.minor}", memory_gib=round(properties.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), torch_cuda=torch.version.cuda)
        try:
            import bitsandbytes.functional as bnb_functional

            weight = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
            packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
            error = float((bnb_functional.dequantize_4bit(packed, state) - weight).float().norm() / weight.float().norm())
            cuda["bnb_nf4_roundtrip"] = f"relative error {error:.3f}"
        except Exception as exc:
            cuda["bnb_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        smi = shutil.which("nvidia-smi")
        if smi:
            answer = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, check=False)
            cuda["driver"] = answer.stdout.strip()
    info["cuda"] = cuda
    return info


def device_call() -> str:
    carry = ", ".join(f'"{path}"' for path in CARRY)
    return f'run(command="{DEVICE_COMMAND}", carry=[{carry}], timeout_s={DEVICE_TIMEOUT_S})'


# ---- entry ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check"), help="where the results go (default $OUT)")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        args.probe.write_text(json.dumps(probe(), indent=2))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(WORK / "hf"), "PYTHONPATH": python_path}
    state = {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "planned_total_s": PLANNED_TOTAL_S,
             "device_call": device_call(), "steps": []}
    state = run_steps(STEPS, Context(sys.executable, args.out, WORK, env, state))
    print(render_markdown(state))
    return 0 if all(step["status"] in ("passed", "skipped") for step in state["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
