"""The training objectives, one file each beside this one: what `train.objective` names and how
its Trainer is built. Adding an objective is one file with an `OBJECTIVE` plus a line here (and its
name in recipe/objective_section.py's `Objective`; tests/unit/test_objectives.py checks they agree).
"""

from __future__ import annotations

from qlora_cli.train.objectives import dpo, grpo, kto, orpo, sft
from qlora_cli.train.objectives.base import Objective

OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        sft.OBJECTIVE,
        dpo.OBJECTIVE,
        kto.OBJECTIVE,
        orpo.OBJECTIVE,
        grpo.OBJECTIVE,
    )
}


def objective(name: str) -> Objective:
    return OBJECTIVES[name]
