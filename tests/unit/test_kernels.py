"""The chunked linear cross-entropy: same loss and gradients as full logits, and the kernel
selection falls back (or refuses) where a model cannot use it."""

import json

import pytest
import torch

from qlora_cli.data.collate import PackingCollator, PaddingCollator
from qlora_cli.errors import ConfigError
from qlora_cli.model.kernels import fused_causal_lm_loss, linear_cross_entropy_sum, select_loss_kernel
from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.train.run import run_training
from tests.conftest import PAD_ID, TOKEN_ROWS, build_tiny_llama


@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_sum_matches_full_logits_with_gradients(weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=weight_trains)
    labels = torch.randint(0, 1000, (300,))
    labels[::3] = -100
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum", ignore_index=-100)
    chunked = linear_cross_entropy_sum(hidden, weight, labels, chunk=64)  # 5 chunks, the last one short
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-4)
    wanted = (hidden, weight) if weight_trains else (hidden,)
    expected = torch.autograd.grad(0.5 * reference, wanted)
    got = torch.autograd.grad(0.5 * chunked, wanted)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_chunked_sum_without_grad_is_the_same_number():
    torch.manual_seed(1)
    hidden, weight = torch.randn(50, 16), torch.randn(200, 16)
    labels = torch.randint(0, 200, (50,))
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, labels, chunk=7), reference, rtol=1e-5, atol=1e-4)


def _lora_tiny_llama():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(vocab_size=32, seed=3)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    return model


@pytest.mark.parametrize("collator", [PackingCollator(), PaddingCollator(pad_token_id=PAD_ID)], ids=["packed", "padded"])
def test_fused_model_loss_equals_the_model_loss_and_its_gradients(collator):
    model = _lora_tiny_llama()
    kernel = select_loss_kernel("auto", model)
    assert kernel.name == "chunked"
    batch = collator(TOKEN_ROWS)
    for num_items in (None, torch.tensor(9)):
        lora = [p for n, p in model.named_parameters() if p.requires_grad]
        expected = model(**batch, num_items_in_batch=num_items).loss if num_items is not None else model(**batch).loss
        expected_grads = torch.autograd.grad(expected, lora)
        got = fused_causal_lm_loss(model, batch, kernel, num_items)
        got_grads = torch.autograd.grad(got, lora)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_kernel_selection_falls_back_or_refuses():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(vocab_size=32, seed=3)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    fallback = select_loss_kernel("auto", wrapped)
    assert fallback.name == "standard" and "lm_head" in fallback.reason
    with pytest.raises(ConfigError, match="loss_kernel=standard"):
        select_loss_kernel("chunked", wrapped)
    assert select_loss_kernel("standard", _lora_tiny_llama()).name == "standard"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="liger"):
            select_loss_kernel("liger", _lora_tiny_llama())


def test_training_curve_is_the_same_with_chunked_and_standard_loss(recipe_dict, tmp_path):
    curves = {}
    for kernel in ("chunked", "standard"):
        data = json.loads(json.dumps(recipe_dict))
        data["train"].update(max_steps=4, learning_rate=3e-2, logging_steps=1, loss_kernel=kernel)
        data["lora"]["dropout"] = 0.0
        data["output"]["dir"] = str(tmp_path / kernel)
        result = run_training(validate_recipe(data), show_progress=False)
        assert result.info["loss_kernel"].startswith(kernel)
        curves[kernel] = [entry["loss"] for entry in result.metrics["log_history"] if "loss" in entry]
    assert len(curves["chunked"]) == 4
    assert curves["chunked"] == pytest.approx(curves["standard"], rel=1e-4)


def test_torch_compile_is_opt_in(recipe_dict):
    from qlora_cli.train.arguments import build_training_args

    data = json.loads(json.dumps(recipe_dict))
    assert build_training_args(validate_recipe(data), torch.float32, has_eval=False).torch_compile is False
    data["train"]["compile"] = True
    assert build_training_args(validate_recipe(data), torch.float32, has_eval=False).torch_compile is True
