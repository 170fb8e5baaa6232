"""Rewards for GRPO and for evaluating its runs: the built-ins (exact / normalised / regex match
against the row's reference, a format check, a length penalty) and the user's own `module:function`
(or `path/to/file.py:function`) with TRL's signature f(prompts, completions, **columns) -> floats.
Every reward is resolved and called once on two dry rows before any model loads, so a function that
cannot be imported or returns the wrong shape is one line. Held-out scoring of a GRPO run: greedy
completions of the base and the adapter, mean reward per function, the weighted total, exact match.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from qlora_cli.data.sources import load_rows
from qlora_cli.data.splits import eval_rows_for_generation, tokenize_rows
from qlora_cli.errors import ConfigError, library_message
from qlora_cli.evaluate import inference
from qlora_cli.evaluate.scores import exact_match, normalize_answer
from qlora_cli.model import adapters, loading
from qlora_cli.recipe.objective_section import RewardSection
from qlora_cli.recipe.schema import Recipe


def _references(kwargs: dict, count: int, name: str) -> list[str]:
    references = kwargs.get("reference")
    if references is None:
        raise ConfigError(f"reward {name} compares with the row's reference: add a `reference` column (or map one with data.columns.reference)")
    return [str(value) for value in references][:count]


def exact_match_reward(prompts, completions, **kwargs) -> list[float]:
    """1 when the completion equals the reference (surrounding whitespace aside), else 0."""
    return [float(exact_match(c, r)) for c, r in zip(completions, _references(kwargs, len(completions), "exact_match"))]


def normalized_match_reward(prompts, completions, **kwargs) -> list[float]:
    """1 when completion and reference are equal after case-folding and removing punctuation, else 0."""
    references = _references(kwargs, len(completions), "normalized_match")
    return [float(normalize_answer(c) == normalize_answer(r)) for c, r in zip(completions, references)]


def regex_match_reward(prompts, completions, pattern: str, **kwargs) -> list[float]:
    """1 when the pattern is found in the completion (re.search), else 0."""
    compiled = re.compile(pattern)
    return [float(compiled.search(c) is not None) for c in completions]


def format_reward(prompts, completions, pattern: str, **kwargs) -> list[float]:
    """1 when the whole completion (stripped) has the format (re.fullmatch, DOTALL), else 0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty_reward(prompts, completions, target_tokens: int, **kwargs) -> list[float]:
    """1 from one up to `target_tokens` words, then falling as target / words; an empty completion scores 0
    (else GRPO learns to stop at once: the quickstart's policy did within ten steps)."""
    return [min(1.0, target_tokens / len(c.split())) if c.split() else 0.0 for c in completions]


BUILTINS = {
    "exact_match": exact_match_reward,
    "normalized_match": normalized_match_reward,
    "regex_match": regex_match_reward,
    "format": format_reward,
    "length_penalty": length_penalty_reward,
}


def _import_user_function(spec: str, where: str) -> Callable:
    module_name, _, function_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"{where}: {path} not found; give an existing .py file or an importable module")
            module_spec = importlib.util.spec_from_file_location(f"qlora_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:  # a module beside the recipe, as `python -m` would find it
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module may raise anything while importing
        raise ConfigError(f"{where}: cannot import {module_name!r} for reward {spec!r}: {library_message(exc)}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{where}: {module_name!r} has no function {function_name!r}; name a function as module:function")
    return function


def _named(function: Callable, name: str, settings: dict) -> Callable:
    """The built-in with its recipe settings, named as the recipe names it (TRL logs rewards/<name>/mean)."""

    def reward(prompts, completions, **kwargs):
        return function(prompts, completions, **settings, **kwargs)

    reward.__name__ = name
    return reward


def resolve(reward: RewardSection, where: str) -> Callable:
    """The reward as TRL calls it: f(prompts, completions, **columns) -> list of floats."""
    if reward.function in BUILTINS:
        settings = {"pattern": reward.pattern} if reward.function in ("regex_match", "format") else {}
        if reward.function == "length_penalty":
            settings = {"target_tokens": reward.target_tokens}
        return _named(BUILTINS[reward.function], reward.function, settings)
    return _import_user_function(reward.function, where)


def _columns_of(rows: list[dict]) -> dict:
    return {name: [row.get(name) for row in rows] for name in rows[0]} if rows else {}


def dry_call(function: Callable, spec: str, where: str, rows: list[dict]) -> None:
    """Call a reward on two made-up completions of real rows; a wrong shape or an error is one line."""
    rows = (rows * 2)[:2]
    columns = {name: values for name, values in _columns_of(rows).items() if name != "prompt"}
    prompts = [str(row.get("prompt", "")) for row in rows]
    try:
        values = function(prompts=prompts, completions=["a dry-run completion", "another one"], completion_ids=[[0], [0]], **columns)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:  # the user's function may raise anything
        raise ConfigError(f"{where}: reward {spec!r} failed on a dry call with two completions: {library_message(exc)}") from None
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        got = f"a {type(values).__name__}" + (f" of {len(values)}" if isinstance(values, (list, tuple)) else "")
        raise ConfigError(f"{where}: reward {spec!r} must return a list with one float per completion (2 on the dry call), got {got}")
    bad = [value for value in values if value is not None and not isinstance(value, (int, float))]
    if bad:
        raise ConfigError(f"{where}: reward {spec!r} returned {bad[0]!r}; each value must be a number (or None to skip it)")


def checked_rewards(recipe: Recipe, rows: list[dict]) -> list[Callable]:
    """Every reward of grpo.rewards resolved and dry-called on `rows` (the first raw rows)."""
    functions = []
    for number, reward in enumerate(recipe.grpo.rewards):
        where = f"grpo.rewards[{number}]"
        function = resolve(reward, where)
        dry_call(function, reward.function, where, rows)
        functions.append(function)
    return functions


def check_recipe_rewards(recipe: Recipe) -> None:
    """Every reward resolved and called on the first training rows (as loaded, the reference column mapped),
    before any model loads; a no-op for other objectives."""
    if recipe.train.objective != "grpo":
        return
    rows = load_rows(recipe.data.train, recipe.data.split, "data.train")
    first = [dict(rows[index]) for index in range(min(2, len(rows)))]
    reference = recipe.data.columns.reference
    checked_rewards(recipe, [{**row, "reference": row[reference]} if reference in row else row for row in first])


def score_completions(functions: list[Callable], recipe: Recipe, prompts: list[str], completions: list[str], columns: dict) -> dict:
    """Mean of each reward and of the weighted total over the completions (None values skipped)."""
    per_function, total = {}, [0.0] * len(completions)
    for reward, function in zip(recipe.grpo.rewards, functions):
        values = function(prompts=prompts, completions=completions, **columns)
        kept = [value for value in values if value is not None and not math.isnan(value)]
        per_function[reward.function] = sum(kept) / len(kept) if kept else None
        total = [t + reward.weight * (v or 0.0) for t, v in zip(total, values)]
    return {"mean_reward": sum(total) / len(total), "rewards": per_function}


def run_reward_evaluation(recipe: Recipe, adapter_dir: Path, compare: list[str], max_samples: Optional[int],
                          max_new_tokens: Optional[int], batch_size: int, show_progress: bool = True) -> dict:
    """Greedy completions of the held-out prompts by each model, scored by the recipe's rewards."""
    started = time.perf_counter()
    tokenizer = loading.load_tokenizer(recipe.model)
    rows = eval_rows_for_generation(recipe.data, recipe.train.seed)
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    prompts_set, _ = tokenize_rows(rows, recipe.data, tokenizer, "data.eval" if recipe.data.eval else "data.train")
    columns = {name: prompts_set[name] for name in prompts_set.column_names if name not in ("prompt", "prompt_ids")}
    functions = checked_rewards(recipe, [prompts_set[0]])
    budget = max_new_tokens or recipe.grpo.max_completion_len
    model = inference.load_model_as_trained(recipe, adapter_dir if "adapter" in compare else None)
    results, examples = {}, []
    for name in ("base", "adapter"):
        if name not in compare:
            continue
        without = adapters.only_base(model) if name == "base" and "adapter" in compare else contextlib.nullcontext()
        with without, inference.progress_bar(len(prompts_set), f"generating ({name})", show_progress) as advance:
            generated = inference.greedy_generate(model, tokenizer, prompts_set["prompt_ids"], budget, batch_size, advance)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
        scores = score_completions(functions, recipe, prompts_set["prompt"], texts, columns)
        if "reference" in columns:
            scores["exact_match"] = sum(exact_match(t, str(r)) for t, r in zip(texts, columns["reference"])) / len(texts)
        results[name] = scores
        examples.append(texts)
    return {
        "objective": "grpo",
        "adapter": str(adapter_dir) if "adapter" in compare else None,
        "base_model": recipe.model.path,
        "data": recipe.data.eval if recipe.data.eval else recipe.data.train,
        "held_out": bool(recipe.data.eval or recipe.data.eval_split),
        "rows": len(prompts_set),
        "max_new_tokens": budget,
        "quantization": loading.quantization_label(recipe.quantization),
        "compute_dtype": str(loading.compute_dtype(recipe)).removeprefix("torch."),
        "weights": {reward.function: reward.weight for reward in recipe.grpo.rewards},
        "models": results,
        "examples": [
            {"reference": str(columns.get("reference", [""] * len(prompts_set))[index])} | {name: texts[index] for name, texts in zip(results, examples)}
            for index in range(min(5, len(prompts_set)))
        ],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
