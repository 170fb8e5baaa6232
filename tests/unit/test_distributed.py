"""Multi-process settings: what each strategy asks of the Trainer, the recipe's guards, resume
across world sizes, --nproc, and the per-GPU estimate under DDP and FSDP."""


import pytest
import torch

from qlora_cli.errors import ConfigError
from qlora_cli.estimate import estimate, plan_from_recipe, resolve
from qlora_cli.model.loading import build_quant_config
from qlora_cli.train import distributed
from tests.conftest import build_tiny_llama, recipe_from

TWO = distributed.World(rank=0, local_rank=0, size=2)
ONE = distributed.World(rank=0, local_rank=0, size=1)


def test_single_process_adds_nothing(recipe_dict):
    assert distributed.training_kwargs(recipe_from(recipe_dict), ONE, on_gpu=False) == {}
    assert distributed.strategy(recipe_from(recipe_dict, distributed={"strategy": "fsdp"}), ONE) == "none"


def test_ddp_on_cpu_uses_gloo_and_skips_the_unused_parameter_search(recipe_dict):
    kwargs = distributed.training_kwargs(recipe_from(recipe_dict), TWO, on_gpu=False)
    assert kwargs["ddp_backend"] == "gloo" and kwargs["use_cpu"] is True
    assert kwargs["ddp_find_unused_parameters"] is False
    assert distributed.training_kwargs(recipe_from(recipe_dict), TWO, on_gpu=True)["ddp_backend"] == "nccl"
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        distributed.training_kwargs(recipe_from(recipe_dict, distributed={"backend": "nccl"}), TWO, on_gpu=False)


def test_fsdp_wraps_the_decoder_layer_class(recipe_dict):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_llama(vocab_size=32), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    kwargs = distributed.training_kwargs(recipe_from(recipe_dict, distributed={"strategy": "fsdp"}), TWO, on_gpu=True, model=model)
    assert kwargs["fsdp"] == "full_shard auto_wrap"
    assert kwargs["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    offload = recipe_from(recipe_dict, distributed={"strategy": "fsdp", "fsdp_cpu_offload": True})
    assert distributed.training_kwargs(offload, TWO, on_gpu=True, model=model)["fsdp"].endswith("offload")


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype(recipe_dict):
    fsdp = recipe_from(recipe_dict, quantization={"bits": 4}, distributed={"strategy": "fsdp"})
    assert build_quant_config(fsdp.quantization, torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert build_quant_config(fsdp.quantization, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    with pytest.raises(ConfigError, match="quant_storage"):
        recipe_from(recipe_dict, quantization={"bits": 4, "quant_storage": "uint8"}, distributed={"strategy": "fsdp"})
    with pytest.raises(ConfigError, match="8-bit"):
        recipe_from(recipe_dict, quantization={"bits": 8}, distributed={"strategy": "fsdp"})


def test_deepspeed_needs_a_readable_config(recipe_dict, tmp_path):
    with pytest.raises(ConfigError, match="deepspeed_config"):
        recipe_from(recipe_dict, distributed={"strategy": "deepspeed"})
    missing = recipe_from(recipe_dict, distributed={"strategy": "deepspeed", "deepspeed_config": str(tmp_path / "ds.json")})
    with pytest.raises(ConfigError, match="does not exist"):
        distributed.training_kwargs(missing, TWO, on_gpu=True)
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        distributed.training_kwargs(missing, TWO, on_gpu=True)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="pip install deepspeed"):
            distributed.training_kwargs(missing, TWO, on_gpu=True)
    else:
        assert distributed.training_kwargs(missing, TWO, on_gpu=True)["deepspeed"] == str(tmp_path / "ds.json")


def test_resume_needs_the_world_size_that_wrote_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for rank in range(2):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    distributed.check_resume_world(checkpoint, TWO)
    with pytest.raises(ConfigError, match="--nproc 2"):
        distributed.check_resume_world(checkpoint, ONE)


def test_nproc_relaunches_through_torchrun_and_refuses_inside_one(monkeypatch):
    command = distributed.launch_command(2, ["train", "r.yaml", "--set=train.max_steps=3"])
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert command[6:] == ["qlora_cli", "train", "r.yaml", "--set=train.max_steps=3"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.world() == distributed.World(rank=1, local_rank=1, size=2)
    with pytest.raises(ConfigError, match="drop --nproc"):
        distributed.check_nproc(2)


def test_estimate_per_gpu_memory_under_ddp_and_fsdp(recipe_dict):
    arch = resolve("meta-llama/Llama-3.1-8B")
    single = estimate(arch, plan_from_recipe(recipe_from(recipe_dict, quantization={"bits": 16})))
    ddp = estimate(arch, plan_from_recipe(recipe_from(recipe_dict, quantization={"bits": 16}), processes=4))
    fsdp = estimate(arch, plan_from_recipe(recipe_from(recipe_dict, quantization={"bits": 16}, distributed={"strategy": "fsdp"}), processes=4))
    assert ddp.breakdown["base_weights"] == single.breakdown["base_weights"]
    assert ddp.breakdown["gradients"] == 2 * single.breakdown["gradients"]  # DDP's buckets
    layer = (single.breakdown["base_weights"] - single.details["base_weights"]["embeddings + lm_head"]) // 32
    assert fsdp.breakdown["base_weights"] == -(-single.breakdown["base_weights"] // 4) + 2 * layer
    assert fsdp.breakdown["optimizer_states"] == -(-single.breakdown["optimizer_states"] // 4)
    assert fsdp.breakdown["activations"] == single.breakdown["activations"]
    assert fsdp.total < single.total < ddp.total
    assert any("FSDP on 4 GPUs" in note for note in fsdp.notes)


def test_a_launchers_echo_of_ctrl_c_does_not_abort_the_checkpoint(monkeypatch):
    from qlora_cli.train.callbacks import StopOnSignal

    single = StopOnSignal()
    single._handle(2, None)
    with pytest.raises(KeyboardInterrupt):  # alone, a second Ctrl-C means "now"
        single._handle(2, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranked = StopOnSignal()
    ranked._handle(2, None)
    ranked._handle(15, None)  # torchrun's SIGTERM right after the terminal's SIGINT
    assert ranked.requested
