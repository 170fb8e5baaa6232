"""Chat rows as people write them, rendered through the model's chat template: multi-turn
conversations (every assistant turn trained, or the last: data.train_on), per-row system prompts,
and tool calling (assistant `tool_calls`, `tool` messages, a `tools` column passed to the template).

Each trained assistant turn's span is what the template adds between the conversation up to the
turn with a generation prompt and the conversation through the turn: the answer and the turn's
terminator (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>` ...). A span without any special token
means the model would never learn to stop: that is an error, not a silent bug.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Optional

from qlora_cli.errors import DataError, library_message

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


def _compact(value: Any) -> Any:
    """`value` without None entries: datasets gives every message (and every tool-call argument
    object) the union of the keys seen in the file, filled with None, which templates would render."""
    if isinstance(value, dict):
        return {key: _compact(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_compact(item) for item in value]
    return value


def conversation(row: dict, messages_column: str, tools_column: str, system_column: str) -> tuple[list[dict], Optional[list], int]:
    """(messages, tools or None, messages added before the row's own) of a raw row: None-filled
    keys dropped, tool-call arguments as objects, a system-column prompt put first when the
    messages have none (errors number the row's own messages)."""
    messages = _compact(row.get(messages_column))
    if not isinstance(messages, list):
        return messages, None, 0
    for message in messages:
        for call in (message.get("tool_calls") or []) if isinstance(message, dict) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # check_messages names it
    system, added = row.get(system_column), 0
    if isinstance(system, str) and system.strip() and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages, added = [{"role": "system", "content": system}] + messages, 1
    tools = row.get(tools_column)
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f"`{tools_column}` is not JSON ({exc.msg}); give a list of function schemas") from None
    return messages, (_compact(tools) or None), added


def check_messages(messages, where: str, added: int = 0) -> None:
    """The shape of one conversation: a non-empty list of {role, content}; roles we know (a typo
    gets the closest one); tool calls with a function name and object arguments. (A row without an
    assistant turn has nothing to learn: it is dropped and counted.)"""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, start=1 - added):
        at = f"{where} message {number}" if number > 0 else f"{where} system prompt"
        if not isinstance(message, dict) or message.get("role") is None:
            raise DataError(f"{at}: every message needs `role` and `content` (got {str(message)[:80]})")
        role = message["role"]
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(f"{at}: unknown role {role!r}; {hint}roles are {', '.join(ROLES)}")
        calls = message.get("tool_calls")
        if calls is not None and role != "assistant":
            raise DataError(f"{at}: only assistant messages have `tool_calls` (this one is {role})")
        for call in calls or []:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not function.get("name"):
                raise DataError(f"{at}: a tool call needs `function: {{name, arguments}}` (got {str(call)[:80]})")
            if not isinstance(function.get("arguments", {}), dict):
                raise DataError(f"{at}: tool call {function['name']!r} has `arguments` that are not a JSON object")
        if not isinstance(message.get("content"), str) and not calls:
            raise DataError(f"{at}: every message needs `role` and `content` (a {role} message without text)")


def render_ids(tokenizer, messages: list[dict], tools: Optional[list], generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own types for templates that reject a conversation
        raise DataError(f"the chat template rejected this conversation: {library_message(exc)}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _special_ids(tokenizer) -> set[int]:
    special = set(tokenizer.all_special_ids)
    special.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return special


def chat_ids(
    messages: list[dict], tools: Optional[list], tokenizer, train_on: str, train_on_prompt: bool, where: str, added: int = 0
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels scoring its trained assistant turns (every one, or
    the last: `train_on`), each with its end-of-turn token."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat needs a tokenizer with a chat template; this one has none (set model.chat_template, or use alpaca or prompt_completion)")
    check_messages(messages, where, added)
    try:
        ids = render_ids(tokenizer, messages, tools, generation_prompt=False)
    except DataError as exc:
        tooling = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        hint = "; this row has tool calls: set model.chat_template to a template with tools (e.g. data/tools/chatml-tools.jinja)" if tooling else ""
        raise DataError(f"{where}: {exc}{hint}") from None
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    turns = [turn for turn, message in enumerate(messages) if message["role"] == "assistant"]
    special = _special_ids(tokenizer)
    for turn in turns if train_on == "all_assistant" else turns[-1:]:
        start = len(render_ids(tokenizer, messages[:turn], tools, generation_prompt=True))
        through = render_ids(tokenizer, messages[: turn + 1], tools, generation_prompt=False)
        end = len(through)
        if through != ids[:end] or start > end:
            raise DataError(
                f"{where}: the chat template does not render turns as prefixes of the conversation, so responses "
                "cannot be masked; use format prompt_completion or set data.train_on_prompt: true"
            )
        span = ids[start:end]
        if not special.intersection(span):
            raise DataError(
                f"{where} message {turn + 1 - added}: the chat template ends an assistant turn with no special token, so the model would "
                "never learn to stop; use a template with an end-of-turn token (model.chat_template)"
            )
        for call in messages[turn].get("tool_calls") or []:
            if call["function"]["name"] not in tokenizer.decode(span):
                raise DataError(
                    f"{where} message {turn + 1 - added}: the chat template does not render tool calls (`{call['function']['name']}` is missing "
                    "from the trained text); set model.chat_template to a template with tools (e.g. data/tools/chatml-tools.jinja)"
                )
        labels[start:end] = span
    return ids, labels


def last_answer(messages: list[dict]) -> Optional[int]:
    """Index of the last assistant message (the reference answer of generation metrics)."""
    return max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
