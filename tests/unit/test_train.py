"""`qlora train` on the tiny Llama: the loss falls, the adapter round-trips through peft,
output directories are guarded, and an interrupted run resumes onto the same curve."""

import json
import os
import signal

import pytest
import torch
from transformers import TrainerCallback

from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.model import loading, quantized
from qlora_cli.train.checkpointing import checkpoints
from qlora_cli.train.run import run_training
from tests.conftest import losses, recipe_from


def test_training_lowers_loss_and_saves_a_peft_adapter(recipe_dict, tiny_model_dir):
    recipe = recipe_from(recipe_dict, train={"max_steps": 30, "learning_rate": 3e-2, "save_steps": 100})
    result = run_training(recipe, show_progress=False)
    out = result.output_dir
    curve = losses(out)
    assert curve[30] < 0.6 * curve[1]
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "metrics.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert result.info["vllm"] == "serves the adapter: vllm serve BASE --enable-lora --lora-modules NAME=RUN_DIR"
    assert {name.rpartition(".")[2] for name in adapter_config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    metrics = json.loads((out / "metrics.json").read_text())
    # r * (in + out) per adapted linear: q,o 64->64; k,v 64->32; gate,up 64->128; down 128->64; two layers.
    per_layer = 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert metrics["tokens_seen"] > 0 and metrics["trainable_params"] == 2 * per_layer

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[3, 5, 6, 7]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, out)(ids).logits
    assert not torch.allclose(before, after, atol=1e-4), "the trained adapter must change the logits"


class EvaluateEveryStep(TrainerCallback):
    """Record LoRA gradient norms: they must stay non-zero after each evaluation."""

    def __init__(self):
        self.grad_norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grad_norms.append(sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None))


def test_qlora_keeps_learning_when_evaluation_runs_between_steps(recipe_dict):
    recipe = recipe_from(
        recipe_dict,
        quantization={"bits": 4},
        data={"eval_split": 0.25},
        train={"max_steps": 10, "learning_rate": 1e-2, "eval_steps": 1, "save_steps": 100},
    )
    probe = EvaluateEveryStep()
    result = run_training(recipe, show_progress=False, callbacks=(probe,))
    curve = losses(result.output_dir)
    history = json.loads((result.output_dir / "metrics.json").read_text())["log_history"]
    assert sum(1 for entry in history if "eval_loss" in entry) >= 10
    assert curve[10] < 0.8 * curve[1]
    assert len(probe.grad_norms) == 10 and min(probe.grad_norms) > 0


def test_unpack_restores_weights_repacked_by_cpu_inference(tiny_model_dir, recipe_dict):
    import bitsandbytes.functional as F

    recipe = recipe_from(recipe_dict, quantization={"bits": 4})
    model = loading.load_base_model(recipe)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    originals = [layer.weight.data.clone() for layer in layers]
    for layer in layers:  # what bitsandbytes does in an eval forward on AVX512-BF16 CPUs
        layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert quantized.unpack_cpu_4bit_weights(model) == len(layers) > 0
    for layer, original in zip(layers, originals):
        assert not layer.weight.quant_state.packing_format_for_cpu
        assert torch.equal(layer.weight.data.view(-1), original.view(-1))
    assert quantized.unpack_cpu_4bit_weights(model) == 0


def test_non_empty_output_dir_is_refused_and_nothing_is_touched(recipe_dict, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ResourceError, match="not empty.*--resume.*--force"):
        run_training(recipe_from(recipe_dict), show_progress=False)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_resume_without_checkpoint_is_an_error(recipe_dict):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_training(recipe_from(recipe_dict), resume=True, show_progress=False)


def test_force_replaces_a_run_directory(recipe_dict, tmp_path):
    first = run_training(recipe_from(recipe_dict, train={"max_steps": 3}), show_progress=False)
    out = first.output_dir
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    run_training(recipe_from(recipe_dict), force=True, show_progress=False)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"], "the old run is gone, not mixed in"
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2 and (out / "adapter_model.safetensors").is_file()


def test_force_never_deletes_files_that_training_did_not_write(recipe_dict, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.jsonl").write_text("mine")
    (out / "merged").mkdir()
    with pytest.raises(ResourceError, match=r"--force replaces a run directory, but output.dir .* also holds merged, train.jsonl"):
        run_training(recipe_from(recipe_dict), force=True, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["merged", "train.jsonl"]

    (out / "train.jsonl").unlink()
    (out / "merged").rmdir()
    (out / "recipe.yaml").write_text("a run's")
    monkeypatch.chdir(out)
    with pytest.raises(ResourceError, match="holds the current directory"):
        run_training(recipe_from(recipe_dict), force=True, show_progress=False)
    assert (out / "recipe.yaml").read_text() == "a run's"


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_run_resumes_onto_the_same_curve(recipe_dict, tmp_path):
    settings = {"max_steps": 8, "learning_rate": 5e-3, "save_steps": 100, "logging_steps": 1}
    reference = run_training(recipe_from(recipe_dict, train=settings, output={"dir": str(tmp_path / "ref")}), show_progress=False)

    recipe = recipe_from(recipe_dict, train=settings, output={"dir": str(tmp_path / "cut")})
    first = run_training(recipe, show_progress=False, callbacks=(InterruptAt(3),))
    assert first.interrupted and first.metrics["global_step"] == 3
    assert [p.name for p in checkpoints(first.output_dir)] == ["checkpoint-3"]
    assert not (first.output_dir / "adapter_model.safetensors").exists()

    resumed = run_training(recipe, resume=True, show_progress=False)
    assert not resumed.interrupted and resumed.metrics["global_step"] == 8
    cut_curve, ref_curve = losses(resumed.output_dir), losses(reference.output_dir)
    assert sorted(cut_curve) == list(range(1, 9))
    for step in range(1, 9):
        assert cut_curve[step] == pytest.approx(ref_curve[step], rel=1e-3), step
    assert resumed.metrics["tokens_seen"] == reference.metrics["tokens_seen"]


def learning_rates(output_dir):
    history = json.loads((output_dir / "metrics.json").read_text())["log_history"]
    return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}


class RecordWeightDecay(TrainerCallback):
    def __init__(self):
        self.decays = set()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.decays.update(group["weight_decay"] for group in optimizer.param_groups)


def test_resume_applies_a_new_learning_rate_schedule_and_weight_decay(recipe_dict, tmp_path):
    """After a NaN one resumes with a lower learning rate: it must take effect (loading the
    checkpoint's optimizer and scheduler would silently put the old one back)."""
    new = {"max_steps": 6, "learning_rate": 1e-3, "lr_scheduler": "linear", "warmup_steps": 2, "weight_decay": 0.1}
    reference = run_training(recipe_from(recipe_dict, train=new, output={"dir": str(tmp_path / "ref")}), show_progress=False)

    old = {"max_steps": 3, "learning_rate": 5e-3, "lr_scheduler": "cosine", "save_steps": 3}
    first = run_training(recipe_from(recipe_dict, train=old, output={"dir": str(tmp_path / "cut")}), show_progress=False)
    seen = RecordWeightDecay()
    resumed = run_training(recipe_from(recipe_dict, train={**old, **new}, output={"dir": str(tmp_path / "cut")}),
                           resume=True, show_progress=False, callbacks=(seen,))
    assert seen.decays and all(decay in (0.0, 0.1) for decay in seen.decays) and 0.1 in seen.decays, seen.decays
    assert resumed.info["resumed_from"].endswith("checkpoint-3") and resumed.metrics["global_step"] == 6
    got, want = learning_rates(first.output_dir), learning_rates(reference.output_dir)
    assert (got[2], got[3]) == pytest.approx((5e-3, 2.5e-3))  # the old schedule before the resume (1 warm-up step, cosine)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-9), (step, got, want)
    assert "learning_rate: 0.001" in (first.output_dir / "recipe.yaml").read_text()


@pytest.mark.parametrize("section, change, named", [
    ("lora", {"r": 8}, "lora.r 4 -> 8"),
    ("train", {"micro_batch_size": 2}, "train.micro_batch_size 4 -> 2"),
    ("data", {"max_seq_len": 32}, "data.max_seq_len 64 -> 32"),
])
def test_resume_refuses_a_recipe_change_the_checkpoint_contradicts(recipe_dict, section, change, named):
    first = run_training(recipe_from(recipe_dict), show_progress=False)
    with pytest.raises(ConfigError, match="--resume continues") as raised:
        run_training(recipe_from(recipe_dict, **{section: change}), resume=True, show_progress=False)
    assert named in str(raised.value) and "output.dir=NEW" in str(raised.value)
    assert json.loads((first.output_dir / "metrics.json").read_text())["global_step"] == 2  # nothing touched


def test_a_moved_run_directory_resumes_where_it_is_now(recipe_dict, tmp_path):
    from qlora_cli.recipe.loader import load_recipe

    first = run_training(recipe_from(recipe_dict), show_progress=False)
    moved = tmp_path / "moved"
    first.output_dir.rename(moved)
    recipe = load_recipe(moved, ["train.max_steps=3"])
    assert recipe.output.dir == str(moved), "a run directory is its own output.dir"
    resumed = run_training(recipe, resume=True, show_progress=False)
    assert resumed.info["resumed_from"] == str(moved / "checkpoint-2") and resumed.metrics["global_step"] == 3
    assert not first.output_dir.exists(), "nothing is written where the run used to be"
    assert f"dir: {moved}" in (moved / "recipe.yaml").read_text()


def test_a_folder_that_only_holds_a_recipe_keeps_the_recipes_output_dir(recipe_dict, tmp_path):
    """`qlora train .` in a project folder (where `qlora init` wrote recipe.yaml) must not make the
    project its output.dir, which --force would clear."""
    import yaml

    from qlora_cli.recipe.loader import load_recipe

    project = tmp_path / "project"
    project.mkdir()
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict))
    (project / "notes.txt").write_text("mine")
    assert load_recipe(project).output.dir == recipe_dict["output"]["dir"]
