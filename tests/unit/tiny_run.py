"""Finished run directories on the tiny Llama of tests/conftest.py, without training: the
recipe, an adapter with random (non-zero) weights so merging changes the outputs, the tokenizer,
and eval data. make_run writes a LoRA run, method_run a run of any other adapter method. Shared by
the evaluate, merge, generate and GGUF tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tests.conftest import write_jsonl

PAIRS = [
    ("cat", "music"), ("dog", "sports"), ("red", "weather"), ("blue", "cooking"),
    ("green", "one two three"), ("hello", "technology"), ("world", "yes no"), ("seven", "music"),
]


def chat_rows(pairs=PAIRS) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"which topic is {word} ?"}, {"role": "assistant", "content": answer}]}
        for word, answer in pairs
    ]


def make_run(
    folder: Path,
    model_dir: Path,
    bits: int = 16,
    use_dora: bool = False,
    eval_rows: Optional[list[dict]] = None,
    data: Optional[dict] = None,
    seed: int = 0,
) -> Path:
    """Write run directory `folder` as `qlora train` leaves it; returns the folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_cli.model import loading
    from qlora_cli.recipe.loader import recipe_to_yaml, validate_recipe

    folder.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(folder.parent / f"{folder.name}-train.jsonl", chat_rows())
    eval_file = write_jsonl(folder.parent / f"{folder.name}-eval.jsonl", eval_rows or chat_rows())
    recipe = validate_recipe({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "quantization": {"bits": bits},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": use_dora},
        "data": {"train": str(train_file), "eval": str(eval_file), "format": "chat", "max_seq_len": 64, **(data or {})},
        "train": {"max_steps": 1, "optimizer": "adamw_torch"},
        "output": {"dir": str(folder)},
    })
    (folder / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    torch.manual_seed(seed)
    base = loading.load_base_model(recipe)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora,
        init_lora_weights=False,  # random B: the adapter changes outputs, so a merge that drops it shows
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    loading.load_tokenizer(recipe.model).save_pretrained(folder)
    return folder


def method_run(folder: Path, model_dir: Path, method: str) -> Path:
    """A run directory with a `method` adapter whose weights moved away from their initial values."""
    import torch

    from qlora_cli.model import adapters, loading
    from qlora_cli.recipe.loader import recipe_to_yaml, validate_recipe

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
