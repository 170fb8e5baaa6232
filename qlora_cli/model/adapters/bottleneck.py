"""The bottleneck adapter (Houlsby et al.): down-projection, non-linearity, up-projection and a
residual, inserted after the attention and/or MLP block of chosen decoder layers through forward
hooks. The up-projection starts at zero, so training starts at the base model. Saved as
`bottleneck_model.safetensors` plus `bottleneck_config.json` (with any unfrozen base modules).

Several named adapters can sit on one base; `activate(model, name)` switches between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.model.adapters.registry import AdapterMethod, register
from qlora_cli.rundir import ADAPTER_FILES, BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS, read_bottleneck_config

SLOT = "bottleneck"  # child-module name of the slot on each hooked block
UNFROZEN_PREFIX = "unfrozen."
_ATTENTION = ("self_attn", "attn", "self_attention", "attention")
_MLP = ("mlp", "feed_forward", "ffn")
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """x -> x + up(act(down(x))), computed in the adapter's dtype (fp32) and cast back."""

    def __init__(self, hidden_size: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        update = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + update.to(hidden.dtype)


class BottleneckSlot(nn.Module):
    """The named adapters on one block, and which one runs (None: the block is left as it is)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.active not in self.adapters:
            return hidden
        return self.adapters[self.active](hidden)


def _hook(module, args, output):
    slot = getattr(module, SLOT)
    if isinstance(output, tuple):  # attention returns (output, weights)
        return (slot(output[0]),) + tuple(output[1:])
    return slot(output)


def decoder_layers(model) -> nn.ModuleList:
    """The model's list of decoder layers (the longest ModuleList named `layers`/`h`/`blocks`)."""
    found = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.rpartition(".")[2] in ("layers", "h", "blocks")]
    if not found:
        raise ModelError("cannot find the decoder layers of this model for the bottleneck adapter")
    return max(found, key=len)


def _block(layer: nn.Module, placement: str) -> nn.Module:
    for name in _ATTENTION if placement == "attention" else _MLP:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise ModelError(f"the decoder layers of this model have no {placement} block the bottleneck adapter knows")


def _canonical(name: str) -> str:
    """A module name as the bare transformers model spells it (a peft wrapper adds base_model.model.)."""
    return name.removeprefix("base_model.model.")


def slots(model) -> list[tuple[str, BottleneckSlot]]:
    return [(_canonical(name), module) for name, module in model.named_modules() if isinstance(module, BottleneckSlot)]


def attach(model, settings: dict, name: str = "default") -> int:
    """Add adapter `name` per `settings` (size, placement, activation, layers); returns its parameter count."""
    layers = decoder_layers(model)
    chosen = settings.get("layers") or list(range(len(layers)))
    if max(chosen) >= len(layers):
        raise ConfigError(f"adapter.layers_to_transform {chosen}: this model has layers 0..{len(layers) - 1}")
    hidden = model.config.get_text_config().hidden_size
    count = 0
    for index in chosen:
        for placement in settings["placement"]:
            block = _block(layers[index], placement)
            if not isinstance(getattr(block, SLOT, None), BottleneckSlot):
                setattr(block, SLOT, BottleneckSlot())
                block.register_forward_hook(_hook)
            adapter = Bottleneck(hidden, settings["size"], settings["activation"]).to(next(block.parameters()).device)
            getattr(block, SLOT).adapters[name] = adapter
            count += sum(p.numel() for p in adapter.parameters())
    activate(model, name)
    return count


def activate(model, name: Optional[str]) -> None:
    """Run adapter `name` everywhere (None: none, the base model)."""
    for _, slot in slots(model):
        slot.active = name


def adapter_state(model, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors keyed `<block path>.<down|up>.<weight|bias>`."""
    state = {}
    for path, slot in slots(model):
        if name in slot.adapters:
            block = path.rpartition(".")[0]
            for key, tensor in slot.adapters[name].state_dict().items():
                state[f"{block}.{key}"] = tensor.detach().contiguous()
    return state


def save(model, folder: Path, settings: dict, unfrozen: dict[str, torch.Tensor], name: str = "default") -> None:
    """Write the adapter (and the unfrozen base tensors) as safetensors plus its JSON config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model, name)
    tensors.update({UNFROZEN_PREFIX + key: value.detach().contiguous() for key, value in unfrozen.items()})
    save_file(tensors, str(folder / BOTTLENECK_WEIGHTS), metadata={"format": "pt"})
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps({"peft_type": "BOTTLENECK", **settings}, indent=2) + "\n")


def load(model, folder: Path, name: str = "default") -> None:
    """Attach the adapter saved in `folder` as `name`, with its weights, and make it active."""
    folder = Path(folder)
    settings = read_bottleneck_config(folder)
    if settings is None or not (folder / BOTTLENECK_WEIGHTS).is_file():
        raise ModelError(f"{folder} holds no bottleneck adapter ({BOTTLENECK_CONFIG} and {BOTTLENECK_WEIGHTS} expected)")
    attach(model, settings, name)
    load_weights(model, folder, name)


def load_weights(model, folder: Path, name: str = "default") -> None:
    """Copy saved tensors into adapter `name` (and the unfrozen base modules); every key must fit."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / BOTTLENECK_WEIGHTS))
    expected = adapter_state(model, name)
    params = {_canonical(name): param for name, param in model.named_parameters()}
    missing = [key for key in expected if key not in saved or saved[key].shape != expected[key].shape]
    if missing:
        raise ModelError(f"{folder}: the saved bottleneck adapter does not fit this model at {missing[0]} ({len(missing)} tensors); it was trained on another model or size")
    with torch.no_grad():
        for path, slot in slots(model):
            if name in slot.adapters:
                block = path.rpartition(".")[0]
                for key, tensor in slot.adapters[name].state_dict().items():
                    tensor.copy_(saved[f"{block}.{key}"])
        for key, value in saved.items():
            if key.startswith(UNFROZEN_PREFIX):
                target = params.get(key[len(UNFROZEN_PREFIX):])
                if target is None:
                    raise ModelError(f"{folder}: unfrozen tensor {key} does not exist in this model")
                target.copy_(value)


def attach_for_training(model, recipe, unfrozen: list[str]) -> dict:
    """Add the recipe's adapter as "default"; returns the settings saved with it."""
    section = recipe.adapter.bottleneck
    settings = {"size": section.size, "placement": list(section.placement), "activation": section.activation,
                "layers": recipe.adapter.layers_to_transform, "unfrozen": unfrozen, "base_model_name_or_path": recipe.model.path}
    attach(model, settings)
    if getattr(model, "is_quantized", False):
        # The Trainer refuses a quantized model unless it carries adapters; it knows only peft's, so
        # raise the flag transformers itself sets when peft adapters are loaded.
        model._hf_peft_config_loaded = True
    return settings


register(AdapterMethod(
    name="bottleneck", peft_type="BOTTLENECK", attach=attach_for_training, files=ADAPTER_FILES["bottleneck"],
    description="down-projection, non-linearity, up-projection and a residual after attention and/or MLP blocks",
    why_not_mergeable="a bottleneck adapter is non-linear (down-projection, activation, up-projection) and cannot fold into linear weights",
))
