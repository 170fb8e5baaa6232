"""The recipe's one reader, `load_recipe`: YAML with line numbers, `--set` overrides, validation into
a Recipe, and the resolved recipe written back. Unknown keys, wrong types and out-of-range values are
ConfigErrors that name the key, its YAML line, and the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from qlora_cli.errors import ConfigError
from qlora_cli.recipe.adapter_section import method_sections_to_drop
from qlora_cli.recipe.objective_section import sections_to_drop
from qlora_cli.recipe.schema import Recipe
from qlora_cli.rundir import is_run_dir

# Names people bring from peft, the Trainer, axolotl and torchtune: a near-miss gets pointed home.
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target": "target_modules",
    "lr": "learning_rate", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "grad_accum": "gradient_accumulation_steps",
    "optim": "optimizer", "output_dir": "dir", "sequence_len": "max_seq_len", "max_length": "max_seq_len",
    "seq_len": "max_seq_len", "model_name_or_path": "path", "base_model": "path", "name": "path",
    "load_in_4bit": "bits", "bnb_4bit_quant_type": "quant_type", "scheduler": "lr_scheduler",
    "lr_scheduler_type": "lr_scheduler", "dataset": "train", "path": "path",
}


def valid_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. `lora.target_modules`."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, dotted + "."))
    return keys


def suggest_key(bad_key: str) -> Optional[str]:
    """The closest valid dotted key to `bad_key`, or None."""
    keys = valid_keys()
    section, _, leaf = bad_key.rpartition(".")
    if leaf in _ALIASES:
        aliased = f"{section}.{_ALIASES[leaf]}" if section else _ALIASES[leaf]
        if aliased in keys:
            return aliased
        matches = [k for k in keys if k.endswith("." + _ALIASES[leaf])]
        if matches:
            return matches[0]
    same_section = [k for k in keys if k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(bad_key, same_section, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.6)
    if not close:  # the leaf name alone, in any section ("lr_scheduler" misplaced under data)
        by_leaf = {k.rpartition(".")[2]: k for k in keys}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[leaf_match[0]]] if leaf_match else []
    return close[0] if close else None


# A recipe is a few sections a few levels deep with some dozens of values. Far more is a mistake or
# an alias bomb (aliases of aliases expand exponentially: "billion laughs").
MAX_DEPTH = 32
MAX_VALUES = 20_000


def _key_lines(node: yaml.Node, source: str, prefix: str = "", lines: Optional[dict[str, int]] = None, path: tuple = (),
               visited: Optional[list] = None) -> dict[str, int]:
    """Map dotted keys of a composed YAML document to their 1-based line numbers. A key given twice
    in one mapping (PyYAML would keep the last silently), an alias that contains itself, nesting
    deeper than MAX_DEPTH and aliases expanding to more than MAX_VALUES values are ConfigErrors."""
    lines = {} if lines is None else lines
    visited = [0] if visited is None else visited
    visited[0] += 1
    if visited[0] > MAX_VALUES:
        raise ConfigError(f"{source}: the recipe expands to more than {MAX_VALUES:,} values through YAML aliases; "
                          "a recipe needs a few dozen, so write the values out instead of nesting aliases")
    if len(path) > MAX_DEPTH:
        raise ConfigError(f"{source} line {node.start_mark.line + 1}: values nested more than {MAX_DEPTH} levels deep; "
                          "a recipe is sections of keys (at most a few levels)")
    if id(node) in path:
        raise ConfigError(f"{source} line {node.start_mark.line + 1}: `{prefix.rstrip('.') or 'recipe'}` refers to itself through a YAML alias; "
                          "an alias must point at a finished value, not at a mapping that contains it")
    path = (*path, id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_node.value in seen and key_node.value != "<<":
                raise ConfigError(f"{source}: `{dotted}` is given twice (lines {seen[key_node.value]} and {line}); keep one of them")
            seen[key_node.value] = line
            lines.setdefault(dotted, line)
            _key_lines(value_node, source, dotted + ".", lines, path, visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[f"{prefix}{index}"] = item.start_mark.line + 1
            _key_lines(item, source, f"{prefix}{index}.", lines, path, visited)
    return lines


def _parse_yaml(text: str, source: str) -> tuple[dict, dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines = _key_lines(node, source) if node is not None else {}
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}{where}: YAML syntax error: {problem}; fix the YAML and try again") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: values nested more than {MAX_DEPTH} levels deep; a recipe is sections of keys (at most a few levels)") from None
    if data is None:
        raise ConfigError(f"{source}: the recipe is empty; start from configs/quickstart.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping of sections (model, lora, data, ...), not a {type(data).__name__}")
    # Top-level `x-` keys hold values for anchors to share (docker compose's extension fields): not sections.
    return {key: value for key, value in data.items() if not (isinstance(key, str) and key.startswith("x-"))}, lines


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (['train', 'learning_rate'], 0.0001); the value is read as YAML."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. --set train.learning_rate=1e-4")
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader) if raw.strip() else None
        if node is not None:
            _key_lines(node, f"--set {key}")  # the recipe's limits: no alias bomb, no deep nesting
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw recipe dict with each `a.b=value` override applied."""
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        path, value = parse_override(assignment)
        dotted = ".".join(path)
        node = data
        for part in path[:-1]:
            existing = node.get(part)
            if existing is None:
                node[part] = existing = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"--set {dotted}: `{part}` is not a section")
            node = existing
        node[path[-1]] = value
    return data


def _format_validation_error(exc: ValidationError, lines: dict[str, int], source: str, overrides: Optional[dict[str, str]] = None) -> str:
    errors = exc.errors()
    # Of a union's branches, the one whose own check failed says more than "should be a valid string".
    error = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-after", "literal[", "list["))]
    # Union branches add their type name to loc; drop those that are not keys of our schema.
    loc = [part for part in loc if part not in {"str", "int", "float", "bool"} and not part.endswith("Section")]
    dotted = ".".join(loc)
    where = _where(dotted, lines, source, overrides or {})
    if error["type"] == "extra_forbidden":
        hint = suggest_key(dotted)
        tip = f"; did you mean `{hint}`?" if hint else "; see `qlora schema` for the valid keys"
        return f"{where}: unknown key `{dotted}`{tip}"
    if error["type"] == "missing":
        return f"{where}: missing required key `{dotted}`; add it to the recipe (see configs/quickstart.yaml)"
    message = error["msg"]
    if error["type"] == "value_error" and not dotted:  # a cross-check of the whole recipe says it all
        return f"{where}: {message.removeprefix('Value error, ')}"
    if error["type"] == "literal_error":
        message = message.replace("Input should be", "must be one of:")
    value = error.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, (dict, list)) else ""
    return f"{where}: `{dotted or 'recipe'}` {message[0].lower() + message[1:]}{shown}"


def _where(dotted: str, lines: dict[str, int], source: str, overrides: dict[str, str]) -> str:
    """Where the value at `dotted` came from: the `--set` that gave it (or one of its sections),
    else its line in the recipe file (or its nearest section's)."""
    probe = dotted
    while probe:
        if probe in overrides:
            return f"--set {overrides[probe]}"
        probe = probe.rpartition(".")[0]
    probe = dotted
    while probe:
        if probe in lines:
            return f"{source} line {lines[probe]}"
        probe = probe.rpartition(".")[0]
    return source


def validate_recipe(data: dict, lines: Optional[dict[str, int]] = None, source: str = "recipe", overrides: Optional[list[str]] = None) -> Recipe:
    """Validate a raw dict into a Recipe, raising a one-line ConfigError (naming the `--set` that
    gave a bad value, not a line of the file it replaced)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        given = {".".join(parse_override(assignment)[0]): assignment for assignment in overrides or []}
        raise ConfigError(_format_validation_error(exc, lines or {}, source, given)) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read, override and validate a YAML recipe. The only way recipes enter the program."""
    path = Path(path)
    run_dir = None
    if path.is_dir():
        candidate = path / "recipe.yaml"
        if not candidate.is_file():
            raise ConfigError(f"{path} is a directory without a recipe.yaml; pass a recipe file or a finished run directory")
        run_dir, path = path, candidate
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; check the path (examples are in configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    data, lines = _parse_yaml(text, str(path))
    if run_dir is not None and is_run_dir(run_dir) and isinstance(data, dict) and isinstance(data.get("output"), dict):
        # A run directory is its own output.dir, also after it was moved or copied elsewhere.
        data["output"] = {**data["output"], "dir": str(run_dir)}
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, lines, str(path), overrides)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (every default spelled out) as YAML text, loadable by load_recipe."""
    top, unused = method_sections_to_drop(recipe)
    top = top | sections_to_drop(recipe)
    data = recipe.model_dump(mode="json", exclude={**{name: True for name in top}, "adapter": unused})
    return yaml.safe_dump(data, sort_keys=False)
