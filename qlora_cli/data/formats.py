"""Each data format rendered to token ids with labels that score exactly the tokens the recipe
trains on: text | alpaca | chat (the tokenizer's chat template) | prompt_completion. Masks come from
token positions, never from comparing ids with the pad id (SmolLM2 and others pad with their eos).
"""

from __future__ import annotations

from typing import Optional

from qlora_cli.data.chat import IGNORE_INDEX, chat_ids, conversation, last_answer
from qlora_cli.errors import DataError
from qlora_cli.recipe.schema import DataSection

__all__ = ["IGNORE_INDEX", "format_row", "prompt_and_reference"]
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def split_text_ids(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids ending with eos), tokenized apart so the boundary between prompt
    and response is exact (used by prompt_completion and the preference formats)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return prompt_ids, with_eos(tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer)


def _prompt_completion_ids(prompt: str, completion: str, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    prompt_ids, completion_ids = split_text_ids(prompt, completion, tokenizer)
    ids = prompt_ids + completion_ids
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids, labels


def alpaca_prompt(instruction: str, context: Optional[str]) -> str:
    if context and context.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT.format(instruction=instruction)


def format_row(row: dict, data: DataSection, tokenizer, index: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one raw row, before truncation."""
    columns = data.columns
    if data.format == "text":
        ids = with_eos(tokenizer(row[columns.text], add_special_tokens=True)["input_ids"], tokenizer)
        return ids, list(ids)
    if data.format == "chat":
        messages, tools, added = conversation(row, columns.messages, columns.tools, columns.system)
        return chat_ids(messages, tools, tokenizer, data.train_on, data.train_on_prompt, f"row {index + 1}", added)
    prompt, completion = prompt_and_reference(row, data, tokenizer)
    return _prompt_completion_ids(prompt, completion, tokenizer, data.train_on_prompt)


def prompt_and_reference(row: dict, data: DataSection, tokenizer) -> tuple[str, str]:
    """The text a model is given and the reference answer, for generation metrics."""
    columns = data.columns
    if data.format == "alpaca":
        return alpaca_prompt(row[columns.instruction], row.get(columns.input)), row[columns.output]
    if data.format == "prompt_completion":
        return row[columns.prompt], row[columns.completion]
    if data.format == "chat":
        messages, tools, _ = conversation(row, columns.messages, columns.tools, columns.system)
        last = last_answer(messages)
        if last is None:
            raise DataError("a chat row without an assistant turn has no reference answer")
        prompt = tokenizer.apply_chat_template(messages[:last], tools=tools, tokenize=False, add_generation_prompt=True)
        return prompt, messages[last].get("content") or ""
    raise DataError("format text has no prompt/reference split; generation metrics need alpaca, chat or prompt_completion")
