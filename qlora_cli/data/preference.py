"""The data formats of the objectives beyond SFT, tokenized with the same masks as SFT's:
preference (prompt, chosen, rejected) for DPO / ORPO, unpaired_preference (prompt, completion,
label) for KTO, and prompt_only (prompt, optional reference columns) for GRPO. Prompts and
responses are plain text or chat messages (rendered with the model's chat template); only the
response tokens are scored. Each row is checked with its row number: missing fields, chosen
identical to rejected, a prompt that leaves no room for a response.
"""

from __future__ import annotations

import datasets

from qlora_cli.data.chat import check_messages, render_ids
from qlora_cli.data.formats import split_text_ids
from qlora_cli.errors import DataError
from qlora_cli.recipe.schema import DataSection

FORMATS = ("preference", "unpaired_preference", "prompt_only")


def required_columns(data: DataSection) -> list[str]:
    columns = data.columns
    return {
        "preference": [columns.prompt, columns.chosen, columns.rejected],
        "unpaired_preference": [columns.prompt, columns.completion, columns.label],
        "prompt_only": [columns.prompt],
    }[data.format]


def _is_chat(value) -> bool:
    return isinstance(value, list)


def prompt_text(prompt, tokenizer, row: int) -> str:
    """The prompt as the model reads it: text as given, messages through the chat template with the
    assistant's turn opened."""
    if not _is_chat(prompt):
        return prompt
    check_messages(prompt, f"row {row}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"row {row}: the prompt is chat messages but this tokenizer has no chat template; give the prompt as text")
    try:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises its own types
        raise DataError(f"row {row}: the chat template rejected this prompt: {exc}") from None


def _response_message(response, row: int, name: str) -> dict:
    if isinstance(response, dict):
        response = [response]
    check_messages(response, f"row {row}")
    if len(response) != 1 or response[0]["role"] != "assistant":
        raise DataError(f"row {row}: `{name}` as messages must be one assistant message")
    return response[0]


def response_ids(prompt, response, tokenizer, row: int, name: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): tokenized apart for text (the response ends with eos); for chat, the
    conversation through the response minus the prompt with the assistant's turn opened (as SFT masks)."""
    if not _is_chat(prompt):
        if _is_chat(response) or isinstance(response, dict):
            raise DataError(f"row {row}: the prompt is text but `{name}` is messages; give both as text or both as messages")
        return split_text_ids(prompt, str(response), tokenizer)
    message = response if isinstance(response, (list, dict)) else {"role": "assistant", "content": str(response)}
    message = _response_message(message, row, name)
    check_messages(prompt, f"row {row}")
    try:
        prompt_ids = render_ids(tokenizer, prompt, None, generation_prompt=True)
        full = render_ids(tokenizer, [*prompt, message], None, generation_prompt=False)
    except DataError as exc:
        raise DataError(f"row {row}: {exc}") from None
    if full[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"row {row}: the chat template does not render the prompt as a prefix of the conversation, so `{name}` cannot be masked; give text instead")
    return prompt_ids, full[len(prompt_ids):]


def _room(prompt_ids: list[int], data: DataSection, row: int, key: str) -> bool:
    """Whether the prompt leaves room for a response within max_seq_len (False: drop the row)."""
    if len(prompt_ids) < data.max_seq_len:
        return True
    if data.overlong == "drop":
        return False
    raise DataError(
        f"{key}: row {row}: the prompt alone is {len(prompt_ids)} tokens, leaving no room for a response within "
        f"data.max_seq_len={data.max_seq_len}; raise it, shorten the prompt, or set data.overlong: drop"
    )


def preference_row(row: dict, data: DataSection, tokenizer, number: int, key: str):
    """{prompt_ids, chosen_ids, rejected_ids}, or None to drop the row."""
    columns = data.columns
    chosen, rejected = row[columns.chosen], row[columns.rejected]
    if chosen == rejected:
        raise DataError(f"{key}: row {number}: `{columns.chosen}` and `{columns.rejected}` are identical, so the pair teaches nothing; fix or remove the row")
    prompt_ids, chosen_ids = response_ids(row[columns.prompt], chosen, tokenizer, number, columns.chosen)
    _, rejected_ids = response_ids(row[columns.prompt], rejected, tokenizer, number, columns.rejected)
    if not _room(prompt_ids, data, number, key):
        return None
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def unpaired_row(row: dict, data: DataSection, tokenizer, number: int, key: str):
    """{prompt_ids, completion_ids, label}, or None to drop the row."""
    columns = data.columns
    label = row[columns.label]
    if not isinstance(label, bool) and label not in (0, 1):
        raise DataError(f"{key}: row {number}: `{columns.label}` must be true (desirable) or false (undesirable), not {label!r}")
    prompt_ids, completion_ids = response_ids(row[columns.prompt], row[columns.completion], tokenizer, number, columns.completion)
    if not _room(prompt_ids, data, number, key):
        return None
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": bool(label)}


def prompt_only_row(row: dict, data: DataSection, tokenizer, number: int, key: str):
    """{prompt (text, chat template applied), the row's other columns (rewards read them)}, or None to drop it."""
    text = prompt_text(row[data.columns.prompt], tokenizer, number)
    prompt_ids = tokenizer(text, add_special_tokens=not _is_chat(row[data.columns.prompt]))["input_ids"]
    if not _room(prompt_ids, data, number, key):
        return None
    others = {name: value for name, value in row.items() if name != data.columns.prompt}
    if data.columns.reference != "reference" and data.columns.reference in others:
        others["reference"] = others[data.columns.reference]
    return {**others, "prompt": text, "prompt_ids": prompt_ids}


ROW_BUILDERS = {"preference": preference_row, "unpaired_preference": unpaired_row, "prompt_only": prompt_only_row}


def tokenize_rows(dataset, data: DataSection, tokenizer, key: str, stats):
    """Tokenize every row of a preference / unpaired / prompt-only dataset into `stats` (a TokenStats,
    filled in place); returns the datasets.Dataset the objective's trainer reads."""
    build = ROW_BUILDERS[data.format]
    rows = []
    for index, raw in enumerate(dataset):
        built = build(raw, data, tokenizer, index + 1, key)
        if built is None:
            stats.dropped_long += 1
            continue
        prompt = len(built["prompt_ids"])
        names = [name for name in ("chosen_ids", "rejected_ids", "completion_ids") if name in built]
        if any(prompt + len(built[name]) > data.max_seq_len for name in names):  # the prompt is kept whole, responses cut
            if data.overlong == "drop":
                stats.dropped_long += 1
                continue
            stats.truncated += 1
            built.update({name: built[name][: data.max_seq_len - prompt] for name in names})
        responses = [built[name] for name in names]
        stats.tokens += sum(prompt + len(ids) for ids in responses) if responses else prompt
        stats.scored_tokens += sum(len(ids) for ids in responses)
        stats.lengths.append(prompt + max((len(ids) for ids in responses), default=0))
        rows.append(built)
    stats.kept = len(rows)
    if not rows:
        raise DataError(f"{key}: no row has room for a response within data.max_seq_len={data.max_seq_len}; raise it or shorten the prompts")
    return datasets.Dataset.from_list(rows)
