"""`qlora generate`: one base model loaded once, several named adapters on it, and prompts
answered each with the adapter it names ("NAME: text"), switching adapters without reloading.
Prompts come from arguments, a file (lines or JSON lines), or an interactive prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from qlora_cli import rundir
from qlora_cli.data.formats import alpaca_prompt
from qlora_cli.errors import ConfigError, DataError
from qlora_cli.evaluate import inference
from qlora_cli.model import adapters, loading
from qlora_cli.model.quantized import speed_up_cpu_inference
from qlora_cli.recipe.loader import load_recipe, validate_recipe
from qlora_cli.recipe.schema import Recipe

BASE_NAME = "base"  # the bare base model, always available
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Prompt:
    adapter: str
    text: str


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=DIR` options -> [(name, folder)], each folder holding an adapter."""
    parsed: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name) or not folder:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter topics=runs/quickstart (NAME: letters, digits, _ . -)")
        if name == BASE_NAME or name in {n for n, _ in parsed}:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is {'reserved for the bare base model' if name == BASE_NAME else 'used twice'}")
        rundir.read_adapter_config(Path(folder))
        parsed.append((name, Path(folder)))
    if not parsed:
        raise ConfigError("give at least one --adapter NAME=DIR (a run directory of `qlora train`)")
    return parsed


def resolve_base(base: str, adapter_specs: list[tuple[str, Path]], overrides: Optional[list[str]] = None) -> Recipe:
    """The recipe that says how to load the base: --base as a recipe / run directory, or a model
    path whose quantization and dtype come from the first adapter's recipe.yaml (16-bit without one)."""
    path = Path(base)
    if path.is_file() or (path.is_dir() and (path / "recipe.yaml").is_file()):
        return load_recipe(path, overrides)
    for _, folder in adapter_specs:
        if (folder / "recipe.yaml").is_file():
            recipe = load_recipe(folder, overrides)
            return recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": base})})
    raw = {"model": {"path": base}, "quantization": {"bits": 16}, "data": {"train": "-", "format": "chat"}, "output": {"dir": "-"}}
    return validate_recipe(raw, source="--base")


def parse_prompt(line: str, names: list[str]) -> Prompt:
    """`NAME: text` (or {"adapter": NAME, "prompt": text}); the name may be left out with one adapter."""
    line = line.strip()
    if line.startswith("{"):
        try:
            row = json.loads(line)
            return parse_prompt(f"{row.get('adapter', '')}: {row['prompt']}" if row.get("adapter") else str(row["prompt"]), names)
        except (ValueError, KeyError, TypeError):
            raise DataError(f"prompt line {line[:60]!r}: a JSON line needs {{\"adapter\": NAME, \"prompt\": TEXT}}") from None
    name, sep, text = line.partition(":")
    if sep and name.strip() in names + [BASE_NAME]:
        return Prompt(name.strip(), text.strip())
    if len(names) == 1:
        return Prompt(names[0], line)
    raise DataError(f"prompt {line[:60]!r}: start it with the adapter to use, `NAME: text` (one of {', '.join(names + [BASE_NAME])})")


def read_prompt_file(path: Path, names: list[str]) -> list[Prompt]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts from {path}: {exc}") from None
    prompts = [parse_prompt(line, names) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"{path} holds no prompts; write one `NAME: text` per line")
    return prompts


def render(text: str, recipe: Recipe, tokenizer) -> list[int]:
    """Token ids of the prompt as the adapters saw prompts in training (the recipe's data format)."""
    fmt = recipe.data.format
    if fmt == "chat" and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return inference.prompt_ids(rendered, "chat", tokenizer)
    if fmt == "alpaca":
        return inference.prompt_ids(alpaca_prompt(text, None), fmt, tokenizer)
    return inference.prompt_ids(text, fmt, tokenizer)


class Generator:
    """The loaded base with its adapters; `answer` switches adapters per prompt without reloading."""

    def __init__(self, recipe: Recipe, adapter_specs: list[tuple[str, Path]]):
        self.recipe = recipe
        self.names = [name for name, _ in adapter_specs]
        self.tokenizer = loading.load_tokenizer(recipe.model)
        model = loading.load_base_model(recipe)
        speed_up_cpu_inference(model)
        self.loaded = adapters.load_adapters(model, adapter_specs)
        self.model = self.loaded.model.eval()
        self.base_loads = 1

    def answer(self, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 8) -> list[str]:
        """Greedy answers in prompt order; prompts are grouped by adapter, one switch per group."""
        answers: list[str] = [""] * len(prompts)
        for name in dict.fromkeys(prompt.adapter for prompt in prompts):
            chosen = [index for index, prompt in enumerate(prompts) if prompt.adapter == name]
            ids = [render(prompts[index].text, self.recipe, self.tokenizer) for index in chosen]
            with adapters.using(self.loaded, name):
                generated = inference.greedy_generate(self.model, self.tokenizer, ids, max_new_tokens, batch_size)
            for index, tokens in zip(chosen, generated):
                answers[index] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return answers


def interactive_lines(read=input) -> Iterable[str]:
    """Lines typed at a `NAME> ` prompt until EOF or an empty line."""
    while True:
        try:
            line = read("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line
