"""A finished run directory on the tiny Llama of tests/conftest.py, without training: the
from qlora_cli.model import loading
recipe, a LoRA adapter with random (non-zero) A and B so merging changes the outputs, the
tokenizer, and eval data. Shared by the evaluate and merge tests.
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
