"""The GPU-trained adapter, published on CUDA: `qlora merge` writes a checkpoint and a GGUF file that
pass their own verification (the default bf16 merge, and the fp32 merge the README recommends when
exact logits matter), and `qlora evaluate` scores base against adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.conftest import qlora

pytestmark = pytest.mark.gpu


def merge_report(folder: Path) -> dict:
    """merge_report.json of a merge (kept for inspection when verification fails), or {}."""
    path = folder / "merge_report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def failures(report: dict) -> dict:
    return {"merge": (report.get("verification") or {}).get("failures"), "gguf": ((report.get("gguf") or {}).get("verification") or {}).get("failures")}


def test_merge_writes_a_verified_checkpoint_and_gguf_file(gpu_run, tmp_path):
    out = tmp_path / "merged"
    result = qlora("merge", gpu_run.dir, "--output", out, "--format", "hf,gguf", "--json")
    report = merge_report(out)
    assert result.returncode == 0, (failures(report), result.stderr[-2000:])
    assert report["verification"]["passed"] and report["gguf"]["verification"]["passed"]
    assert (out / "config.json").is_file() and (out / "model-f16.gguf").is_file()
    assert report["verification"]["merge_exactness"]["top1_agreement"] >= 0.9


def test_fp32_merge_passes_its_verification_on_cuda(gpu_run, tmp_path):
    out = tmp_path / "merged-fp32"
    result = qlora("merge", gpu_run.dir, "--output", out, "--dtype", "fp32", "--json")
    report = merge_report(out)
    exactness = (report.get("verification") or {}).get("merge_exactness", {})
    assert result.returncode == 0, (failures(report), {k: exactness.get(k) for k in ("top1_agreement", "mean_kl", "max_abs_logit_diff")},
                                    (report.get("verification") or {}).get("compute_dtype"), result.stderr[-1500:])


def test_evaluate_on_cuda_scores_base_and_adapter(gpu_run, tmp_path):
    result = qlora("evaluate", gpu_run.dir, "--json", "--max-samples", "16", "--output", tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads(result.stdout.strip().splitlines()[-1])["models"]
    assert set(models) == {"base", "adapter"}
    for scores in models.values():
        assert math.isfinite(scores["loss"]) and scores["exact_match"] is not None and scores["normalized_match"] is not None
    assert models["adapter"]["loss"] < models["base"]["loss"]
