"""`qlora report`: one or several finished (or stopped) runs side by side: the recipe keys that
differ between them, final losses, `qlora evaluate` scores (eval.json), throughput, peak memory
and wall time, and their curves in one picture. Reads run directories only; no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from qlora_cli import plots
from qlora_cli.errors import ConfigError, library_message
from qlora_cli.recipe.loader import flatten

NOT_A_RUN = "pass the output.dir of a `qlora train` run"
EVAL_METRICS = (("loss", "loss"), ("perplexity", "perplexity"), ("exact_match", "exact match"), ("normalized_match", "normalised match"))
IGNORED_DIFFERENCES = {"output.dir"}  # every run has its own


@dataclass(frozen=True)
class Run:
    path: Path
    label: str
    metrics: dict
    recipe: dict  # dotted key -> value, from recipe.yaml ({} when missing)
    evaluation: Optional[dict]  # eval.json of `qlora evaluate`, when present


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read {what} ({library_message(exc)}); {NOT_A_RUN}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} is not a JSON object; {NOT_A_RUN}")
    return data


def load_run(path: Path) -> Run:
    """A run directory: metrics.json required, recipe.yaml and eval.json read when present."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; {NOT_A_RUN}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run directory; {NOT_A_RUN}")
    if not (path / "metrics.json").is_file():
        raise ConfigError(f"{path} is not a run directory (no metrics.json); {NOT_A_RUN}")
    metrics = _read_json(path / "metrics.json", "metrics.json")
    recipe = {}
    if (path / "recipe.yaml").is_file():
        try:
            recipe = flatten(yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {})
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path / 'recipe.yaml'}: cannot read the recipe ({library_message(exc)})") from None
    evaluation = _read_json(path / "eval.json", "eval.json") if (path / "eval.json").is_file() else None
    return Run(path, path.resolve().name, metrics, recipe, evaluation)


def load_runs(paths: list[Path]) -> list[Run]:
    runs = [load_run(path) for path in paths]
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):  # same folder name in different places: show the paths
        runs = [Run(run.path, str(run.path), run.metrics, run.recipe, run.evaluation) for run in runs]
    return runs


def differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Recipe keys whose values are not the same in every run, in recipe order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.recipe))
    missing = object()
    found = {}
    for key in keys:
        if key in IGNORED_DIFFERENCES:
            continue
        values = [run.recipe.get(key, missing) for run in runs]
        if any(value != values[0] for value in values[1:]):
            found[key] = [None if value is missing else value for value in values]
    return found


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def _steps(metrics: dict) -> str:
    step, total = metrics.get("global_step"), metrics.get("max_steps")
    if not isinstance(step, int):
        return "-"
    stopped = isinstance(total, int) and 0 < step < total
    return f"{step}/{total}" + (" (stopped)" if stopped else "") if isinstance(total, int) else str(step)


def _evaluation_cell(evaluation: Optional[dict], key: str) -> str:
    """base -> adapter (-> merged), as `qlora evaluate` scored them."""
    models = (evaluation or {}).get("models") or {}
    shown = []
    for scores in models.values():
        value = scores.get(key) if isinstance(scores, dict) else None
        if key in ("exact_match", "normalized_match"):
            shown.append("n/a" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%")
        else:
            shown.append(_number(value))
    return " → ".join(shown) if shown else "-"


def table_rows(runs: list[Run]) -> dict[str, list[str]]:
    """Row name -> one cell per run: recipe differences first, then results."""
    rows: dict[str, list[str]] = {}
    if len(runs) == 1:
        rows["model"] = [_number(runs[0].recipe.get("model.path"))]
    for key, values in differences(runs).items():
        rows[key] = [_number(value) for value in values]
    facts = [
        ("steps", _steps),
        ("first train loss", lambda m: _number(m.get("first_loss"))),
        ("final train loss", lambda m: _number(m.get("last_loss"))),
        ("eval loss", lambda m: _number(m.get("eval_loss"))),
        ("tokens seen", lambda m: _number(m.get("tokens_seen"))),
        ("tokens/s", lambda m: f"{m['tokens_per_second']:,.0f}" if isinstance(m.get("tokens_per_second"), (int, float)) else "-"),
        ("peak memory", lambda m: f"{m['peak_memory_gib']:.2f} GiB" if isinstance(m.get("peak_memory_gib"), (int, float)) else "-"),
        ("wall time", lambda m: _duration(m.get("wall_time_s"))),
        ("trainable params", lambda m: _number(m.get("trainable_params"))),
        ("quantization", lambda m: _number(m.get("quantization"))),
        ("device", lambda m: f"{_number(m.get('device'))}, {_number(m.get('compute_dtype'))}"),
    ]
    for name, cell in facts:
        rows[name] = [cell(run.metrics) for run in runs]
    if any(run.evaluation for run in runs):
        for key, name in EVAL_METRICS:
            rows[f"evaluate: {name}"] = [_evaluation_cell(run.evaluation, key) for run in runs]
    return rows


def evaluated_models(runs: list[Run]) -> list[str]:
    """The model names eval.json cells are ordered by, e.g. ['base', 'adapter']."""
    names: list[str] = []
    for run in runs:
        for name in ((run.evaluation or {}).get("models") or {}):
            if name not in names:
                names.append(name)
    return names


def summary_table(runs: list[Run]):
    """The rich table `qlora report` prints: a row per fact, a column per run."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="qlora report", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(escape(run.label), justify="right", overflow="fold")
    for name, cells in table_rows(runs).items():  # cells are plain text: `[none]` is a list, not markup
        table.add_row(escape(name), *map(escape, cells))
    models = evaluated_models(runs)
    if models:
        table.caption = f"evaluate: {' → '.join(models)}, from eval.json (`qlora evaluate`)"
        table.caption_justify = "left"
    return table


def to_json(runs: list[Run], plot: Optional[Path]) -> dict:
    return {
        "runs": [
            {
                "run_dir": str(run.path),
                "label": run.label,
                "metrics": {key: value for key, value in run.metrics.items() if key != "log_history"},
                "evaluation": (run.evaluation or {}).get("models"),
                "recipe": run.recipe,
            }
            for run in runs
        ],
        "differences": differences(runs),
        "plot": str(plot) if plot else None,
    }


def draw_report(runs: list[Run], output: Path) -> Path:
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; give a file name such as report.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    curves = [plots.run_curves(run.metrics.get("log_history") or [], run.label) for run in runs]
    title = runs[0].label if len(runs) == 1 else f"{len(runs)} runs: " + ", ".join(run.label for run in runs)
    return plots.draw(curves, output, title=title)
