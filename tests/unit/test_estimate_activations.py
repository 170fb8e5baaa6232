"""The activation formula against what autograd really saves: a forward pass of a small Llama
with a peft adapter under bf16 autocast, every saved tensor caught with saved_tensors_hooks and
counted once per storage. CPU kernels differ from CUDA in one documented place: CPU dropout keeps
an fp32 mask (4 bytes) where CUDA's fused dropout keeps a bool mask (1 byte)."""

from __future__ import annotations

import pytest

from qlora_cli.estimate import Plan, estimate, from_config, resolve
from qlora_cli.estimate.activations import activation_parts, backward_working_bytes, layer_saved_bytes, logits_bytes, shared_saved_bytes
from tests.conftest import expected_cpu_bytes, measured_saved_bytes, random_batch


def adapted_llama(attention: str, target_modules, dropout: float, **shape):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(shape)
    config = LlamaConfig(**fields, attn_implementation=attention)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    model.config.use_cache = False  # as modeling.prepare_for_training; with a cache, packed rows get no mask
    wrapped = get_peft_model(model, LoraConfig(r=8, target_modules=target_modules, lora_dropout=dropout))
    wrapped.train()
    return wrapped, from_config(config.to_dict(), "tiny", "test")


@pytest.mark.parametrize(
    "attention, targets, dropout, micro_batch, seq_len, tolerance",
    [
        ("sdpa", ["q_proj", "v_proj"], 0.0, 1, 64, 0.02),
        ("sdpa", "all-linear", 0.1, 1, 64, 0.02),
        ("eager", "all-linear", 0.0, 1, 64, 0.02),
        ("eager", ["q_proj", "v_proj"], 0.1, 1, 128, 0.02),
        ("sdpa", "all-linear", 0.0, 2, 32, 0.02),  # packed rows: repeated k/v heads and a float mask per layer
    ],
)
def test_saved_activations_match_autograd(attention, targets, dropout, micro_batch, seq_len, tolerance):
    model, arch = adapted_llama(attention, targets, dropout)
    plan = Plan(attention=attention, target_modules=targets if isinstance(targets, str) else tuple(targets),
                lora_dropout=dropout, lora_r=8, micro_batch=micro_batch, seq_len=seq_len, gradient_checkpointing=False)
    measured = measured_saved_bytes(model, random_batch(plan, arch.vocab_size))
    assert measured == pytest.approx(expected_cpu_bytes(arch, plan), rel=tolerance)


def test_eager_attention_grows_quadratically_and_sdpa_linearly():
    arch = resolve("meta-llama/Llama-3.1-8B")
    short, long = Plan(seq_len=1024, gradient_checkpointing=False), Plan(seq_len=4096, gradient_checkpointing=False)
    sdpa_ratio = layer_saved_bytes(arch, long) / layer_saved_bytes(arch, short)
    eager_ratio = layer_saved_bytes(arch, long.with_changes(attention="eager")) / layer_saved_bytes(arch, short.with_changes(attention="eager"))
    assert sdpa_ratio == pytest.approx(4.0, rel=0.01)
    assert eager_ratio > 6.0


def test_checkpointing_keeps_one_hidden_state_per_layer():
    arch = resolve("meta-llama/Llama-3.1-8B")
    plan = Plan(seq_len=2048)
    parts = activation_parts(arch, plan)
    assert parts["kept until backward"] == 32 * 2 * 2048 * 4096 + shared_saved_bytes(arch, plan)
    assert parts["one layer's backward"] == layer_saved_bytes(arch, plan) + backward_working_bytes(arch, plan)
    without = activation_parts(arch, plan.with_changes(gradient_checkpointing=False))
    assert without["kept until backward"] > 10 * parts["kept until backward"]


def test_logits_are_twelve_bytes_per_token_and_vocab_entry():
    arch = resolve("meta-llama/Llama-3.1-8B")
    assert logits_bytes(arch, Plan(seq_len=2048, micro_batch=2, fused_loss=False)) == 12 * 4096 * 128256


def test_fused_loss_holds_one_chunk_of_logits():
    from qlora_cli.estimate.activations import CHUNK_LOGIT_BYTES
    from qlora_cli.model.kernels import CHUNK_LOGIT_BYTES as KERNEL_CHUNK_BYTES
    from qlora_cli.model.kernels import chunk_tokens

    assert CHUNK_LOGIT_BYTES == KERNEL_CHUNK_BYTES
    arch = resolve("meta-llama/Llama-3.1-8B")
    chunk = chunk_tokens(128256)
    assert chunk == 523
    fused = logits_bytes(arch, Plan(seq_len=2048, micro_batch=2))
    assert fused == chunk * 128256 * (4 + 2) + 2 * 2 * 4096 * 4096  # + the final hidden states it reads and their gradient
    assert fused < logits_bytes(arch, Plan(seq_len=2048, micro_batch=2, fused_loss=False)) / 10
    # Gemma 2 soft-caps its logits inside the chunked kernel: four fp32 chunks (logits, tanh, its
    # square, the slope) instead of one fp32 chunk and its bf16 copy, still far below the full logits.
    gemma = resolve("google/gemma-2-9b")
    gemma_chunk = chunk_tokens(gemma.vocab_size)
    capped = logits_bytes(gemma, Plan(seq_len=1024))
    assert capped == gemma_chunk * gemma.vocab_size * 16 + 2 * 2 * 1024 * gemma.hidden_size
    assert capped < logits_bytes(gemma, Plan(seq_len=1024, fused_loss=False)) / 3


def test_total_grows_with_batch_and_sequence():
    arch = resolve("mistralai/Mistral-7B-v0.3")
    totals = [estimate(arch, Plan(micro_batch=b, seq_len=s)).total for b, s in ((1, 512), (1, 1024), (2, 1024), (4, 1024))]
    assert totals == sorted(totals) and len(set(totals)) == 4
