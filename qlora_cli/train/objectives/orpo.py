"""ORPO (Hong et al. 2024) on TRL's experimental ORPOTrainer: the SFT loss on `chosen` plus an odds-ratio
term that pushes `rejected` down, in one model, with no reference forward."""

from __future__ import annotations

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from qlora_cli.train.objectives.base import Objective, PairRows, restore_reference_and_dtypes, trainable_dtypes, trl_config_kwargs, trl_trainer_class

CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "log_odds_ratio")


def build(ready, args_kwargs: dict, trainer_kwargs: dict):
    args = ORPOConfig(**trl_config_kwargs(args_kwargs), beta=ready.recipe.preference.beta, max_length=ready.recipe.data.max_seq_len)
    dtypes = trainable_dtypes(ready.adapter.model)
    trainer = trl_trainer_class(ORPOTrainer, PairRows)(args=args, **trainer_kwargs)
    restore_reference_and_dtypes(trainer, dtypes, continued=ready.recipe.model.init_adapter is not None)
    return trainer


OBJECTIVE = Objective("orpo", "odds-ratio preference optimisation: SFT on chosen plus a penalty on rejected, reference-free", build, CURVES)
