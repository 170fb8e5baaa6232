"""KTO (Ethayarajh et al. 2024) on TRL's KTOTrainer (stable since TRL 1.x; trl.experimental.kto is a
deprecated alias): unpaired rows, each completion labelled desirable or not, against the base (the
adapter disabled) as reference."""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer

from qlora_cli.train.objectives.base import Objective, restore_reference_and_dtypes, trainable_dtypes, trl_config_kwargs, trl_trainer_class

CURVES = ("rewards/chosen_sum", "rewards/rejected_sum", "kl")


class UnpairedRows:
    """data/preference.py tokenized the rows; KTO's KL estimate pairs each prompt with its batch
    neighbour's completion, so the rows are shuffled once here and then read in order."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if dataset_name == "train":
            dataset = dataset.shuffle(seed=args.seed).flatten_indices()
        if self.calculate_KL:
            def rotate(batch):  # (x_1, y_n), (x_2, y_1), ... as TRL's own preparation does
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def build(ready, args_kwargs: dict, trainer_kwargs: dict):
    preference = ready.recipe.preference
    args = KTOConfig(
        **{**trl_config_kwargs(args_kwargs), "train_sampling_strategy": "sequential"},
        beta=preference.beta,
        desirable_weight=preference.desirable_weight,
        undesirable_weight=preference.undesirable_weight,
        precompute_ref_log_probs=preference.precompute_ref_log_probs,
        max_length=None,
    )
    dtypes = trainable_dtypes(ready.adapter.model)
    trainer = trl_trainer_class(KTOTrainer, UnpairedRows)(args=args, **trainer_kwargs)
    restore_reference_and_dtypes(trainer, dtypes, continued=ready.recipe.model.init_adapter is not None)
    return trainer


OBJECTIVE = Objective("kto", "Kahneman-Tversky optimisation on unpaired completions labelled desirable or not", build, CURVES)
