"""A model's shape, as the estimate needs it: the linear layers of one decoder layer, the 16-bit
leftovers (embeddings, head, norms), from a config.json dict, found in a local folder, the shipped
catalog, the Hugging Face cache, or (online only) the hub. No weights, no torch, no transformers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qlora_cli.errors import ConfigError
from qlora_cli.estimate import catalog
from qlora_cli.recipe.paths import is_local_path

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "phi3"}
FUSED, PER_EXPERT = "fused", "per-expert"


def installed_expert_layout() -> str:
    """How the installed transformers builds MoE experts, without importing it: from 5.0 on as fused
    3-D parameters (MixtralExperts.gate_up_proj [experts, 2 x inter, hidden]), which bitsandbytes
    leaves in 16-bit because it replaces nn.Linear only; before 5.0 as one nn.Linear per expert
    (w1/w2/w3), which it quantizes. tests/unit/test_estimate_moe.py builds the tiny Mixtral with the
    installed libraries and checks this answer against what bitsandbytes really did."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return FUSED
    return FUSED if major >= 5 else PER_EXPERT


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of a decoder layer: quantized by bitsandbytes, targetable by LoRA."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    role: str = ""  # attn_in (reads the attention norm), attn_out, mlp_in, mlp_out


@dataclass(frozen=True)
class Experts:
    """The experts' weight of one projection, `num_experts` of in x out. Fused (transformers >= 5):
    one 3-D parameter, not an nn.Linear, so bitsandbytes leaves it in 16-bit and peft adapts it only
    through target_parameters (all-linear does). Per-expert (older transformers): nn.Linear layers,
    quantized and LoRA-wrapped like any other."""

    name: str
    num_experts: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    linears: tuple[Linear, ...]  # per decoder layer
    experts: tuple[Experts, ...] = ()  # per decoder layer
    router_experts: int = 0  # MoE router weight (experts x hidden), a plain parameter
    experts_per_token: int = 0
    expert_layout: str = FUSED  # FUSED or PER_EXPERT (installed_expert_layout)
    shared_expert_size: int = 0  # Qwen2-MoE: a dense SwiGLU beside the experts (its linears are in `linears`)
    norms_per_layer: int = 2  # full-width RMSNorms
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    extra_params: int = 0  # parameters outside the decoder we only count (e.g. a vision tower), 16-bit
    context_length: int = 0  # max_position_embeddings (0: not known)
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_names(self) -> list[str]:
        return [linear.name for linear in self.linears]

    def norm_params(self) -> int:
        """All RMSNorm weights: per layer, plus the final norm."""
        per_layer = self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    def embedding_params(self) -> int:
        """Input embeddings plus an untied output head (a tied head shares the embedding)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def total_params(self) -> int:
        per_layer = sum(l.in_features * l.out_features + (l.out_features if l.bias else 0) for l in self.linears)
        per_layer += sum(e.num_experts * e.in_features * e.out_features for e in self.experts)
        per_layer += self.router_experts * self.hidden_size
        return self.num_layers * per_layer + self.embedding_params() + self.norm_params() + self.extra_params


def _decoder_linears(model_type: str, hidden: int, inter: int, q_dim: int, kv_dim: int, qkv_bias: bool,
                     mlp_bias: bool) -> tuple[Linear, ...]:
    attention_out = Linear("o_proj", q_dim, hidden, False, "attn_out")
    if model_type == "phi3":  # fused projections
        return (
            Linear("qkv_proj", hidden, q_dim + 2 * kv_dim, qkv_bias, "attn_in"), attention_out,
            Linear("gate_up_proj", hidden, 2 * inter, mlp_bias, "mlp_in"), Linear("down_proj", inter, hidden, mlp_bias, "mlp_out"),
        )
    attention = (
        Linear("q_proj", hidden, q_dim, qkv_bias, "attn_in"), Linear("k_proj", hidden, kv_dim, qkv_bias, "attn_in"),
        Linear("v_proj", hidden, kv_dim, qkv_bias, "attn_in"), attention_out,
    )
    if model_type == "mixtral":
        return attention
    return attention + (
        Linear("gate_proj", hidden, inter, mlp_bias, "mlp_in"), Linear("up_proj", hidden, inter, mlp_bias, "mlp_in"),
        Linear("down_proj", inter, hidden, mlp_bias, "mlp_out"),
    )


def from_config(config: dict, name: str, source: str, expert_layout: Optional[str] = None) -> Architecture:
    """An Architecture from a config.json dict (text decoders of the Llama family and kin). MoE
    experts are laid out as the installed transformers builds them unless `expert_layout` says."""
    notes = []
    if "text_config" in config:  # multimodal wrapper (e.g. Gemma 3 4B+): the decoder is in text_config
        text = dict(config["text_config"])
        text.setdefault("model_type", config.get("model_type", ""))
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        if "vision_config" in config and "qlora_extra_params" not in config:
            notes.append("vision tower not counted")
        config = {**text, **{k: v for k, v in config.items() if k.startswith("qlora_")}}
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise ConfigError(f"{source}: config.json lacks {', '.join(missing)}; is this a causal language model?")
    model_type = str(config.get("model_type", ""))
    model_type = "gemma3_text" if model_type == "gemma3" else model_type
    if model_type not in _LLAMA_LIKE:
        notes.append(f"model_type {config.get('model_type')!r} not modelled exactly; assumed a Llama-like layout")
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    qkv_bias = bool(config.get("attention_bias", model_type in ("qwen2", "qwen2_moe")))
    mlp_bias = bool(config.get("mlp_bias", False))
    dense = int(config.get("shared_expert_intermediate_size", inter)) if model_type == "qwen2_moe" else inter
    linears = _decoder_linears(model_type, hidden, dense, heads * head_dim, kv_heads * head_dim, qkv_bias, mlp_bias)
    experts, router, top_k, shared = (), 0, 0, 0
    layout = expert_layout or installed_expert_layout()
    if model_type in ("mixtral", "qwen2_moe"):
        router = int(config.get("num_local_experts") or config.get("num_experts") or 8)
        top_k = int(config.get("num_experts_per_tok", 2))
        if model_type == "qwen2_moe":
            inter, shared = int(config.get("moe_intermediate_size", inter)), int(config.get("shared_expert_intermediate_size", 0))
            linears = linears + (Linear("shared_expert_gate", hidden, 1, False, "mlp_in"),)
        experts = (Experts("gate_up_proj", router, hidden, 2 * inter), Experts("down_proj", router, inter, hidden))
        if layout == FUSED:
            notes.append("MoE experts: fused 3-D tensors in the installed transformers, so bitsandbytes leaves them "
                         "16-bit (it quantizes nn.Linear only); counted in 16-bit")
        else:
            notes.append("MoE experts: one nn.Linear per expert in the installed transformers, quantized by bitsandbytes")
    if config.get("qlora_note"):
        notes.append(config["qlora_note"])
    return Architecture(
        name=name, model_type=model_type, hidden_size=hidden, intermediate_size=inter,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        vocab_size=int(config["vocab_size"]), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        linears=linears, experts=experts, router_experts=router, experts_per_token=top_k, expert_layout=layout,
        shared_expert_size=shared,
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        extra_params=int(config.get("qlora_extra_params", 0)), context_length=int(config.get("max_position_embeddings") or 0),
        source=source, notes=tuple(notes),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _hub_cache_config(hub_id: str) -> Optional[Path]:
    """config.json of `hub_id` if the Hugging Face cache already holds it (no network)."""
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = home / ("models--" + hub_id.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    if found:
        return found[-1]
    own = _own_cache() / (hub_id.replace("/", "--") + ".json")
    return own if own.is_file() else None


def _own_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-cli" / "hub-configs"


def _fetch_hub_config(hub_id: str, timeout: float = 4.0) -> Optional[dict]:
    """config.json from the hub in one short request (no retries); None when offline or refused."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("QLORA_OFFLINE"):
        return None
    request = urllib.request.Request(f"https://huggingface.co/{hub_id}/resolve/main/config.json")
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            config = json.loads(response.read())
    except (OSError, ValueError):
        return None
    try:
        target = _own_cache() / (hub_id.replace("/", "--") + ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(config))
    except OSError:
        pass
    return config


def resolve(name: str) -> Architecture:
    """The architecture of a model folder, a config.json, a catalog name or a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {name} has no config.json; point at a Hugging Face model folder")
        return from_config(_read_json(path / "config.json"), path.name, f"{path}/config.json")
    if path.is_file():
        return from_config(_read_json(path), path.parent.name or path.stem, str(path))
    if is_local_path(name, (".json",)):
        hint = " (run `qlora demo-model` to create the demo model)" if "SmolLM2" in name else ""
        raise ConfigError(f"model {name} does not exist{hint}; give a model folder, a config.json, or a hub id like org/name")
    found = catalog.find_model(name)
    if found:
        hub_id, config = found
        return from_config(config, hub_id, "shipped catalog")
    if "/" in name:
        cached = _hub_cache_config(name)
        if cached:
            return from_config(_read_json(cached), name, str(cached))
        fetched = _fetch_hub_config(name)
        if fetched:
            return from_config(fetched, name, f"huggingface.co/{name}")
    suggestions = catalog.suggest_models(name)
    tip = f"did you mean {' or '.join(suggestions)}?" if suggestions else "pass a model folder or a config.json"
    raise ConfigError(
        f"unknown model {name!r}: not a local folder, not in the catalog, and no config.json in the hub cache "
        f"or from huggingface.co; {tip}"
    )
