"""A Recipe as commented YAML: every field under a comment taken from its description in the
schema (what `qlora init` writes).
"""

from __future__ import annotations

import os
import textwrap
import typing
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel

from qlora_cli.recipe.adapter_section import method_sections_to_drop
from qlora_cli.recipe.objective_section import sections_to_drop
from qlora_cli.recipe.schema import Recipe

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "recipe.schema.json"


def _choices_of(annotation) -> Optional[list]:
    """The allowed values of a Literal field, or of a list of Literals."""
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=98 - len(indent), break_on_hyphens=False, break_long_words=False)]


def _flow(value) -> str:
    """One value as inline YAML: null, 0.0002, all-linear, [q_proj, v_proj]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def commented_yaml(section: BaseModel, indent: str = "", skip: frozenset = frozenset()) -> list[str]:
    """Every field of `section` (but `skip`) as YAML, each under a comment made from its schema description."""
    lines = []
    for name, field in type(section).model_fields.items():
        if name in skip:
            continue
        value = getattr(section, name)
        description = field.description or ""
        choices = _choices_of(field.annotation)
        if choices and len(choices) > 1:
            description += f" One of: {', '.join(map(str, choices))}."
        lines.extend(_comment(description, indent))
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines.extend(commented_yaml(value, indent + "  "))
        else:
            lines.append(f"{indent}{name}: {_flow(section.model_dump(mode='json')[name])}")
    return lines


def render(recipe: Recipe, header: list[str], output: Path) -> str:
    """The recipe file: schema line, header, then each section under its description."""
    lines = []
    if SCHEMA.is_file():  # a checkout: point at its docs/recipe.schema.json
        relative = os.path.relpath(SCHEMA, Path(output).resolve().parent)
        lines.append(f"# yaml-language-server: $schema={Path(relative).as_posix()}")
    else:
        header = [*header, "Editor completion: `qlora schema > recipe.schema.json`, then make the first line "
                  "`# yaml-language-server: $schema=recipe.schema.json`."]
    for paragraph in header:
        lines.extend(_comment(paragraph, ""))
    top, unused = method_sections_to_drop(recipe)
    top = top | sections_to_drop(recipe)  # as recipe_to_yaml: only what the method reads
    for name, field in Recipe.model_fields.items():
        if name in top:
            continue
        lines.append("")
        lines.extend(_comment(field.description or "", ""))
        lines.append(f"{name}:")
        lines.extend(commented_yaml(getattr(recipe, name), "  ", frozenset(unused) if name == "adapter" else frozenset()))
    return "\n".join(lines) + "\n"
