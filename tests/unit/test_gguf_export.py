"""`qlora merge --format gguf` on a tiny Llama and a tiny Qwen2 built here, each with a tiny
byte-level BPE tokenizer (transformers reads GGUF tokenizers as BPE or sentencepiece, not
word-level): the file loads back with transformers and matches the merged model, tensors sit
under llama.cpp's names (Llama's q/k rows permuted for its rope, Qwen2's not), the tokenizer
round-trips, a wrong layout fails the verification, and other architectures are refused."""

import json
import shutil

import numpy as np
import pytest
import torch

from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.export import gguf_arch, gguf_check, gguf_tokenizer, gguf_writer
from qlora_cli.merge import fold
from tests.conftest import WORDS
from tests.unit.tiny_run import chat_rows, make_run

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_bpe_tokenizer(split: str):
    """Byte-level BPE trained on the test words and llama.cpp's probe text, with GPT-2's split
    (`gpt-2`) or Qwen2's (`qwen2`), so the two differ on the probe and each must be named right."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    if split == "qwen2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 4 + [gguf_tokenizer.PROBE_TEXT] * 4 + [json.dumps(row) for row in chat_rows()]
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def build_tiny_sentencepiece_tokenizer():
    """Llama 2 / Mistral style, as transformers 5's LlamaTokenizer builds it: BPE over ▁-joined
    words with 256 <0xNN> byte-fallback tokens, a ▁ before the first word, BOS added."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    corpus = [" ".join(WORDS)] * 4 + [gguf_tokenizer.PROBE_TEXT] * 2 + [json.dumps(row) for row in chat_rows()]
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + sorted(learned["vocab"], key=learned["vocab"].get)
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in learned["merges"]]
    tokenizer = LlamaTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges, add_bos_token=True)
    tokenizer.pad_token = "</s>"
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def build_tiny_model(kind: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2,
    )
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval()
    # Qwen2 with q/k/v biases and tied embeddings, like Qwen2.5-0.5B.
    model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-sentencepiece"])
def tiny_bpe_model_dir(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    if kind == "llama-sentencepiece":
        tokenizer = build_tiny_sentencepiece_tokenizer()
    else:
        tokenizer = build_tiny_bpe_tokenizer("qwen2" if kind == "qwen2" else "gpt-2")
    build_tiny_model(kind.split("-")[0], len(tokenizer) + 12).save_pretrained(folder)  # 12 padding rows, as real vocabularies have
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bpe_run(tiny_bpe_model_dir):
    """A finished run (random LoRA adapter) on the tiny model, shared by this module's merges."""
    return make_run(tiny_bpe_model_dir.parent / f"{tiny_bpe_model_dir.name}-run", tiny_bpe_model_dir, bits=16)


def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}, {tensor.name: tensor for tensor in reader.tensors}


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_loads_back_and_matches_the_merged_model(tiny_bpe_run, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "merged"
    result = fold.run_merge(tiny_bpe_run, output, dtype="fp32", formats="hf,gguf", gguf_type=gguf_type, show_progress=False)
    assert result.failures == []
    exported = result.report["gguf"]
    name = f"model-{gguf_type}.gguf"
    assert exported["file"] == name and (output / name).stat().st_size == exported["bytes"]
    assert (output / "model.safetensors").is_file() and name in result.report["files"]
    check = exported["verification"]
    assert check["passed"] and check["logits"]["top1_agreement"] >= gguf_check.MIN_TOP1_AGREEMENT[gguf_type]
    assert check["tokenizer"]["identical"] == check["tokenizer"]["texts"] > 0 and check["tokenizer"]["chat_template_equal"]

    # Independently of the report: the file's model and tokenizer against the merged folder.
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    alone = tmp_path / "alone"  # beside tokenizer files, transformers would mix them into the GGUF's
    alone.mkdir()
    shutil.copy(output / name, alone / name)
    back = AutoModelForCausalLM.from_pretrained(alone, gguf_file=name, dtype=torch.float32).eval()
    back_tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "which topic is cat ? 3 33 333 é"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert back_tokenizer(text, add_special_tokens=False)["input_ids"] == ids and back_tokenizer.chat_template == tokenizer.chat_template
    difference = (logits(back, ids) - logits(merged, ids)).abs().max()
    assert difference < (0.05 if gguf_type == "f16" else 0.5)

    metadata, tensors = read_gguf(output / name)
    arch = metadata["general.architecture"]
    config = merged.config
    assert metadata[f"{arch}.block_count"] == 2 and metadata[f"{arch}.attention.head_count_kv"] == 2
    assert metadata[f"{arch}.vocab_size"] == config.vocab_size == len(metadata["tokenizer.ggml.tokens"])
    sentencepiece = "<0x41>" in tokenizer.get_vocab()
    expected = ("llama", "default") if sentencepiece else ("gpt2", "qwen2" if arch == "qwen2" else "gpt-2")
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"]) == expected
    assert metadata["tokenizer.ggml.add_bos_token"] == metadata["tokenizer.ggml.add_space_prefix"] == sentencepiece
    if sentencepiece:  # llama.cpp's sentencepiece tokenizer merges by score: earlier merges score higher
        types, scores = metadata["tokenizer.ggml.token_type"], metadata["tokenizer.ggml.scores"]
        assert types[:4] == [gguf_tokenizer.UNKNOWN, gguf_tokenizer.CONTROL, gguf_tokenizer.CONTROL, gguf_tokenizer.BYTE]
        first, second = (tokenizer.convert_tokens_to_ids("".join(merge.split(" "))) for merge in gguf_tokenizer.merge_list(
            gguf_tokenizer.backend_json(tokenizer))[:2])
        assert scores[first] > scores[second] and scores[tokenizer.convert_tokens_to_ids("<0x41>")] == 0.0
    else:
        assert "tokenizer.ggml.scores" not in metadata and len(metadata["tokenizer.ggml.merges"]) > 50
    assert metadata["tokenizer.ggml.tokens"][-1] == f"[PAD{config.vocab_size - 1}]"
    assert metadata["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == gguf_type.upper()
    assert ("output.weight" in tensors) == (arch == "llama")  # Qwen2's head is tied to token_embd
    assert ("blk.1.attn_q.bias" in tensors) == (arch == "qwen2")


def test_llama_q_and_k_rows_are_permuted_for_llama_cpp_and_qwen2_are_not(tiny_bpe_model_dir, tmp_path):
    from gguf import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe_model_dir).eval()
    path = tmp_path / "model.gguf"
    gguf_writer.write_gguf(model, AutoTokenizer.from_pretrained(tiny_bpe_model_dir), path, "f16", "tiny")
    metadata, tensors = read_gguf(path)
    config = model.config
    attention = model.model.layers[1].self_attn
    stored_q = dequantize(tensors["blk.1.attn_q.weight"].data, tensors["blk.1.attn_q.weight"].tensor_type)
    stored_k = dequantize(tensors["blk.1.attn_k.weight"].data, tensors["blk.1.attn_k.weight"].tensor_type)
    q, k = attention.q_proj.weight.detach().numpy(), attention.k_proj.weight.detach().numpy()
    if metadata["general.architecture"] == "llama":
        # Row 2i of a head in the file is row i of the HF head, row 2i+1 is row i + head_dim/2.
        half = config.head_dim // 2
        np.testing.assert_allclose(stored_q[1], q[half], atol=1e-2)
        np.testing.assert_allclose(stored_k[2], k[1], atol=1e-2)
        np.testing.assert_allclose(stored_q, gguf_writer.permute_for_rope(q, config.num_attention_heads), atol=1e-2)
        np.testing.assert_allclose(stored_k, gguf_writer.permute_for_rope(k, config.num_key_value_heads), atol=1e-2)
        assert np.abs(stored_q - q).max() > 0.1
    else:
        np.testing.assert_allclose(stored_q, q, atol=1e-2)
        np.testing.assert_allclose(stored_k, k, atol=1e-2)


def test_gguf_only_keeps_just_the_file_and_the_report(tiny_bpe_run, tmp_path):
    output = tmp_path / "merged"
    result = fold.run_merge(tiny_bpe_run, output, dtype="bf16", formats="gguf", gguf_type="bf16", show_progress=False)
    assert result.failures == [] and result.report["formats"] == ["gguf"]
    assert sorted(path.name for path in output.iterdir()) == ["Modelfile", "merge_report.json", "model-bf16.gguf"]
    report = json.loads((output / "merge_report.json").read_text())
    assert report["gguf"]["verification"]["logits"]["top1_agreement"] == 1.0  # bf16 weights copied as they are
    assert report["verification"]["passed"]  # the merge itself was still checked against the adapter


def test_a_wrong_tensor_layout_fails_the_verification(tiny_bpe_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    # Swap the attention output and value projections: every tensor still has a valid name and shape.
    original = gguf_writer.plan_tensors

    def swapped(state_dict, config, arch, gguf_type):
        plans = original(state_dict, config, arch, gguf_type)
        rename = {"attn_output": "attn_q", "attn_q": "attn_output"}
        return [
            gguf_writer.TensorPlan(".".join(rename.get(part, part) for part in plan.name.split(".")), plan.source, plan.shape, plan.qtype)
            for plan in plans
        ]

    monkeypatch.setattr(gguf_writer, "plan_tensors", swapped)
    failed = CliRunner().invoke(app, ["merge", str(tiny_bpe_run), "--output", str(tmp_path / "out"), "--dtype", "fp32", "--format", "gguf"])
    assert failed.exit_code == 6 and "GGUF top-1 agreement" in failed.output, failed.output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert not report["gguf"]["verification"]["passed"] and report["verification"]["passed"]


def test_refuses_other_architectures_and_bad_options_before_writing(tiny_bpe_run, tmp_path):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    output = tmp_path / "out"
    with pytest.raises(ModelError, match=r"supports llama, mistral, mixtral, qwen2, qwen3, phi3, gemma2, gemma3_text models; this model is 'gpt2' \(GPT2LMHeadModel\)"):
        fold.run_merge(tiny_bpe_run, output, formats="gguf", overrides=[f"model.path={gpt2}"], show_progress=False)
    with pytest.raises(ConfigError, match="--gguf-type 'q3_k'"):
        fold.run_merge(tiny_bpe_run, output, formats="gguf", gguf_type="q3_k", show_progress=False)
    with pytest.raises(ConfigError, match="--format 'onnx'"):
        fold.run_merge(tiny_bpe_run, output, formats="onnx", show_progress=False)
    assert not output.exists() and list(tmp_path.glob(".out.*")) == []


def test_a_gemma3_with_its_vision_tower_is_refused_in_one_line_and_its_text_model_is_written():
    from tests.families import family_config

    with pytest.raises(ModelError, match=r"this gemma3 model has a vision tower.*separate mmproj file: use --format hf"):
        gguf_arch.check_architecture(family_config("gemma3_multimodal", 64))
    assert gguf_arch.check_architecture(family_config("gemma3", 64).__class__(**{**family_config("gemma3", 64).to_dict(),
                                                                             "query_pre_attn_scalar": 16})) == "gemma3"


def test_pre_tokenizer_is_named_by_behaviour():
    gpt2, qwen2 = build_tiny_bpe_tokenizer("gpt-2"), build_tiny_bpe_tokenizer("qwen2")
    assert gguf_tokenizer.pre_tokenizer_name(gpt2, gguf_tokenizer.backend_json(gpt2)) == "gpt-2"
    assert gguf_tokenizer.pre_tokenizer_name(qwen2, gguf_tokenizer.backend_json(qwen2)) == "qwen2"


def test_rope_permutation_is_undone_by_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 4 heads of dimension 8
    permuted = gguf_writer.permute_for_rope(weight, 4)
    assert not np.array_equal(permuted, weight)
    undone = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 4})._reverse_permute_weights(permuted, 4, 4)
    np.testing.assert_array_equal(undone, weight)
