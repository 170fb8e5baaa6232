"""`qlora merge --format gguf | gguf-lora` checked in llama.cpp itself, on a tiny Llama run with a
byte-level BPE tokenizer: the report holds llama.cpp's tokenization of >= 200 strings (identical to
transformers'), its greedy answers to the eval prompts rendered from the GGUF's own chat template
(the merged model's), their stop rate and exact match; k-quants are made by llama.cpp's quantizer
(with an importance matrix on request); a LoRA GGUF on the base GGUF answers as the merged model."""

import json

import pytest

from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.export import gguf_lora, llamacpp
from qlora_cli.merge import fold
from tests.llamacpp import llamacpp_runtime  # noqa: F401 - fixture
from tests.unit.test_gguf_export import build_tiny_bpe_tokenizer, build_tiny_model
from tests.unit.tiny_run import make_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-bpe")
    tokenizer = build_tiny_bpe_tokenizer("gpt-2")
    build_tiny_model("llama", len(tokenizer) + 12).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return make_run(folder.parent / "run", folder, bits=16)


def merge(run, output, dtype="fp32", **options):
    result = fold.run_merge(run, output, dtype=dtype, show_progress=False, **options)
    return result, json.loads((output / "merge_report.json").read_text())


def test_merged_gguf_answers_in_llama_cpp_as_the_merged_model(tiny_run, tmp_path, llamacpp_runtime):  # noqa: F811
    # A random model rambles to the budget over near-tied logits (it answers no row: greedy agreement
    # is judged on answered rows, here none), and f16 rounding flips some late token in a row or two of
    # eight (measured 75-88%): a wrong layout (near 0%) is what must fail; the 98% bound is judged on
    # the demo run's answers (tests/integration/test_llamacpp_demo.py).
    gguf_type = "f16"
    result, report = merge(tiny_run, tmp_path / gguf_type, formats="gguf", gguf_type=gguf_type)
    assert result.failures == [] and result.gguf_failures == []
    check = report["gguf"]["llamacpp"]
    assert check["tokenization"]["texts"] >= 200
    tokens = check["tokenization"]
    assert tokens["identical"] + tokens["explained"] == tokens["texts"] and tokens["explained"] <= 2, tokens
    assert check["rows"] == 8 and check["template_renders_equal"] == 8
    assert check["greedy_agreement"] >= 0.5 and check["stopped"] >= check["merged_stopped"] == 0
    assert check["greedy_agreement_answered"] is None
    assert check["end_of_generation_tokens"] and "<|im_end|>" in check["end_of_generation_tokens"]
    assert sorted(path.name for path in (tmp_path / gguf_type).iterdir()) == ["Modelfile", "merge_report.json", f"model-{gguf_type}.gguf"]


def test_k_quant_is_made_by_llama_cpp_and_judged_by_the_task(tiny_run, tmp_path, llamacpp_runtime):  # noqa: F811
    result, report = merge(tiny_run, tmp_path / "q", formats="gguf", gguf_type="q4_k_m", imatrix=True)
    exported = report["gguf"]
    assert exported["quantizer"].startswith("llama.cpp") and exported["imatrix_rows"] == 8
    assert not (tmp_path / "q" / "model-q4_k_m.f16-source.gguf").exists()
    f16_bytes = 2 * report["parameters"]
    assert exported["bytes"] < 0.75 * f16_bytes  # rows of 64 are too short for Q4_K's 256-blocks: llama.cpp falls back per tensor
    check = exported["llamacpp"]
    assert check["tokenization"]["differences"] == []
    assert check["exact_match"] >= check["merged_exact_match"] - 0.05 or result.gguf_failures


def test_lora_gguf_on_the_base_gguf_answers_as_the_merged_model(tiny_run, tmp_path, llamacpp_runtime):  # noqa: F811
    output = tmp_path / "lora"
    result, report = merge(tiny_run, output, dtype="fp16", formats="gguf-lora")
    assert result.gguf_failures == []
    assert sorted(path.name for path in output.iterdir()) == ["Modelfile", "adapter-lora.gguf", "base-f16.gguf", "merge_report.json"]
    check = report["gguf"]["llamacpp"]
    assert check["loras"] == ["adapter-lora.gguf"] and check["greedy_agreement"] >= 0.5
    assert "ADAPTER ./adapter-lora.gguf" in (output / "Modelfile").read_text()
    # Without the adapter the base GGUF answers differently: the adapter is what makes them agree.
    with llamacpp.Model(output / "base-f16.gguf") as base, llamacpp.Model(output / "base-f16.gguf", loras=[(output / "adapter-lora.gguf", 1.0)]) as both:
        ids = base.tokenize("the cat and the dog", add_special=False)
        assert abs(base.logits(ids) - both.logits(ids)).max() > 1e-2


def test_options_llama_cpp_cannot_honour_are_one_line_errors(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="--imatrix guides llama.cpp's quantizer"):
        fold.run_merge(tiny_run, tmp_path / "a", formats="gguf", gguf_type="q8_0", imatrix=True, show_progress=False)
    with pytest.raises(ConfigError, match="each write a Modelfile; choose one"):
        fold.run_merge(tiny_run, tmp_path / "a", formats="gguf,gguf-lora", show_progress=False)
    with pytest.raises(ConfigError, match="drop --base dequantized"):
        fold.run_merge(tiny_run, tmp_path / "a", formats="gguf-lora", base_mode="dequantized", show_progress=False)
    with pytest.raises(ModelError, match="not DoRA"):
        gguf_lora.check_lora({"peft_type": "LORA", "use_dora": True})
    with pytest.raises(ModelError, match=r"not the fully trained \['lm_head'\]"):
        gguf_lora.check_lora({"peft_type": "LORA", "modules_to_save": ["lm_head"]})
    assert not (tmp_path / "a").exists()


def test_without_llama_cpp_k_quants_are_refused_and_the_checks_say_they_did_not_run(tiny_run, tmp_path, monkeypatch):
    from qlora_cli.export import llamacpp_check

    reason = "llama.cpp is not installed here (ImportError: No module named 'llama_cpp'); run scripts/setup_llamacpp.sh"
    monkeypatch.setattr(llamacpp, "available", lambda: (False, reason))
    with pytest.raises(ConfigError, match=r"--gguf-type q4_k_m is made by llama.cpp's quantizer: llama.cpp is not installed"):
        fold.run_merge(tiny_run, tmp_path / "q", formats="gguf", gguf_type="q4_k_m", show_progress=False)
    assert not (tmp_path / "q").exists()
    report = llamacpp_check.verify(None, tmp_path, "model-f16.gguf", None, "f16", 8, 1)
    assert report == {"skipped": reason, "failures": [], "passed": None}


def test_the_importance_matrix_makes_llama_cpp_round_the_weights_that_matter_finer(tmp_path, llamacpp_runtime):  # noqa: F811
    """What `--imatrix` is for, measured on the weights: each tensor's quantization error weighted by its
    input columns' mean squared activation (the error the layer's output sees). Given our matrix, llama.cpp's
    quantizer lowers it against plain rounding on every tensor whose type uses a matrix (q8_0 ignores it),
    and against the same matrix with its columns reversed (what a matrix of the wrong tensor or layout
    would be) on nearly every one: measured 11 of 12 here; on the demo run (q4_k_m, 128 training rows)
    196 of 210 tensors, by 35% on average against plain rounding."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from qlora_cli.export import gguf_writer, quantize

    tokenizer = build_tiny_bpe_tokenizer("gpt-2")
    model = build_tiny_model("llama", len(tokenizer))
    source = tmp_path / "f16.gguf"
    gguf_writer.write_gguf(model, tokenizer, source, "f16", "tiny")
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, len(tokenizer), (24,), generator=generator).tolist() for _ in range(8)]
    imatrix = quantize.importance_matrix(model, rows)
    variants = {"plain": None, "ours": imatrix, "reversed": {name: values[::-1].copy() for name, values in imatrix.items()}}
    for variant, matrix in variants.items():
        llamacpp.quantize(source, tmp_path / f"{variant}.gguf", "q4_k_m", matrix)
    tensors = {variant: {tensor.name: tensor for tensor in GGUFReader(tmp_path / f"{variant}.gguf").tensors} for variant in ("f16", *variants)}

    def error(variant, name):
        exact = dequantize(tensors["f16"][name].data, tensors["f16"][name].tensor_type).astype(np.float64)
        found = tensors[variant][name]
        return float((((exact - dequantize(found.data, found.tensor_type)) ** 2) * imatrix[name]).sum())

    assert len(imatrix) == 15  # 2 layers x 7 linear layers + output.weight
    guided = [name for name in imatrix if tensors["ours"][name].tensor_type.name != "Q8_0"]
    assert len(guided) >= 10
    assert all(error("ours", name) == error("plain", name) for name in imatrix if name not in guided)
    assert all(error("ours", name) < error("plain", name) for name in guided)
    assert sum(error("ours", name) < error("reversed", name) for name in guided) >= len(guided) - 2
