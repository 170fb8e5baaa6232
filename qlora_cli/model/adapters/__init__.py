"""The adapter of a run, whatever its method (one file each beside this one, listed in
registry.py): attach for training (returning an `Adapter` that knows how to save itself),
sparse fine-tuning of unfrozen modules, and loading for inference (several adapters on one
base, switched by name).
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora_cli.errors import ConfigError, ModelError, library_message
from qlora_cli.model import families, loading
from qlora_cli.model.adapters import bottleneck, ia3, lora, prompts  # noqa: F401  (each registers its method)
from qlora_cli.model.adapters.registry import METHODS, AdapterMethod, by_peft_type
from qlora_cli.recipe.schema import Recipe
from qlora_cli.rundir import read_adapter_config, read_bottleneck_config


@dataclass
class Adapter:
    """A trainable adapter on its base: the model to train and what saving it needs."""

    model: object
    method: AdapterMethod
    settings: Optional[dict] = None  # our own adapters' saved config (bottleneck)
    unfrozen: list[str] = field(default_factory=list)
    initial: Optional[Path] = None  # PiSSA / OLoRA starting point, saved against
    note: Optional[str] = None  # a decision printed at start-up (what all-linear means on an MoE base)

    @property
    def ours(self) -> bool:
        """Saved and loaded by us, not by peft."""
        return self.method.attach is not None

    def save(self, folder: Path) -> None:
        """Write the trained adapter into `folder` as its loader expects it."""
        if self.ours:
            modules = dict(self.model.named_modules())
            unfrozen = {f"{name}.{key}": value for name in self.unfrozen for key, value in modules[name].state_dict().items()}
            bottleneck.save(self.model, folder, self.settings, unfrozen)
        elif self.initial is not None and self.initial.is_dir():
            self.model.save_pretrained(str(folder), safe_serialization=True, path_initial_model_for_weight_conversion=str(self.initial))
        else:  # the trained adapter only, not a frozen reference copy (model.init_adapter under dpo / kto / grpo)
            self.model.save_pretrained(str(folder), safe_serialization=True, selected_adapters=["default"])

    def saved_config(self) -> dict:
        """The config saved beside the trained weights (peft's adapter_config.json keys, or ours)."""
        if self.ours:
            return {"peft_type": self.method.peft_type, **(self.settings or {})}
        return self.model.peft_config["default"].to_dict()

    def load_checkpoint(self, folder: Path) -> None:
        """Put a checkpoint's weights back into our own adapter (peft's are the Trainer's to load)."""
        bottleneck.load_weights(self.model, Path(folder))

    def finish(self) -> None:
        """Remove what only training needed (the PiSSA / OLoRA starting point)."""
        if self.initial is not None:
            shutil.rmtree(self.initial, ignore_errors=True)


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


def attach(model, recipe: Recipe) -> Adapter:
    """Make the frozen base trainable the way the recipe's method says."""
    method = METHODS[recipe.adapter.method]
    unfrozen = unfrozen_modules(model, recipe.adapter.unfreeze)
    if method.attach is not None:
        settings = method.attach(model, recipe, unfrozen)
        modules = dict(model.named_modules())
        for name in unfrozen:
            modules[name].requires_grad_(True)
        return Adapter(model, method, settings, unfrozen)
    from peft import PeftModel, get_peft_model

    if recipe.model.init_adapter:  # continue a trained LoRA adapter (checked by preflight)
        model = PeftModel.from_pretrained(model, recipe.model.init_adapter, is_trainable=True)
        return Adapter(model, method, None, unfrozen)
    note = None
    moe = families.moe_targets(model) if method.name == "lora" and recipe.lora.target_modules == "all-linear" else None
    if moe:
        targets, note = moe
        recipe = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"target_modules": targets})})
    elif method.name == "lora":
        families.check_moe_targets(model, recipe.lora.target_modules)
    text_only = families.language_model_targets(model, recipe.lora.target_modules) if method.name == "lora" else None
    if text_only:
        targets, note = text_only
        recipe = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"target_modules": targets})})
    try:
        names = [name for name, _ in model.named_modules()]
        model = get_peft_model(model, method.peft_config(recipe, unfrozen, model.config.model_type, names))
    except (ValueError, TypeError) as exc:
        message = library_message(exc)
        if "not found in the base model" in message or "Target modules" in message:
            raise ConfigError(
                f"the {method.name} target modules match no layer of this model; "
                f"its linear layers are: {', '.join(loading.linear_module_names(model))}"
            ) from None
        raise ModelError(f"cannot attach the {method.name} adapter: {message}") from None
    initial = lora.special_init(model, recipe) if method.name == "lora" else None
    return Adapter(model, method, None, unfrozen, initial, note)


def adapter_type(folder: Path) -> str:
    """PEFT type of the adapter in `folder` (LORA, IA3, PROMPT_TUNING, ..., BOTTLENECK)."""
    if read_bottleneck_config(folder) is not None:
        return "BOTTLENECK"
    return str(read_adapter_config(folder).get("peft_type") or "unknown").upper()


@dataclass
class LoadedAdapters:
    """A base with named adapters on it, for inference."""

    model: object
    kinds: dict[str, str]  # adapter name -> peft type


def _ours(peft_type: str) -> bool:
    entry = by_peft_type(peft_type)
    return entry is not None and entry.attach is not None


def load_adapters(model, adapters: list[tuple[str, Path]]) -> LoadedAdapters:
    """Put every (name, folder) adapter on the loaded base.

    peft adapters of one type share a PeftModel (load_adapter / set_adapter); our own adapters
    (bottleneck) sit beside them. Mixing peft types cannot share one base.
    """
    kinds = {name: adapter_type(folder) for name, folder in adapters}
    peft_kinds = {kind for kind in kinds.values() if not _ours(kind)}
    if len(peft_kinds) > 1:
        raise ConfigError(f"adapters of different peft methods ({', '.join(sorted(peft_kinds))}) cannot share one loaded base; load them in separate runs")
    from peft import PeftModel

    for name, folder in adapters:
        try:
            if _ours(kinds[name]):
                bottleneck.load(model, folder, name)
            elif not isinstance(model, PeftModel):
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"cannot load the adapter in {folder}: {library_message(exc)}") from None
    return LoadedAdapters(model, kinds)


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
def using(loaded: LoadedAdapters, name: Optional[str]):
    """Run adapter `name` (None or "base": the base) inside the block."""
    model, kinds = loaded.model, loaded.kinds
    if name in (None, "base"):
        with only_base(model):
            yield model
        return
    if name not in kinds:
        raise ConfigError(f"no adapter named {name!r}; loaded: {', '.join(kinds) or 'none'} (and base)")
    if _ours(kinds[name]):
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
    if recipe.model.init_adapter:
        config = read_adapter_config(Path(recipe.model.init_adapter))
        if config.get("peft_type") != "LORA" or recipe.adapter.method != "lora":
            raise ConfigError(f"model.init_adapter: {recipe.model.init_adapter} holds a {config.get('peft_type')} adapter; "
                              "only a LoRA adapter (adapter.method lora) can be continued")
    if recipe.adapter.method == "lora" and recipe.lora.init == "loftq" and not torch.cuda.is_available():
        raise ConfigError("lora.init loftq needs a CUDA GPU: peft's replace_lora_weights_loftq computes the LoftQ SVD on one; use init default here")
