"""Random-weight model folders for the GPU check (scripts/gpu_check.py): the shape of a catalog
model (qlora_cli/estimate/catalog.py) or of the demo model, with random weights and the demo
model's tokenizer, saved as a Hugging Face folder that `qlora train`, `qlora estimate --measure`
and scripts/bench_train.py load like any other. Nothing is downloaded.

The demo model's weights (270 MB) are too large to travel to a lent GPU machine; its tokenizer
and config (3.5 MB, `scripts/gpu_check.sh --prepare` copies them to .gpu/) do. Memory and speed
do not depend on the weights' values, and a random model still shows a falling loss.

    python scripts/gpu_models.py HuggingFaceTB/SmolLM2-135M-Instruct /tmp/models/smollm2
    python scripts/gpu_models.py meta-llama/Llama-3.2-1B /tmp/models/llama-1b --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Where the demo model's tokenizer and config come from, first found wins: the folder carried to
# a GPU machine, then the demo model itself (`qlora demo-model`).
TOKENIZER_SOURCES = (ROOT / ".gpu" / "SmolLM2-135M-Instruct", ROOT / "models" / "SmolLM2-135M-Instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
DEMO_SHAPE = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARKER = "random-weights.json"  # written last: a folder with it is complete


def tokenizer_source(explicit: str | None = None) -> Path | None:
    """The folder holding the demo model's tokenizer files, or None."""
    candidates = [Path(explicit)] if explicit else list(TOKENIZER_SOURCES)
    return next((folder for folder in candidates if (folder / "tokenizer.json").is_file()), None)


def model_config(name: str, source: Path, layers: int | None = None):
    """A transformers config of catalog model `name` (the demo model's own config.json for its shape)."""
    from transformers import AutoConfig

    from qlora_cli.estimate.catalog import find_model

    if name == DEMO_SHAPE and (source / "config.json").is_file():
        config = AutoConfig.from_pretrained(source)
    else:
        found = find_model(name)
        if found is None:
            raise SystemExit(f"{name} is not in qlora_cli/estimate/catalog.py")
        fields = {key: value for key, value in found[1].items() if not key.startswith("qlora_")}
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
        config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, 8192)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2  # the demo tokenizer's ids
    if layers is not None:
        config.num_hidden_layers = layers
        for key in ("layer_types",):  # per-layer lists must shrink with the layer count
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:layers])
    return config


def is_built(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build(name: str, folder: Path, source: Path, device: str = "cpu", layers: int | None = None, seed: int = 0) -> Path:
    """Write a random-weight model of `name`'s shape with the demo tokenizer to `folder` (kept if already built)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if is_built(folder):
        return folder
    config = model_config(name, source, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(folder, max_shard_size="50GB")
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, folder / file)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    (folder / MARKER).write_text(json.dumps({"shape_of": name, "seed": seed, "parameters": parameters, "layers": config.num_hidden_layers}) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="catalog hub id, e.g. meta-llama/Llama-3.2-1B")
    parser.add_argument("folder")
    parser.add_argument("--tokenizer", help="folder with the demo tokenizer files (default: .gpu/ or models/SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is much faster for 1B+)")
    parser.add_argument("--layers", type=int, help="fewer layers (the dry run builds a 2-layer model)")
    args = parser.parse_args()
    source = tokenizer_source(args.tokenizer)
    if source is None:
        raise SystemExit("no demo tokenizer: run `qlora demo-model` or `bash scripts/gpu_check.sh --prepare`")
    print(build(args.name, Path(args.folder), source, args.device, args.layers))


if __name__ == "__main__":
    main()
