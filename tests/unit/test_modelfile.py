"""The Ollama Modelfile written beside a GGUF: its TEMPLATE (Go-template form of the chat template)
renders sample conversations (system, multi-turn, code, unicode) exactly as transformers renders the
Jinja chat template, its stop lines are the end-of-turn tokens, and a template it cannot reproduce
is left out (Ollama then uses the GGUF's own) with the reason in the report."""

import pytest

from qlora_cli.export import modelfile
from qlora_cli.export.probe_texts import CONVERSATIONS
from tests.unit.test_gguf_export import LLAMA2_TEMPLATE, build_tiny_bpe_tokenizer

# SmolLM2's template: ChatML with a default system turn when the conversation has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's: BOS in the template, header tokens, contents trimmed.
LLAMA3_TRIMS = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture
def tokenizer():
    return build_tiny_bpe_tokenizer("gpt-2")


@pytest.mark.parametrize("template", [SMOLLM2, None, LLAMA2_TEMPLATE], ids=["smollm2", "chatml", "llama2"])
def test_go_template_renders_every_sample_conversation_as_the_chat_template(tokenizer, template, tmp_path):
    if template is not None:
        tokenizer.chat_template = template
    report = modelfile.write_modelfile(tmp_path, "model-f16.gguf", tokenizer, None)
    go = report["template"]
    assert go is not None, report
    compared = 0
    for conversation in CONVERSATIONS:
        if conversation[-1]["role"] != "user":
            continue
        try:
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - Llama 2's template has no system role
            continue
        assert modelfile.bos_prefix(tokenizer) + modelfile.render_go(go, conversation) == expected
        compared += 1
    assert compared >= 4 and report["conversations_equal"] == report["conversations"] == compared
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./model-f16.gguf\n") and f'TEMPLATE """{go}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_default_system_turn_only_without_a_system_message(tokenizer):
    tokenizer.chat_template = SMOLLM2
    go = modelfile.go_template(modelfile.template_parts(tokenizer))
    alone = modelfile.render_go(go, [{"role": "user", "content": "hi"}])
    with_system = modelfile.render_go(go, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert alone.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    assert "SmolLM" not in with_system


def test_a_template_that_trims_contents_is_left_out_with_the_reason(tokenizer, tmp_path):
    tokenizer.chat_template = LLAMA3_TRIMS
    report = modelfile.write_modelfile(tmp_path, "model-q4_k_m.gguf", tokenizer, None)
    assert report["template"] is None and "does not reproduce the chat template" in report["template_skipped"]
    assert report["conversations_equal"] < report["conversations"]
    text = (tmp_path / "Modelfile").read_text()
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


def test_stop_lines_come_from_eos_and_the_generation_config(tokenizer, tmp_path):
    from transformers import GenerationConfig

    ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    report = modelfile.write_modelfile(tmp_path, "m.gguf", tokenizer, GenerationConfig(eos_token_id=ids), adapter="adapter-lora.gguf")
    assert report["stop"] == ["<|endoftext|>", "<|im_end|>"]
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\nADAPTER ./adapter-lora.gguf\n")
    assert text.count("PARAMETER stop") == 2


def test_go_renderer_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="unsupported Go-template action"):
        modelfile.render_go("{{ .Prompt }}", [])
    with pytest.raises(ValueError, match="unsupported Go-template condition"):
        modelfile.render_go('{{ range .Messages }}{{ if eq .Name "x" }}a{{ end }}{{ end }}', [{"role": "user", "content": "c"}])
