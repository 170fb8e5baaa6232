"""What vLLM (`vllm serve BASE --enable-lora`) can serve, decided from the adapter's saved config
as vLLM decides it: a plain LoRA serves (with --max-lora-rank above rank 16), DoRA, modules_to_save,
per-layer ranks, trained biases and other methods are named with what to serve instead."""

import pytest

from qlora_cli.model.adapters import vllm_rules

LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def test_a_plain_lora_serves_and_a_rank_above_16_names_the_flag():
    assert vllm_rules.check(LORA).servable and vllm_rules.check(LORA).flags == ["--enable-lora"]
    assert vllm_rules.summary(LORA, True) == "serves the adapter: vllm serve BASE --enable-lora --lora-modules NAME=RUN_DIR"
    assert vllm_rules.check(LORA | {"r": 17}).flags == ["--enable-lora", "--max-lora-rank 32"]
    assert vllm_rules.check(LORA | {"r": 300}).flags[-1] == "--max-lora-rank 320"
    assert "above vLLM's largest --max-lora-rank (512)" in vllm_rules.check(LORA | {"r": 1024}).problems[0]


@pytest.mark.parametrize("change, named", [
    ({"use_dora": True}, "does not serve DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save (lm_head trained in full)"),
    ({"rank_pattern": {"q_proj": 8}}, "per-layer ranks"),
    ({"alpha_pattern": {"q_proj": 8}}, "per-layer ranks and alphas"),
    ({"bias": "lora_only"}, "--enable-lora-bias"),
    ({"peft_type": "IA3"}, "LoRA adapters only, not IA3"),
])
def test_what_vllm_refuses_is_named_with_what_to_serve_instead(change, named):
    config = LORA | change
    assert not vllm_rules.check(config).servable
    line = vllm_rules.summary(config, True)
    assert named in line and line.endswith("serve the merged checkpoint instead (qlora merge RUN_DIR, then vllm serve OUTPUT)")
    assert vllm_rules.summary(config, True, merged="out/m").endswith("vllm serve out/m")


def test_an_adapter_that_cannot_merge_points_to_transformers():
    line = vllm_rules.summary({"peft_type": "PREFIX_TUNING"}, False)
    assert "not PREFIX_TUNING" in line and line.endswith("serve it with transformers + peft (qlora generate), or train a LoRA adapter")
    assert "not BOTTLENECK" in vllm_rules.summary({"method": "bottleneck"}, False)
