"""Layer-wise learning-rate scaling as optimizer parameter groups: decoder layer i of L trains
at learning_rate x decay^(L-1-i), so layers near the input move least; input-side parameters
(embeddings, soft prompts, prompt encoders, prefixes) get decay^L, the rest (final norm,
output head) the full rate. Weight decay keeps the Trainer's split (none on biases and norms).
"""

from __future__ import annotations

import re
from typing import Optional

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_INPUT_SIDE = ("embed_tokens", "wte", "prompt_encoder", "prefix_encoder", "word_embeddings")


def layer_index(name: str) -> Optional[int]:
    found = _LAYER.search("." + name)
    return int(found.group(1)) if found else None


def depth_of(name: str, num_layers: int) -> int:
    """Decoder layer of a parameter; -1 for input-side parameters, num_layers - 1 for the rest."""
    index = layer_index(name)
    if index is not None:
        return index
    if any(part in name for part in _INPUT_SIDE):
        return -1
    return num_layers - 1


def layer_scale(depth: int, num_layers: int, decay: float) -> float:
    return decay ** (num_layers - 1 - depth)


def param_groups(model, learning_rate: float, decay: float, weight_decay: float, decay_names: set[str], num_layers: int) -> list[dict]:
    """One group per (depth, weight decay on/off) holding the trainable parameters, each with its own lr."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = depth_of(name, num_layers)
        decayed = name in decay_names
        group = groups.setdefault((depth, decayed), {
            "params": [], "names": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr": learning_rate * layer_scale(depth, num_layers, decay), "depth": depth,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def num_decoder_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)
