"""scripts/gpu_check.sh, the GPU acceptance run, checked on CPU: its dry run passes (what the GPU
steps import imports with CUDA hidden, the tests collect, the plan fits 8 minutes, the device call is
printed); each step of the real run is time-boxed and reported even when a later one fails or hangs;
what the steps print is parsed into the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_the_dry_run_passes_and_prints_a_plan_within_8_minutes_and_the_device_call():
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = result.stdout
    for check in ("imports, CUDA hidden", "step 1 tests", "step 2 memory grid", "step 3 throughput", "step 4 auto-fit", "travel size"):
        assert f"[ok] {check}" in out, out
    assert "CANNOT IMPORT" not in out
    assert int(re.search(r"(\d+) collected", out).group(1)) >= 9
    planned = [int(seconds) for seconds in re.findall(r"^\s+\d\. \w+\s+(\d+) s", out, re.MULTILINE)]
    assert len(planned) == 5 and sum(planned) <= 480
    assert int(re.search(r"total (\d+) s planned", out).group(1)) == sum(planned)
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=540)' in out
    assert "dry run passed" in out


def test_the_plan_and_the_device_call_fit_the_device_limits(gpu_check):
    assert sum(step.box_s for step in gpu_check.STEPS) <= gpu_check.PLANNED_TOTAL_S == 480
    assert gpu_check.PLANNED_TOTAL_S < gpu_check.DEVICE_TIMEOUT_S <= 600
    assert len(gpu_check.DEVICE_COMMAND) <= 2000 and len(gpu_check.CARRY) <= 8
    assert [step.key for step in gpu_check.STEPS] == ["install", "tests", "memory", "throughput", "autofit"]


def test_each_step_is_time_boxed_and_written_even_when_a_later_one_fails(gpu_check, tmp_path):
    seen_on_disk = {}

    def hangs(ctx, run):
        run([sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"])

    def fails(ctx, run):
        raise gpu_check.StepFailed("it broke", {"partial": 1})

    def crashes(ctx, run):
        raise ValueError("a bug in the step")

    def passes(ctx, run):
        seen_on_disk.update(json.loads((ctx.out / "gpu_check.json").read_text()))
        _, output = run([sys.executable, "-c", "print('measured 42')"])
        return {"output": output.strip()}

    steps = [gpu_check.Step("hangs", "Hangs", 2, hangs), gpu_check.Step("fails", "Fails", 5, fails),
             gpu_check.Step("crashes", "Crashes", 5, crashes), gpu_check.Step("passes", "Passes", 10, passes)]
    ctx = gpu_check.Context(sys.executable, tmp_path, tmp_path, {"PATH": "/usr/bin:/bin"}, {"planned_total_s": 60})
    started = time.monotonic()
    state = gpu_check.run_steps(steps, ctx, total_s=60)
    assert time.monotonic() - started < 20  # the hanging step was killed at its 2 s box

    assert [(s["key"], s["status"]) for s in state["steps"]] == [("hangs", "timed out"), ("fails", "failed"), ("crashes", "failed"), ("passes", "passed")]
    assert state["steps"][1]["result"] == {"partial": 1} and "a bug in the step" in state["steps"][2]["reason"]
    assert state["steps"][3]["result"] == {"output": "measured 42"}
    # Written after each step: when the last step started, the three before it were on disk already.
    assert [s["status"] for s in seen_on_disk["steps"]] == ["timed out", "failed", "failed", "running"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["finished"] is True
    assert "working" in (tmp_path / "gpu_check.log").read_text()
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| 0. Hangs | 2 |" in report and "timed out" in report and "it broke" in report


def test_steps_past_the_total_are_reported_as_not_run(gpu_check, tmp_path):
    def slow(ctx, run):
        run([sys.executable, "-c", "import time; time.sleep(60)"])

    steps = [gpu_check.Step("first", "First", 30, slow), gpu_check.Step("second", "Second", 30, slow)]
    ctx = gpu_check.Context(sys.executable, tmp_path, tmp_path, {"PATH": "/usr/bin:/bin"}, {"planned_total_s": 8})
    state = gpu_check.run_steps(steps, ctx, total_s=8)
    assert [s["status"] for s in state["steps"]] == ["timed out", "not run"]


def test_what_the_steps_print_is_parsed_into_the_report(gpu_check, tmp_path):
    from gpu_check_report import bench_from_output, tests_from_output

    # As scripts/bench_train.py formats its lines on a GPU.
    lines = ["device: NVIDIA H200; model: m; 20 steps x 8 rows, lengths 20-1024 tokens"]
    for label, tokens, gib, mfu in (("(a) HF+peft tutorial", 1000.0, 6.0, 10.5), ("(b) qlora train", 2500.0, 3.0, 26.3)):
        lines.append(f"{label:22s} dtype {'bfloat16':9s} non-padding tokens/s {tokens:8.1f}  peak memory {gib:.2f} GiB  final loss {1.5:.4f}"
                     f"  MFU {mfu:.1f}% (of 989 TFLOP/s bf16 dense)")
    lines.append("ratio (b)/(a): tokens/s 2.50x  peak memory 0.50x  final loss 1.000x")
    bench = bench_from_output("\n".join(["loading...", *lines]))
    assert bench["baseline"] == {"dtype": "bfloat16", "tokens_per_s": 1000.0, "peak_memory_gib": 6.0, "final_loss": 1.5, "mfu_percent": 10.5}
    assert bench["ours"]["mfu_percent"] == 26.3 and bench["speedup"] == 2.5 and bench["memory_ratio"] == 0.5
    assert bench["lines"] == lines

    verbose = "tests/gpu/test_a.py::test_one PASSED [ 50%]\ntests/gpu/test_a.py::test_two[liger] FAILED [100%]\n"
    assert [(t["test"], t["outcome"]) for t in tests_from_output(verbose)] == [
        ("tests/gpu/test_a.py::test_one", "passed"), ("tests/gpu/test_a.py::test_two[liger]", "failed")]
