"""The tokenizer half of a GGUF file: vocabulary, merges or scores, token types, special
token ids, BOS/EOS flags, the pre-tokenizer name llama.cpp dispatches on, and the chat template,
read from a Hugging Face fast tokenizer under llama.cpp's `tokenizer.*` keys.

Two tokenizer models are written: byte-level BPE (`gpt2`: Llama 3, SmolLM2, Qwen2) and
sentencepiece-style BPE with byte fallback (`llama`: Llama 2, Mistral).
"""

from __future__ import annotations

import json
from hashlib import sha256

from qlora_cli.errors import ModelError

# llama.cpp (convert_hf_to_gguf.py, get_vocab_base_pre) names a BPE pre-tokenizer by the sha256
# of the ids a tokenizer gives this text: a change in any split rule changes some id.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Hashes of that text under the reference tokenizers of the families we export (from llama.cpp).
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 fine-tunes
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Other tokenizers (a fine-tune's own, a test's): the first llama.cpp pre-tokenizer whose split
# rules give exactly this tokenizer's ids on PROBE_TEXT. Regexes as llama.cpp's llama-vocab.cpp
# applies them, one after the other; the stricter split of each pair comes first (single digits
# before runs of digits): a vocabulary with no multi-digit tokens tokenizes the same under both.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
PRE_TOKENIZER_SPLITS = {
    "qwen2": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "llama-bpe": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "smollm": [r"\p{N}", _GPT2],
    "gpt-2": [_GPT2],
}

# gguf.TokenType values (the gguf package is imported lazily).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is a slow one")
    return json.loads(backend.to_str())


def _components(node) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder and, for a Sequence, its members, flattened."""
    if not node:
        return []
    members = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    return [node] + [part for member in (members or []) for part in _components(member)]


def tokenizer_model(spec: dict) -> str:
    """`gpt2` for byte-level BPE, `llama` for sentencepiece-style BPE, else a ModelError."""
    model = spec.get("model", {})
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    if model.get("type") == "BPE" and any(part.get("type") == "ByteLevel" for part in parts):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ModelError(
        f"GGUF export writes byte-level BPE and sentencepiece BPE tokenizers; this one is a {model.get('type', 'unknown')} "
        "tokenizer without either, so llama.cpp could not reproduce it. Export with --format hf"
    )


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """The `tokenizer.ggml.pre` llama.cpp needs to split text as this tokenizer does."""
    ids = tokenizer.encode(PROBE_TEXT)
    known = KNOWN_PRE_HASHES.get(sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    expected = tokenizer.backend_tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    for name, splits in PRE_TOKENIZER_SPLITS.items():
        candidate = Tokenizer.from_str(json.dumps(spec))
        candidate.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        if candidate.encode(PROBE_TEXT, add_special_tokens=False).ids == expected:
            return name
    raise ModelError(
        "the tokenizer splits text in a way none of llama.cpp's pre-tokenizers we know reproduces "
        f"({', '.join(PRE_TOKENIZER_SPLITS)}), so llama.cpp would tokenize differently; export with --format hf"
    )


def token_table(tokenizer, spec: dict, rows: int, model: str) -> tuple[list[str], list[int]]:
    """Tokens and types for every embedding row; rows past the vocabulary are unused padding."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    unknown = tokenizer.unk_token_id
    tokens, types = [], []
    for index in range(rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif model == "llama" and index == unknown:  # sentencepiece marks <unk> apart from control tokens
            tokens.append(token)
            types.append(UNKNOWN)
        elif index in added:
            tokens.append(token)
            types.append(CONTROL if added[index].special else USER_DEFINED)
        elif model == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(BYTE)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def merge_list(spec: dict) -> list[str]:
    merges = spec["model"].get("merges") or []
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def sentencepiece_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """A score per token for llama.cpp's sentencepiece tokenizer, which merges the adjacent pair
    whose joined piece scores highest: the earlier the merge that makes a piece, the higher."""
    rank = {}
    for position, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, position)
    return [-float(rank[token] + 1) if token in rank else 0.0 for token in tokens]


def adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts a space (or ▁) before the first word."""
    for part in _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
        if part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") in ("always", "first"):
            return True
        if part.get("type") == "ByteLevel" and part.get("add_prefix_space"):
            return True
    return False


def special_flags(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS), as the tokenizer actually behaves on a plain text."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def write_tokenizer(writer, tokenizer, rows: int) -> dict:
    """Add every `tokenizer.*` key to a GGUFWriter; returns a summary for the report."""
    spec = backend_json(tokenizer)
    model = tokenizer_model(spec)
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer has {len(tokenizer):,} tokens but the model only {rows:,} embedding rows")
    tokens, types = token_table(tokenizer, spec, rows, model)
    merges = merge_list(spec)
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        pre = pre_tokenizer_name(tokenizer, spec)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    else:
        pre = "default"
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(sentencepiece_scores(tokens, merges))
        writer.add_token_types(types)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    add_bos, add_eos = special_flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(adds_space_prefix(spec))
    template = tokenizer.chat_template
    if isinstance(template, dict):
        writer.add_chat_template([{"name": name, "template": text} for name, text in template.items()])
    elif template:
        writer.add_chat_template(template)
    return {"model": model, "pre": pre, "tokens": len(tokens), "merges": len(merges), "chat_template": bool(template)}
