"""Each data format rendered to token ids with labels that score exactly the tokens the recipe
trains on: text | alpaca | chat (the tokenizer's chat template) | prompt_completion. Masks come from
token positions, never from comparing ids with the pad id (SmolLM2 and others pad with their eos).
"""

from __future__ import annotations

from typing import Optional

from qlora_cli.errors import DataError, library_message
from qlora_cli.recipe.schema import DataSection

IGNORE_INDEX = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _prompt_completion_ids(prompt: str, completion: str, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    # Tokenized apart and joined, so the boundary between prompt and response is exact.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = _with_eos(tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer)
    ids = prompt_ids + completion_ids
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids, labels


def alpaca_prompt(instruction: str, context: Optional[str]) -> str:
    if context and context.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT.format(instruction=instruction)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own types for templates that reject a conversation
        raise DataError(f"the chat template rejected this conversation: {library_message(exc)}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_messages(messages, row: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"row {row}: `messages` must be a non-empty list of {{role, content}} objects")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
            raise DataError(f"row {row}: every message needs `role` and `content` (got {str(message)[:80]})")


def _chat_ids(messages: list[dict], tokenizer, train_on_prompt: bool, row: int) -> tuple[list[int], list[int]]:
    """Tokens of a conversation, scoring the assistant turns.

    Each assistant turn's span is found by rendering the conversation up to the turn with a
    generation prompt, and through the turn; the difference is what the model must produce.
    Templates whose renders are not prefixes of each other cannot be masked this way.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat needs a tokenizer with a chat template; this one has none (use alpaca or prompt_completion)")
    _check_messages(messages, row)
    try:
        ids = _render(tokenizer, messages, generation_prompt=False)
    except DataError as exc:
        raise DataError(f"row {row}: {exc}") from None
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or train_on_prompt:
            continue
        start = len(_render(tokenizer, messages[:turn], generation_prompt=True))
        through = _render(tokenizer, messages[: turn + 1], generation_prompt=False)
        end = len(through)
        if through != ids[:end] or start > end:
            raise DataError(
                f"row {row}: the chat template does not render turns as prefixes of the conversation, so responses "
                "cannot be masked; use format prompt_completion or set data.train_on_prompt: true"
            )
        labels[start:end] = ids[start:end]
    return ids, labels


def format_row(row: dict, data: DataSection, tokenizer, index: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one raw row, before truncation."""
    columns = data.columns
    if data.format == "text":
        ids = _with_eos(tokenizer(row[columns.text], add_special_tokens=True)["input_ids"], tokenizer)
        return ids, list(ids)
    if data.format == "chat":
        return _chat_ids(row[columns.messages], tokenizer, data.train_on_prompt, index + 1)
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
        messages = row[columns.messages]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise DataError("a chat row without an assistant turn has no reference answer")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, messages[last]["content"]
    raise DataError("format text has no prompt/reference split; generation metrics need alpaca, chat or prompt_completion")
