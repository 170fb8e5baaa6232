"""MoE experts as the installed libraries build them: the tiny Mixtral and Qwen2-MoE loaded in 4-bit
show whether bitsandbytes quantized the experts, and the estimate's layout says the same; Mixtral-8x7B
QLoRA on an 80 GB card gets the verdict of that layout, and the output names it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_cli.estimate import Plan, estimate, resolve, resolve_gpu, verdict
from qlora_cli.estimate.architecture import FUSED, PER_EXPERT, from_config, installed_expert_layout
from qlora_cli.estimate.catalog import find_model
from tests.conftest import invoke
from tests.families import build_family

MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_layout_the_estimate_assumes_is_what_bitsandbytes_did(family, tmp_path):
    build_family(family, 256).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=quant, device_map={"": "cpu"})
    experts = model.model.layers[0].mlp.experts
    expert_weights = [p for name, p in experts.named_parameters()]
    quantized = all(p.dtype == torch.uint8 for p in expert_weights)
    assert expert_weights and quantized == (installed_expert_layout() == PER_EXPERT)
    arch = resolve(str(tmp_path))
    assert arch.expert_layout == installed_expert_layout()
    # The estimate counts the experts' bytes as they were loaded.
    base = estimate(arch, Plan()).details["base_weights"]
    (label,) = [name for name in base if name.startswith("MoE experts")]
    expert_bytes = sum(p.numel() * p.element_size() for p in expert_weights) * arch.num_layers
    router = arch.router_experts * arch.hidden_size * 2 * arch.num_layers
    assert base[label] == expert_bytes + router


def test_mixtral_8x7b_qlora_on_80gb_follows_the_expert_layout():
    hub_id, config = find_model(MIXTRAL)
    card = resolve_gpu("A100-80GB")
    fused = estimate(from_config(config, hub_id, "catalog", expert_layout=FUSED), Plan(seq_len=1024))
    per_expert = estimate(from_config(config, hub_id, "catalog", expert_layout=PER_EXPERT), Plan(seq_len=1024))
    assert verdict(fused, card).state == "does not fit"  # 16-bit experts: ~84 GiB of them alone
    assert verdict(per_expert, card).state == "fits"  # NF4 experts, as transformers < 5 built them


def test_estimate_output_says_how_the_experts_are_stored():
    result = invoke("estimate", "--model", MIXTRAL, "--gpu", "A100-80GB", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    layout_note = [note for note in payload["notes"] if note.startswith("MoE experts:")]
    assert layout_note and ("16-bit" in layout_note[0]) == (installed_expert_layout() == FUSED)
    assert payload["verdict"] == ("does not fit" if installed_expert_layout() == FUSED else "fits")
