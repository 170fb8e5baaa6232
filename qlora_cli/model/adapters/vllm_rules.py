"""Whether vLLM can serve an adapter as a LoRA (`vllm serve BASE --enable-lora --lora-modules
NAME=RUN_DIR`), decided from its saved config the way vLLM decides it, so that a user hears it at
train time and at merge, not from vLLM at deploy time.

vLLM's rules (vllm/lora/peft_helper.py, PEFTHelper._validate_features and validate_legal; LoRAConfig):
- it loads LoRA adapters only (peft_type LORA) and refuses DoRA ("vLLM does not yet support DoRA");
- it refuses `modules_to_save` ("vLLM only supports modules_to_save being None"): fully trained
  layers (an embedding or lm_head trained in full) are not low-rank pairs it can apply;
- it refuses a rank above `--max-lora-rank` (default 16; the values it accepts are MAX_LORA_RANKS);
- LoRA biases need its `bias_enabled` (`--enable-lora-bias`), deprecated in recent releases;
- it keeps only the fields above from adapter_config.json, so per-layer ranks or alphas
  (`rank_pattern`, `alpha_pattern`) would be scaled by the one global alpha / r: silently wrong.
A merged checkpoint (`qlora merge RUN`) has none of these limits: vLLM serves it as a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices
DEFAULT_MAX_LORA_RANK = 16


@dataclass(frozen=True)
class Serving:
    problems: list[str] = field(default_factory=list)  # what vLLM refuses or would apply wrongly
    flags: list[str] = field(default_factory=list)  # what `vllm serve` needs beyond --enable-lora

    @property
    def servable(self) -> bool:
        return not self.problems


def peft_type(config: dict) -> str:
    value = config.get("peft_type") or config.get("method") or "unknown"
    return str(getattr(value, "value", value)).upper()


def check(config: dict) -> Serving:
    """What vLLM makes of an adapter with this saved config (peft's adapter_config.json, or ours)."""
    kind = peft_type(config)
    if kind != "LORA":
        return Serving([f"vLLM serves LoRA adapters only, not {kind}"])
    problems, flags = [], ["--enable-lora"]
    if config.get("use_dora"):
        problems.append("vLLM does not serve DoRA adapters")
    if config.get("modules_to_save"):
        problems.append(f"vLLM refuses adapters with modules_to_save ({', '.join(config['modules_to_save'])} trained in full)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("vLLM ignores per-layer ranks and alphas (rank_pattern / alpha_pattern) and would scale every layer by lora_alpha / r")
    if str(config.get("bias") or "none") != "none":
        problems.append(f"vLLM applies trained biases (bias: {config['bias']}) only with --enable-lora-bias, which recent releases deprecate")
    rank = max([int(config.get("r") or 0), *[int(value) for value in (config.get("rank_pattern") or {}).values()]])
    if rank > MAX_LORA_RANKS[-1]:
        problems.append(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")
    elif rank > DEFAULT_MAX_LORA_RANK:
        flags.append(f"--max-lora-rank {next(value for value in MAX_LORA_RANKS if value >= rank)}")
    return Serving(problems, flags)


def summary(config: dict, mergeable: bool, merged: Optional[str] = None) -> str:
    """One line: how vLLM serves this adapter, or why it cannot and what to serve instead. `merged`
    names a merged checkpoint already written (at merge time)."""
    serving = check(config)
    if serving.servable:
        return f"serves the adapter: vllm serve BASE {' '.join(serving.flags)} --lora-modules NAME=RUN_DIR"
    if merged:
        instead = f"serve the merged checkpoint instead: vllm serve {merged}"
    elif mergeable:
        instead = "serve the merged checkpoint instead (qlora merge RUN_DIR, then vllm serve OUTPUT)"
    else:
        instead = "serve it with transformers + peft (qlora generate), or train a LoRA adapter"
    return f"cannot serve the adapter as a LoRA: {'; '.join(serving.problems)}; {instead}"
