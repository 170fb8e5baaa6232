"""`qlora merge` beyond LoRA: an IA3 adapter folds into the weights (verified against the
unmerged model); prompt-based and bottleneck adapters are refused in one line saying why."""

import pytest
import torch

from qlora_cli.errors import ModelError
from qlora_cli.merge import fold
from qlora_cli.model import adapters, loading
from qlora_cli.recipe.loader import recipe_to_yaml, validate_recipe
from tests.conftest import write_jsonl
from tests.unit.tiny_run import chat_rows


def method_run(folder, model_dir, method):
    """A run directory with a `method` adapter whose weights moved away from their initial values."""
    folder.mkdir(parents=True)
    data = write_jsonl(folder.parent / "rows.jsonl", chat_rows())
    recipe = validate_recipe({
        "model": {"path": str(model_dir), "dtype": "float32"}, "quantization": {"bits": 16}, "adapter": {"method": method},
        "data": {"train": str(data), "eval": str(data), "format": "chat", "max_seq_len": 64},
        "output": {"dir": str(folder)},
    })
    (folder / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    torch.manual_seed(0)
    adapter = adapters.attach(loading.prepare_for_training(loading.load_base_model(recipe), False), recipe)
    model = adapter.model
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    adapter.save(folder)
    loading.load_tokenizer(recipe.model).save_pretrained(folder)
    return folder


def test_ia3_merges_and_matches_the_adapter(tmp_path, tiny_model_dir):
    run = method_run(tmp_path / "run", tiny_model_dir, "ia3")
    result = fold.run_merge(run, tmp_path / "merged", dtype="fp32", show_progress=False)
    check = result.report["verification"]["merge_exactness"]
    assert result.failures == [] and check["top1_agreement"] == 1.0 and check["mean_kl"] < 1e-6


@pytest.mark.parametrize("method,reason", [
    ("prompt_tuning", "soft prompt is an input"),
    ("prefix_tuning", "prefixes are extra attention keys/values"),
    ("bottleneck", "non-linear"),
])
def test_methods_without_a_weight_change_are_refused(tmp_path, tiny_model_dir, method, reason):
    run = method_run(tmp_path / "run", tiny_model_dir, method)
    with pytest.raises(ModelError, match=reason) as caught:
        fold.run_merge(run, tmp_path / "merged", show_progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "merged").exists()
