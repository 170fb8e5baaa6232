"""GRPO (Shao et al. 2024) on TRL's GRPOTrainer: for each prompt, `num_generations` sampled completions
are scored by the recipe's rewards (evaluate/rewards.py) and each is pushed up or down by how it ranks
in its group, with an optional KL penalty towards the base (the adapter disabled)."""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer

from qlora_cli.evaluate.rewards import check_recipe_rewards, checked_rewards
from qlora_cli.model import quantized
from qlora_cli.train import distributed
from qlora_cli.train.objectives.base import Objective, restore_reference_and_dtypes, trainable_dtypes, trl_config_kwargs, trl_trainer_class

CURVES = ("reward", "rewards/*/mean", "kl", "completions/mean_length")


class GeneratedBatches:
    """The batch a GRPO step trains on is generated inside the step: its tokens (prompt and completion)
    are counted once generated, and 4-bit weights a CPU generation repacked are restored before the loss."""

    def count_tokens(self, inputs) -> int:
        return 0  # counted in _prepare_inputs, once the completions exist

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and isinstance(inputs, dict) and "completion_mask" in inputs:
            if self.quantized_on_cpu:
                quantized.unpack_cpu_4bit_weights(self.model)
            tokens = int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            self.token_meter.add(distributed.all_reduce_sum(tokens, self.args.device), self.state)
        return inputs


def build(ready, args_kwargs: dict, trainer_kwargs: dict):
    recipe = ready.recipe
    grpo = recipe.grpo
    functions = checked_rewards(recipe, [ready.train_set[0]])
    args = GRPOConfig(
        **trl_config_kwargs(args_kwargs),
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_len,
        temperature=grpo.temperature,
        beta=grpo.beta,
        reward_weights=[reward.weight for reward in grpo.rewards],
        use_vllm=grpo.use_vllm,
        generation_kwargs={"use_cache": True},  # training turned the model's KV cache off; generation needs it
        log_completions=False,
    )
    dtypes = trainable_dtypes(ready.adapter.model)
    trainer = trl_trainer_class(GRPOTrainer, GeneratedBatches)(args=args, reward_funcs=functions, **trainer_kwargs)
    restore_reference_and_dtypes(trainer, dtypes, continued=ready.recipe.model.init_adapter is not None)
    return trainer


OBJECTIVE = Objective("grpo", "group-relative policy optimisation with reward functions on generated completions", build, CURVES, check_recipe_rewards)
