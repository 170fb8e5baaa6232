"""One entry per adapter method: the recipe's schema, the registry that builds and saves adapters,
and the estimate's trainable tensors name the same methods; and `qlora estimate --measure` measures
the model `qlora train` builds."""

from __future__ import annotations

import typing

import pytest

from qlora_cli.estimate import measure, step
from qlora_cli.estimate.methods import METHOD_TENSORS
from qlora_cli.model.adapters import registry
from qlora_cli.recipe.adapter_section import METHOD_SECTIONS, PROMPT_METHODS, Method
from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.train import run


def test_schema_registry_and_estimate_name_the_same_methods():
    schema = set(typing.get_args(Method))
    assert set(registry.METHODS) == schema == set(METHOD_TENSORS)
    assert set(METHOD_SECTIONS) == schema - {"lora"}  # LoRA keeps its own `lora:` section
    assert {name for name, entry in registry.METHODS.items() if entry.virtual_tokens} == set(PROMPT_METHODS)


def test_every_method_builds_by_peft_or_by_itself_and_says_whether_it_merges():
    for entry in registry.METHODS.values():
        assert (entry.peft_config is None) != (entry.attach is None), entry.name
        assert registry.by_peft_type(entry.peft_type) is entry
        assert entry.description
    assert {name for name, entry in registry.METHODS.items() if entry.why_not_mergeable is None} == {"lora", "ia3"}


def test_estimate_measure_builds_the_model_train_builds(tmp_path, monkeypatch):
    """measure, trace and train all build through train/run.py's build_model (estimate/step.py is the one
    caller on the estimate side)."""
    recipe = validate_recipe({"model": {"path": str(tmp_path)}, "data": {"train": "x.jsonl", "format": "text"}, "output": {"dir": str(tmp_path / "run")}})
    calls = []

    class Built(Exception):
        pass

    def build_model(seen):
        calls.append(seen)
        raise Built

    monkeypatch.setattr(step, "build_model", build_model)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(Built):
        measure.measure_peak(recipe)
    assert calls == [recipe]
    assert step.build_model is build_model and run.build_model.__module__ == "qlora_cli.train.run"
    import inspect

    assert "build_model(recipe)" in inspect.getsource(run.setup), "train's setup must build through build_model"
