"""The adapter of a run, whatever its method: the peft config per method (lora, ia3, prompt /
prefix / p-tuning), our bottleneck adapter, sparse fine-tuning of unfrozen modules, and the
three things every caller needs: attach for training, save, and load for inference (several
adapters on one base, switched by name).
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from qlora_cli import bottleneck, modeling
from qlora_cli.adapter_config import PROMPT_METHODS
from qlora_cli.config import Recipe
from qlora_cli.errors import ConfigError, ModelError

MERGEABLE = {"LORA", "IA3"}  # DoRA is LoRA with use_dora
WHY_NOT_MERGEABLE = {
    "PROMPT_TUNING": "its soft prompt is an input, not a change of weights",
    "P_TUNING": "its prompt encoder makes input vectors, not a change of weights",
    "PREFIX_TUNING": "its prefixes are extra attention keys/values, not a change of weights",
    "BOTTLENECK": "a bottleneck adapter is non-linear (down-projection, activation, up-projection) and cannot fold into linear weights",
}
_LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}


def method_name(peft_type: str) -> str:
    return {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning"}.get(peft_type, peft_type.lower())


def unfrozen_modules(model, patterns: list[str]) -> list[str]:
    """Full names of the modules matched by `patterns`; quantized layers are refused."""
    if not patterns:
        return []
    matched = []
    for pattern in patterns:
        hits = [name for name, _ in model.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ConfigError(f"adapter.unfreeze: {pattern!r} matches no module (names look like model.layers.0.input_layernorm, model.norm)")
        matched.extend(hit for hit in hits if hit not in matched)
    modules = dict(model.named_modules())
    for name in matched:
        quantized = [p for p in modules[name].parameters() if getattr(p, "quant_state", None) is not None or p.dtype == torch.int8 or p.dtype == torch.uint8]
        if quantized:
            raise ConfigError(f"adapter.unfreeze: {name} is quantized and cannot be trained; unfreeze norms or embeddings, or use quantization.bits: 16")
    # A matched module inside another matched one is already covered.
    return [name for name in matched if not any(name.startswith(other + ".") for other in matched)]


def ia3_modules(recipe: Recipe, model_type: str) -> tuple[list[str], list[str]]:
    """(target, feed-forward) module names for IA3: the recipe's, else peft's defaults for the architecture."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    section = recipe.adapter.ia3
    targets = section.target_modules or TARGETS.get(model_type)
    if targets is None:
        raise ConfigError(f"peft has no default IA3 modules for {model_type}; set adapter.ia3.target_modules and feedforward_modules")
    feedforward = section.feedforward_modules if section.feedforward_modules is not None else [
        name for name in FEEDFORWARD.get(model_type, []) if name in targets
    ]
    return list(targets), list(feedforward)


def _in_layers(leaves: list[str], layers: list[int], module_names: list[str]) -> list[str]:
    from qlora_cli.layer_lr import layer_index

    return [name for name in module_names if name.rpartition(".")[2] in leaves and layer_index(name) in layers]


def build_peft_config(recipe: Recipe, modules_to_save: Optional[list[str]] = None, model_type: str = "llama", module_names: tuple = ()):
    """The peft config of the recipe's method (not for bottleneck, which is ours)."""
    import peft

    adapter, method = recipe.adapter, recipe.adapter.method
    if method == "lora":
        config = modeling.build_lora_config(recipe.lora)
        config.init_lora_weights = _LORA_INIT[recipe.lora.init]
        config.layers_to_transform = adapter.layers_to_transform
        if modules_to_save:
            config.modules_to_save = list(config.modules_to_save or []) + modules_to_save
        return config
    common = {"task_type": "CAUSAL_LM", "modules_to_save": modules_to_save or None}
    if method == "ia3":
        targets, feedforward = ia3_modules(recipe, model_type)
        if adapter.layers_to_transform is not None:  # peft's IA3Config has no layers_to_transform: name the modules
            targets, feedforward = (_in_layers(names, adapter.layers_to_transform, module_names) for names in (targets, feedforward))
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    if method == "prompt_tuning":
        section = adapter.prompt_tuning
        text = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": section.init_text, "tokenizer_name_or_path": recipe.model.path} if section.init_text else {}
        return peft.PromptTuningConfig(num_virtual_tokens=section.num_virtual_tokens, **text, **common)
    if method == "prefix_tuning":
        section = adapter.prefix_tuning
        return peft.PrefixTuningConfig(
            num_virtual_tokens=section.num_virtual_tokens, prefix_projection=section.projection,
            encoder_hidden_size=section.encoder_hidden_size, **common,
        )
    if method == "p_tuning":
        section = adapter.p_tuning
        return peft.PromptEncoderConfig(
            num_virtual_tokens=section.num_virtual_tokens, encoder_hidden_size=section.encoder_hidden_size,
            encoder_reparameterization_type="MLP", **common,
        )
    raise ValueError(f"no peft config for method {method}")


def bottleneck_settings(recipe: Recipe, unfrozen: list[str]) -> dict:
    section = recipe.adapter.bottleneck
    return {"size": section.size, "placement": list(section.placement), "activation": section.activation,
            "layers": recipe.adapter.layers_to_transform, "unfrozen": unfrozen, "base_model_name_or_path": recipe.model.path}


def attach(model, recipe: Recipe):
    """Make the frozen base trainable the way the recipe's method says; returns the model to train."""
    unfrozen = unfrozen_modules(model, recipe.adapter.unfreeze)
    if recipe.adapter.method == "bottleneck":
        bottleneck.attach(model, bottleneck_settings(recipe, unfrozen))
        modules = dict(model.named_modules())
        for name in unfrozen:
            modules[name].requires_grad_(True)
        model._qlora_bottleneck = bottleneck_settings(recipe, unfrozen)
        if getattr(model, "is_quantized", False):
            # The Trainer refuses a quantized model unless it carries adapters; it knows only peft's, so
            # raise the flag transformers sets when peft adapters are loaded.
            model._hf_peft_config_loaded = True
        return model
    from peft import get_peft_model

    try:
        names = [name for name, _ in model.named_modules()]
        model = get_peft_model(model, build_peft_config(recipe, unfrozen, model.config.model_type, names))
    except (ValueError, TypeError) as exc:
        message = str(exc).splitlines()[0]
        if "not found in the base model" in message or "Target modules" in message:
            raise ConfigError(
                f"the {recipe.adapter.method} target modules match no layer of this model; "
                f"its linear layers are: {', '.join(modeling.linear_module_names(model))}"
            ) from None
        raise ModelError(f"cannot attach the {recipe.adapter.method} adapter: {message[:300]}") from None
    if recipe.adapter.method == "lora":
        _special_lora_init(model, recipe)
    return model


def _special_lora_init(model, recipe: Recipe) -> None:
    if recipe.lora.init == "loftq":
        from peft.utils.loftq_utils import replace_lora_weights_loftq

        try:
            path = Path(recipe.model.path).expanduser()
            replace_lora_weights_loftq(model, model_path=str(path) if path.is_dir() else None)
        except (ValueError, OSError, TypeError) as exc:
            raise ModelError(f"LoftQ initialisation failed: {str(exc).splitlines()[0][:300]} (it needs the base's safetensors in a local folder)") from None
    elif recipe.lora.init in ("pissa", "olora"):
        # The adapter starts from principal (PiSSA) / orthonormal (OLoRA) directions taken out of the base
        # weights; saving it converted against this starting point gives a plain LoRA on the original base.
        initial = Path(tempfile.mkdtemp(prefix="qlora-initial-adapter-"))
        config = model.peft_config["default"]
        config.init_lora_weights, saved = True, config.init_lora_weights
        model.save_pretrained(str(initial))
        config.init_lora_weights = saved
        model._qlora_initial_adapter = initial


def save(model, folder: Path) -> None:
    """Write the trained adapter into `folder` as its loader expects it."""
    settings = getattr(model, "_qlora_bottleneck", None)
    if settings is not None:
        modules = dict(model.named_modules())
        unfrozen = {f"{name}.{key}": value for name in settings["unfrozen"] for key, value in modules[name].state_dict().items()}
        bottleneck.save(model, folder, settings, unfrozen)
        return
    initial = getattr(model, "_qlora_initial_adapter", None)
    if initial is not None and Path(initial).is_dir():
        model.save_pretrained(str(folder), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial))
        return
    model.save_pretrained(str(folder), safe_serialization=True)


def finish(model) -> None:
    """Remove what only training needed (the PiSSA / OLoRA starting point)."""
    initial = getattr(model, "_qlora_initial_adapter", None)
    if initial is not None:
        shutil.rmtree(initial, ignore_errors=True)


def adapter_type(folder: Path) -> str:
    """PEFT type of the adapter in `folder` (LORA, IA3, PROMPT_TUNING, ..., BOTTLENECK)."""
    config = bottleneck.read_config(folder)
    if config is not None:
        return "BOTTLENECK"
    from qlora_cli.inference import read_adapter_config

    return str(read_adapter_config(folder).get("peft_type") or "unknown").upper()


def load_adapters(model, adapters: list[tuple[str, Path]]):
    """Put every (name, folder) adapter on the loaded base; returns the model to call.

    peft adapters of one type share a PeftModel (load_adapter / set_adapter); bottleneck adapters
    are ours and sit beside them. Mixing peft types cannot share one base.
    """
    kinds = {name: adapter_type(folder) for name, folder in adapters}
    peft_kinds = {kind for kind in kinds.values() if kind != "BOTTLENECK"}
    if len(peft_kinds) > 1:
        raise ConfigError(f"adapters of different peft methods ({', '.join(sorted(peft_kinds))}) cannot share one loaded base; load them in separate runs")
    from peft import PeftModel

    for name, folder in adapters:
        try:
            if kinds[name] == "BOTTLENECK":
                bottleneck.load(model, folder, name)
            elif not isinstance(model, PeftModel):
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"cannot load the adapter in {folder}: {str(exc).splitlines()[0][:300]}") from None
    model._qlora_adapter_kinds = kinds
    return model


@contextlib.contextmanager
def only_base(model):
    """Run the bare base model inside the block, whatever adapters are attached."""
    from peft import PeftModel

    active = next((slot.active for _, slot in bottleneck.slots(model)), None)
    bottleneck.activate(model, None)
    try:
        with model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext():
            yield model
    finally:
        bottleneck.activate(model, active)


@contextlib.contextmanager
def using(model, name: Optional[str]):
    """Run adapter `name` (None or "base": the base) inside the block."""
    kinds = getattr(model, "_qlora_adapter_kinds", {})
    if name in (None, "base"):
        with only_base(model):
            yield model
        return
    if name not in kinds:
        raise ConfigError(f"no adapter named {name!r}; loaded: {', '.join(kinds) or 'none'} (and base)")
    if kinds[name] == "BOTTLENECK":
        bottleneck.activate(model, name)
        peft_off = model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()
        with peft_off:
            yield model
        return
    bottleneck.activate(model, None)
    model.set_adapter(name)
    yield model


def preflight(recipe: Recipe) -> None:
    """Checks that need the machine, not the model."""
    if recipe.adapter.method == "lora" and recipe.lora.init == "loftq" and not torch.cuda.is_available():
        raise ConfigError("lora.init loftq needs a CUDA GPU: peft's replace_lora_weights_loftq computes the LoftQ SVD on one; use init default here")


def is_prompt_method(method: str) -> bool:
    return method in PROMPT_METHODS
