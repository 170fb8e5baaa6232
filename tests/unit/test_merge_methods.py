"""`qlora merge` beyond LoRA: an IA3 adapter folds into the weights (verified against the
unmerged model); prompt-based and bottleneck adapters are refused in one line saying why."""

import pytest

from qlora_cli.errors import ModelError
from qlora_cli.merge import fold
from tests.unit.tiny_run import method_run


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
