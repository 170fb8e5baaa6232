"""What the run optimises (`train.objective`) and the recipe sections of the objectives beyond
supervised fine-tuning: `preference:` (DPO and its loss variants, SimPO, KTO, ORPO) and `grpo:`
(generations, rewards, KL). Which data format each objective reads is checked here too.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

Objective = Literal["sft", "dpo", "kto", "orpo", "grpo"]
BUILTIN_REWARDS = ("exact_match", "normalized_match", "regex_match", "format", "length_penalty")
# The data formats each objective trains on.
OBJECTIVE_FORMATS = {
    "sft": ("text", "alpaca", "chat", "prompt_completion"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("unpaired_preference",),
    "grpo": ("prompt_only",),
}
SECTION_OF = {"dpo": "preference", "kto": "preference", "orpo": "preference", "grpo": "grpo"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreferenceSection(_Section):
    beta: float = Field(
        0.1, gt=0,
        description="How far the adapter may move from the reference: DPO's beta (IPO's tau), KTO's beta, ORPO's lambda, SimPO's beta.",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = Field(
        "sigmoid",
        description="DPO loss: sigmoid (DPO), ipo, hinge (SLiC), robust (label noise, see label_smoothing), or simpo "
        "(reference-free, length-normalised; runs TRL's experimental CPO trainer).",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="loss_type robust: the assumed probability that a pair's label is flipped.")
    simpo_gamma: float = Field(0.5, ge=0, description="loss_type simpo: the target reward margin (gamma / beta in the SimPO paper).")
    precompute_ref_log_probs: bool = Field(
        False, description="DPO: score the reference once over the data before training (one no-grad pass) instead of at every step."
    )
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable (label true) rows' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable (label false) rows' loss.")


class RewardSection(_Section):
    function: str = Field(
        description="A built-in reward (exact_match, normalized_match, regex_match, format, length_penalty) or your own "
        "`module:function` with TRL's signature f(prompts, completions, **columns) -> list of floats.",
    )
    weight: float = Field(1.0, description="This reward's weight in the sum GRPO ranks the generations by.")
    pattern: Optional[str] = Field(None, description="regex_match / format: the regular expression a completion must match (re.search / re.fullmatch).")
    target_tokens: Optional[int] = Field(None, gt=0, description="length_penalty: completions of one up to this many words score 1, longer ones less, an empty one 0.")

    @field_validator("function")
    @classmethod
    def _known(cls, value: str):
        if value not in BUILTIN_REWARDS and ":" not in value:
            raise ValueError(f"{value!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor a `module:function`")
        return value

    def check(self, where: str) -> None:
        if self.function in ("regex_match", "format") and not self.pattern:
            raise ValueError(f"{where}: reward {self.function} needs a `pattern` (a regular expression)")
        if self.function == "length_penalty" and not self.target_tokens:
            raise ValueError(f"{where}: reward length_penalty needs `target_tokens`")


class GrpoSection(_Section):
    rewards: list[RewardSection] = Field([], description="Reward functions, each with its weight; their weighted sum ranks a prompt's generations.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group whose rewards are compared).")
    max_completion_len: int = Field(32, gt=0, description="Tokens generated per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generations.")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference (the base, adapter disabled); 0 = none and no reference forward.")
    use_vllm: bool = Field(False, description="Generate with vLLM (CUDA, vllm installed); default: transformers' generate.")


def check(recipe) -> None:
    """Objective, data format and sections that disagree (ValueError, one line)."""
    objective, data_format = recipe.train.objective, recipe.data.format
    formats = OBJECTIVE_FORMATS[objective]
    if data_format not in formats:
        hint = f"set data.format: {formats[0]}" if len(formats) == 1 else f"use one of {', '.join(formats)}"
        users = [name for name, known in OBJECTIVE_FORMATS.items() if data_format in known]
        raise ValueError(f"data.format {data_format} is for objective {users[0]}, not {objective}; {hint} or train.objective: {users[0]}")
    for section in ("preference", "grpo"):
        if section in recipe.model_fields_set and SECTION_OF.get(objective) != section:
            raise ValueError(f"the recipe gives `{section}` settings but train.objective is {objective}; remove them or change the objective")
    if objective == "sft":
        return
    if recipe.adapter.method != "lora":
        raise ValueError(f"train.objective {objective} trains a lora adapter (its reference is the base with the adapter disabled); set adapter.method: lora")
    if recipe.data.packing:
        raise ValueError(f"data.packing does not apply to objective {objective} (its trainer pads each pair or prompt); set data.packing: false")
    if objective == "grpo":
        if not recipe.grpo.rewards:
            raise ValueError("objective grpo needs at least one reward under grpo.rewards")
        for number, reward in enumerate(recipe.grpo.rewards):
            reward.check(f"grpo.rewards[{number}]")
        batch = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps
        if batch % recipe.grpo.num_generations:
            raise ValueError(
                f"train.micro_batch_size x gradient_accumulation_steps ({batch}) must be a multiple of grpo.num_generations "
                f"({recipe.grpo.num_generations}): each step scores whole groups of completions"
            )
    if objective == "kto" and recipe.train.micro_batch_size < 2:
        raise ValueError("objective kto estimates its KL term from the other rows of a micro-batch: set train.micro_batch_size: 2 or more")
    preference = recipe.preference
    if preference.loss_type != "sigmoid" and objective != "dpo":
        raise ValueError(f"preference.loss_type applies to objective dpo, not {objective}")
    if preference.loss_type == "simpo" and preference.precompute_ref_log_probs:
        raise ValueError("preference.loss_type simpo is reference-free; drop preference.precompute_ref_log_probs")


def sections_to_drop(recipe) -> set:
    """Top-level objective sections the run does not read, left out of the resolved recipe."""
    used = SECTION_OF.get(recipe.train.objective)
    return {name for name in ("preference", "grpo") if name != used}


def prepare_raw(data: dict) -> dict:
    """Before validation: an objective other than sft turns packing off unless the recipe asks for it (refused later)."""
    if not isinstance(data, dict):
        return data
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    section = data.get("data")
    if train.get("objective", "sft") != "sft" and isinstance(section, dict) and "packing" not in section:
        data = {**data, "data": {**section, "packing": False}}
    return data


def describe(recipe) -> str:
    """The objective in one line, as `qlora validate` shows it."""
    objective = recipe.train.objective
    if objective == "sft":
        return "sft (supervised fine-tuning)"
    if objective == "grpo":
        grpo = recipe.grpo
        rewards = ", ".join(f"{r.function} x{r.weight:g}" for r in grpo.rewards)
        return (f"grpo generations={grpo.num_generations} max_completion_len={grpo.max_completion_len} "
                f"temperature={grpo.temperature:g} beta={grpo.beta:g} rewards=[{rewards}]")
    preference = recipe.preference
    loss = f" loss={preference.loss_type}" if objective == "dpo" else ""
    return f"{objective} beta={preference.beta:g}{loss}"
