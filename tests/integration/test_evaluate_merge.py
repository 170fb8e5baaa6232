"""`qlora evaluate` and `qlora merge` end to end on the demo model (SmolLM2-135M, CPU): the
session's short QLoRA demo run (tests/integration/conftest.py) is merged both ways, the merged
folder loads and generates with peft blocked, and evaluate puts base, adapter and merged side by
side. Nothing is written into the demo run: every output goes to tmp_path."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, invoke

pytestmark = pytest.mark.integration


def qlora(*args):
    """`qlora ARGS` in this process, which must succeed."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_merge_both_ways_then_evaluate_side_by_side(demo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo run's recipe names the demo model and data relative to the repository
    qlora_run = demo_run
    dequantized = tmp_path / "merged-dequantized"
    qlora("merge", qlora_run, "--output", dequantized, "--base", "dequantized", "--verify-samples", "8")
    check = json.loads((dequantized / "merge_report.json").read_text())["verification"]
    assert check["passed"] and check["merge_exactness"]["top1_agreement"] >= 0.95
    assert check["model_as_trained"]["greedy"]["identical"] == 8

    original = tmp_path / "merged-original"
    qlora("merge", qlora_run, "--output", original, "--base", "original", "--dtype", "fp32", "--verify-samples", "4")
    check = json.loads((original / "merge_report.json").read_text())["verification"]
    assert check["passed"] and check["merge_exactness"]["reference"] == "16-bit base + adapter, unmerged"
    assert check["model_as_trained"]["mean_kl"] > check["merge_exactness"]["mean_kl"]  # the NF4 gap, reported

    report_file = tmp_path / "eval.json"
    qlora("evaluate", qlora_run, "--merged", dequantized, "--max-samples", "8", "--output", report_file)
    models = json.loads(report_file.read_text())["models"]
    assert list(models) == ["base", "adapter", "merged"]
    assert models["adapter"]["loss"] < models["base"]["loss"]
    assert models["merged"]["loss"] == pytest.approx(models["adapter"]["loss"], rel=0.05)

    # A standalone checkpoint: loads and chats with plain transformers while peft cannot be imported.
    script = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(dequantized)!r}\n"
        "model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)\n"
        "ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Which topic is this sentence about: sports, cooking, "
        "weather, technology or music?\\n\\nThe striker scored twice.'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=3, do_sample=False)\n"
        "print(type(model).__name__, getattr(model.config, 'quantization_config', None), repr(tokenizer.decode(out[0, ids['input_ids'].shape[1]:])))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.startswith("LlamaForCausalLM None ")
