"""Checks before `qlora train` loads anything: flags that contradict, model and data paths, eval
settings, and whether output.dir can take the run (or the checkpoint to resume from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qlora_cli import rundir
from qlora_cli.data.sources import check_sources
from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.model import adapters, loading
from qlora_cli.recipe.schema import Recipe
from qlora_cli.rundir import check_replaceable
from qlora_cli.train import checkpointing, distributed, objectives, storage


def preflight(
    recipe: Recipe, resume: bool, force: bool, here: Optional[distributed.World] = None
) -> tuple[Optional[Path], list[str]]:
    """Cheap checks before loading anything; returns the checkpoint to resume from and the
    damaged newer checkpoints it skips (one note each).

    In a multi-process run only rank 0 writes, so only rank 0 checks the output directory
    (the others would find what rank 0 has begun writing there).
    """
    here = here or distributed.world()
    if resume and force:
        raise ConfigError("--resume and --force contradict each other; pick one")
    loading.check_model_path(recipe.model.path)
    adapters.preflight(recipe)
    check_sources(recipe.data.train, "data.train")
    if recipe.data.eval:
        check_sources(recipe.data.eval, "data.eval")
    objectives.objective(recipe.train.objective).check(recipe)  # e.g. GRPO's rewards, on a dry call
    if recipe.data.streaming and here.size > 1:
        # Not built: accelerate would read the stream on rank 0 and split each batch, which packed batches cannot be.
        raise ConfigError("data.streaming trains in one process; drop --nproc (or the launcher's processes), or set data.streaming: false")
    if recipe.train.eval_steps and not (recipe.data.eval or recipe.data.eval_split):
        raise ConfigError("train.eval_steps needs eval data: set data.eval or data.eval_split")
    output_dir = Path(recipe.output.dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ResourceError(f"output.dir {output_dir} is a file; choose a directory path")
    if here.is_main:  # rank 0 holds the lock for the whole job; the other ranks are part of its run
        rundir.check_unlocked(output_dir, "this run")
    occupied = output_dir.is_dir() and bool(rundir.entries(output_dir))
    if resume:
        storage.probe_writable(output_dir)
        found, skipped = checkpointing.newest_intact(output_dir) if output_dir.is_dir() else (None, [])
        if found is None and skipped:
            raise ConfigError(f"--resume: no intact checkpoint in {output_dir} (damaged: {', '.join(skipped)}); use --force to start over")
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {output_dir} to resume from; run without --resume")
        distributed.check_resume_world(found, here)
        checkpointing.check_resumed_recipe(output_dir, recipe)
        checkpointing.check_checkpoint_matches(found, recipe)
        return found, skipped
    if not here.is_main:
        return None, []
    if occupied and not force:
        raise ResourceError(
            f"output.dir {output_dir} is not empty; use --resume to continue it, --force to overwrite it, or --set output.dir=NEW"
        )
    if occupied and force:
        check_replaceable(output_dir)
    storage.probe_writable(output_dir)
    return None, []
