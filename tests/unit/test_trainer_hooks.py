"""The private Trainer hooks QloraTrainerMixin overrides (the table in train/trainer.py) must exist
in the installed transformers with the arguments we pass: a release that renames or reshapes one
fails here, loudly, instead of silently skipping our override."""

from __future__ import annotations

import inspect

import pytest
import transformers
from transformers import Trainer

from qlora_cli.train.trainer import PRIVATE_HOOKS, QloraTrainer, QloraTrainerMixin, trainer_class


@pytest.mark.parametrize("hook", PRIVATE_HOOKS)
def test_each_overridden_private_hook_exists_with_our_arguments(hook):
    assert hasattr(Trainer, hook), f"transformers {transformers.__version__} has no Trainer.{hook}; see train/trainer.py"
    # Ours names the arguments it reads (the rest it passes on through *args / **kwargs).
    named = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ours = [name for name, param in inspect.signature(getattr(QloraTrainerMixin, hook)).parameters.items() if param.kind not in named]
    theirs = list(inspect.signature(getattr(Trainer, hook)).parameters)
    assert ours == theirs[: len(ours)], f"Trainer.{hook}{inspect.signature(getattr(Trainer, hook))} changed"


def test_the_table_in_the_module_lists_every_private_override():
    overridden = {name for name in vars(QloraTrainerMixin) if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert overridden == set(PRIVATE_HOOKS)
    doc = inspect.getmodule(QloraTrainerMixin).__doc__
    assert all(f"`{hook}`" in doc for hook in PRIVATE_HOOKS)


def test_the_mixin_goes_on_any_trainer_class():
    class OtherTrainer(Trainer):
        pass

    combined = trainer_class(OtherTrainer)
    assert combined.__mro__[1:3] == (QloraTrainerMixin, OtherTrainer)
    assert trainer_class() is QloraTrainer
