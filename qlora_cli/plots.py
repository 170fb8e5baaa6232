"""Training curves as pictures: a run's loss.png (train and eval loss, learning rate, against
optimizer steps and against tokens seen) and one picture of several runs for `qlora report`.

matplotlib is imported lazily, here only, and drawn on an Agg canvas: no display, no pyplot
global state, and `qlora estimate` never pays for the import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora_cli.atomic import write_atomic

PLOT_NAME = "loss.png"
MARKED_POINTS = 20  # curves with this many points or fewer get a marker on each
TOKENS_KEY = "num_input_tokens_seen"  # the Trainer's name; QloraTrainer.log adds it to every log entry


@dataclass(frozen=True)
class Series:
    """One logged quantity: its optimizer steps, the tokens seen at each (None where not logged), its values."""

    steps: tuple[int, ...]
    tokens: tuple[Optional[int], ...]
    values: tuple[float, ...]

    def by_tokens(self) -> tuple[list[int], list[float]]:
        pairs = [(tokens, value) for tokens, value in zip(self.tokens, self.values) if tokens is not None]
        return [tokens for tokens, _ in pairs], [value for _, value in pairs]


@dataclass(frozen=True)
class RunCurves:
    label: str
    train_loss: Series
    eval_loss: Series
    learning_rate: Series


def series(log_history: list[dict], key: str) -> Series:
    """Every log entry that holds `key` as a number, in logged order."""
    rows = [entry for entry in log_history if isinstance(entry.get(key), (int, float)) and isinstance(entry.get("step"), int)]
    return Series(
        tuple(entry["step"] for entry in rows),
        tuple(entry.get(TOKENS_KEY) for entry in rows),
        tuple(float(entry[key]) for entry in rows),
    )


def run_curves(log_history: list[dict], label: str = "") -> RunCurves:
    """The curves in metrics.json's `log_history`: train entries hold `loss`, eval entries `eval_loss`."""
    return RunCurves(label, series(log_history, "loss"), series(log_history, "eval_loss"), series(log_history, "learning_rate"))


def _wide_range(values: list[float]) -> bool:
    """Loss that falls by more than 20x reads better on a log axis."""
    positive = [value for value in values if math.isfinite(value) and value > 0]
    return len(positive) > 1 and min(positive) > 0 and max(positive) / min(positive) > 20


def figure_of(runs: list[RunCurves], title: str = ""):
    """Loss (top) and learning rate (bottom) against steps (left) and tokens seen (right), one
    colour per run: train loss solid, eval loss dashed with markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    figure = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex="col")
    (loss_steps, loss_tokens), (lr_steps, lr_tokens) = axes
    colors = [f"C{index % 10}" for index in range(len(runs))]
    several = len(runs) > 1
    all_losses: list[float] = []
    any_tokens = False
    for run, color in zip(runs, colors):
        prefix = f"{run.label} " if several else ""
        for data, style, name in ((run.train_loss, "-", "train"), (run.eval_loss, "--", "eval")):
            if not data.values:
                continue
            marker = "o" if name == "eval" or len(data.values) <= MARKED_POINTS else None
            line_color = color if several or name == "train" else "C1"  # one run: eval in its own colour
            options = dict(color=line_color, linestyle=style, marker=marker, markersize=4 if name == "train" else 6,
                           alpha=0.9 if name == "train" else 1.0, label=f"{prefix}{name} loss")
            loss_steps.plot(data.steps, data.values, **options)
            tokens, values = data.by_tokens()
            any_tokens = any_tokens or bool(tokens)
            loss_tokens.plot(tokens, values, **options)
            all_losses.extend(data.values)
        if run.learning_rate.values:
            # A run with one logged step has a one-point curve: a line alone would draw nothing.
            few = len(run.learning_rate.values) <= MARKED_POINTS
            options = dict(color=color, label=f"{prefix}learning rate".strip(), marker="o" if few else None, markersize=4)
            lr_steps.plot(run.learning_rate.steps, run.learning_rate.values, **options)
            lr_tokens.plot(*run.learning_rate.by_tokens(), **options)

    for axis in (loss_steps, loss_tokens):
        axis.set_ylabel("loss (mean cross-entropy per scored token)" if axis is loss_steps else "loss")
        if _wide_range(all_losses):
            axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    for axis in (lr_steps, lr_tokens):
        axis.set_ylabel("learning rate")
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axis.grid(True, alpha=0.3)
    lr_steps.set_xlabel("optimizer step")
    lr_steps.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_tokens.set_xlabel("tokens seen (non-padding)")
    lr_tokens.xaxis.set_major_formatter(EngFormatter(sep=""))
    loss_steps.set_title("against optimizer steps")
    loss_tokens.set_title("against tokens seen")
    if not all_losses:
        loss_steps.text(0.5, 0.5, "no logged loss yet", ha="center", va="center", transform=loss_steps.transAxes)
    elif not any_tokens:
        loss_tokens.text(0.5, 0.5, "tokens seen were not logged", ha="center", va="center", transform=loss_tokens.transAxes)
    if all_losses and several:
        # One entry per run and curve: inside an axes it would cover the curves it names.
        figure.legend(*loss_steps.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    elif all_losses:
        loss_steps.legend(loc="upper right", fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def draw(runs: list[RunCurves], path: Path, title: str = "") -> Path:
    """figure_of(runs), written as a PNG atomically to `path`."""
    return write_atomic(path, lambda temporary: figure_of(runs, title).savefig(temporary, format="png"))


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"


def write_loss_plot(output_dir: Path, metrics: dict) -> Optional[Path]:
    """loss.png beside metrics.json. A picture must never cost the run: a failure to draw it is
    reported as a warning and the run goes on."""
    output_dir = Path(output_dir)
    title = (f"{output_dir.name}: step {metrics.get('global_step')}/{metrics.get('max_steps')}, "
             f"last train loss {_number(metrics.get('last_loss'))}, eval loss {_number(metrics.get('eval_loss'))}")
    try:
        return draw([run_curves(metrics.get("log_history") or [], output_dir.name)], output_dir / PLOT_NAME, title)
    except Exception as exc:  # noqa: BLE001 - the adapter still has to be saved after this
        import warnings

        warnings.warn(f"could not draw {output_dir / PLOT_NAME}: {exc}", RuntimeWarning, stacklevel=2)
        return None


OBJECTIVE_PLOT_NAME = "objective.png"


def write_objective_plot(output_dir: Path, metrics: dict, patterns: tuple[str, ...]) -> Optional[Path]:
    """objective.png beside loss.png: the objective's own logged curves (fnmatch patterns, e.g. DPO's
    rewards/margins, GRPO's rewards/*/mean), train solid and eval dashed, one panel each. Like loss.png,
    a failure to draw is a warning."""
    import fnmatch

    history = metrics.get("log_history") or []
    logged = list(dict.fromkeys(key for entry in history for key in entry))
    keys = [key for pattern in patterns for key in fnmatch.filter(logged, pattern)]
    keys = list(dict.fromkeys(keys))
    if not keys:
        return None
    path = Path(output_dir) / OBJECTIVE_PLOT_NAME

    def figure():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        columns = min(3, len(keys))
        rows = -(-len(keys) // columns)
        drawing = Figure(figsize=(4 * columns, 3 * rows), dpi=100, layout="constrained")
        FigureCanvasAgg(drawing)
        axes = drawing.subplots(rows, columns, squeeze=False).flatten()
        for axis, key in zip(axes, keys):
            for name, style in ((key, "-"), (f"eval_{key}", "--")):
                data = series(history, name)
                if data.values:
                    axis.plot(data.steps, data.values, linestyle=style, marker="o" if len(data.values) <= MARKED_POINTS else None,
                              markersize=3, label="eval" if style == "--" else "train")
            axis.set_title(key, fontsize="small")
            axis.set_xlabel("optimizer step")
            axis.grid(True, alpha=0.3)
        for axis in axes[len(keys):]:
            axis.set_visible(False)
        drawing.suptitle(f"{Path(output_dir).name}: objective curves")
        return drawing

    try:
        return write_atomic(path, lambda temporary: figure().savefig(temporary, format="png"))
    except Exception as exc:  # noqa: BLE001 - the adapter still has to be saved after this
        import warnings

        warnings.warn(f"could not draw {path}: {exc}", RuntimeWarning, stacklevel=2)
        return None
