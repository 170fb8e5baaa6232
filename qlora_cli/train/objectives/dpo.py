"""DPO (Rafailov et al. 2023) and its loss variants sigmoid, ipo, hinge, robust on TRL's DPOTrainer;
`loss_type: simpo` (reference-free, length-normalised) on TRL's experimental CPOTrainer."""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer

from qlora_cli.train.objectives.base import (
    Objective,
    PairRows,
    PreTokenized,
    restore_reference_and_dtypes,
    trainable_dtypes,
    trl_config_kwargs,
    trl_trainer_class,
)

CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def build(ready, args_kwargs: dict, trainer_kwargs: dict):
    preference = ready.recipe.preference
    if preference.loss_type == "simpo":
        return build_simpo(ready, args_kwargs, trainer_kwargs)
    args = DPOConfig(
        **trl_config_kwargs(args_kwargs),
        beta=preference.beta,
        loss_type=[preference.loss_type],
        label_smoothing=preference.label_smoothing,
        precompute_ref_log_probs=preference.precompute_ref_log_probs,
        max_length=None,  # data/preference.py cut the rows to data.max_seq_len, keeping each prompt whole
    )
    dtypes = trainable_dtypes(ready.adapter.model)
    trainer = trl_trainer_class(DPOTrainer, PreTokenized)(args=args, **trainer_kwargs)
    restore_reference_and_dtypes(trainer, dtypes, continued=ready.recipe.model.init_adapter is not None)
    return trainer


def build_simpo(ready, args_kwargs: dict, trainer_kwargs: dict):
    """SimPO: CPO's loss with loss_type simpo and no behaviour-cloning term (cpo_alpha 0); no reference at all."""
    preference = ready.recipe.preference
    args = CPOConfig(
        **trl_config_kwargs(args_kwargs),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=preference.beta,
        simpo_gamma=preference.simpo_gamma,
        max_length=ready.recipe.data.max_seq_len,  # rows are already cut to it (data/preference.py)
    )
    dtypes = trainable_dtypes(ready.adapter.model)
    trainer = trl_trainer_class(CPOTrainer, PairRows)(args=args, **trainer_kwargs)
    restore_reference_and_dtypes(trainer, dtypes, continued=ready.recipe.model.init_adapter is not None)
    return trainer


OBJECTIVE = Objective("dpo", "direct preference optimisation on (prompt, chosen, rejected) pairs", build, CURVES)
