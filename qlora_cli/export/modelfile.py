"""The Ollama Modelfile beside a GGUF: `FROM` the file, `TEMPLATE` the chat template in Ollama's
Go-template form, `PARAMETER stop` for every end-of-turn token.

The Go template is derived from the tokenizer's own Jinja template, not from a table of families:
rendering conversations whose contents are sentinels gives each role's prefix and suffix, the
generation prompt, a default system turn (SmolLM2 adds one) and the text before the first turn.
The result is rendered again here (a renderer for the small Go-template subset we emit) on sample
conversations (system, multi-turn, code, unicode) and must equal transformers' rendering; when
it does not (a template that trims or reorders contents), no TEMPLATE is written and the report
says so, and Ollama falls back to the GGUF's own chat template.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from qlora_cli.export.probe_texts import CONVERSATIONS

NAME = "Modelfile"
_SENTINELS = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "user2": "\x01US2\x01", "assistant": "\x01AST\x01"}


def _render(tokenizer, messages, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, before: Optional[str], after: Optional[str]) -> str:
    start = 0 if before is None else text.index(before) + len(before)
    end = len(text) if after is None else text.index(after, start)
    return text[start:end]


def bos_prefix(tokenizer) -> str:
    """The BOS text llama.cpp puts before a prompt by itself (the tokenizer adds BOS), which a
    Go template must then leave out (Ollama's own Llama 3 template has no <|begin_of_text|>)."""
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else ""


def template_parts(tokenizer) -> dict:
    """Each role's prefix and suffix, the generation prompt, the default system turn, the text
    before the first turn: from renders whose contents are sentinels."""
    s, u, u2, a = (_SENTINELS[key] for key in ("system", "user", "user2", "assistant"))
    user, assistant = {"role": "user", "content": u}, {"role": "assistant", "content": a}
    single = _render(tokenizer, [user], False)
    pair = _render(tokenizer, [user, assistant], False)
    turns = _render(tokenizer, [user, assistant, {"role": "user", "content": u2}], True)
    bos = tokenizer.bos_token or ""
    start = bos if bos and single.startswith(bos) and "bos_token" in (tokenizer.chat_template or "") else ""
    parts = {"start": start.removeprefix(bos_prefix(tokenizer))}
    parts["user_suffix"] = _between(single, u, None)
    parts["assistant_suffix"] = _between(pair, a, None)
    parts["user_prefix"] = _between(turns, a, u2)[len(parts["assistant_suffix"]):]
    parts["assistant_prefix"] = _between(turns, u, a)[len(parts["user_suffix"]):]
    parts["generation"] = _between(turns, u2, None)[len(parts["user_suffix"]):]
    head = _between(single, None, u)
    parts["default_system"] = head[len(start):len(head) - len(parts["user_prefix"])]
    try:
        with_system = _render(tokenizer, [{"role": "system", "content": s}, user], False)
    except Exception:  # noqa: BLE001 - a Jinja template may raise on a role it does not accept (Gemma: no system)
        with_system = None
    if with_system is not None:
        parts["system_prefix"] = _between(with_system, None, s)[len(start):]
        parts["system_suffix"] = _between(with_system, s, u)[:-len(parts["user_prefix"]) or None]
    return parts


def _go_literal(text: str) -> str:
    if "{{" in text or "}}" in text or '"""' in text:
        raise ValueError("template text holds Go-template or Modelfile delimiters")
    return text


def go_template(parts: dict) -> str:
    """The Go template (Ollama's `.Messages` form) that lays out the turns as `parts` describes."""
    lit = {key: _go_literal(value) for key, value in parts.items()}
    branches = []
    if "system_prefix" in lit:
        branches.append(f'{{{{ if eq .Role "system" }}}}{lit["system_prefix"]}{{{{ .Content }}}}{lit["system_suffix"]}')
    keyword = "else if" if branches else "if"
    branches.append(f'{{{{ {keyword} eq .Role "user" }}}}{lit["user_prefix"]}{{{{ .Content }}}}{lit["user_suffix"]}')
    branches.append(f'{{{{ else if eq .Role "assistant" }}}}{lit["assistant_prefix"]}{{{{ .Content }}}}{lit["assistant_suffix"]}')
    default = ""
    if lit["default_system"]:
        default = f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{lit["default_system"]}{{{{ end }}}}'
    return f'{lit["start"]}{default}{{{{ range .Messages }}}}{"".join(branches)}{{{{ end }}}}{{{{ end }}}}{lit["generation"]}'


_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def render_go(template: str, messages: list[dict]) -> str:
    """Render the subset of Go's text/template that go_template emits: literal text, `range
    .Messages`, `if` / `else if` on `eq .Role "x"` and on the default-system condition, `.Content`,
    `end`. Anything else is a ValueError (so a template outside the subset never passes)."""
    tokens = []
    position = 0
    for match in _ACTION.finditer(template):
        tokens.append(("text", template[position:match.start()]))
        tokens.append(("action", match.group(1).strip()))
        position = match.end()
    tokens.append(("text", template[position:]))

    def condition(expression: str, message: Optional[dict]) -> bool:
        role = re.fullmatch(r'eq \.Role "(\w+)"', expression)
        if role:
            return message is not None and message["role"] == role.group(1)
        if expression == 'or (not .Messages) (ne (index .Messages 0).Role "system")':
            return not messages or messages[0]["role"] != "system"
        raise ValueError(f"unsupported Go-template condition {expression!r}")

    def run(index: int, message: Optional[dict], out: list[str], active: bool) -> int:
        """Render tokens from `index` until an unmatched `end` / `else`; returns where it stopped."""
        while index < len(tokens):
            kind, value = tokens[index]
            if kind == "text":
                if active:
                    out.append(value)
                index += 1
            elif value == ".Content":
                if active:
                    out.append(message["content"])
                index += 1
            elif value == "range .Messages":
                body_end = index + 1
                for item in messages if active else []:
                    body_end = run(index + 1, item, out, True)
                if not (active and messages):
                    body_end = run(index + 1, None, [], False)
                index = body_end + 1  # past its `end`
            elif value.startswith("if "):
                taken = active and condition(value[3:], message)
                index = run(index + 1, message, out, taken)
                done = taken
                while tokens[index][0] == "action" and tokens[index][1].startswith("else"):
                    rest = tokens[index][1][4:].strip()
                    branch = active and not done and (rest == "" or condition(rest.removeprefix("if "), message))
                    index = run(index + 1, message, out, branch)
                    done = done or branch
                index += 1  # past `end`
            elif value == "end" or value.startswith("else"):
                return index
            else:
                raise ValueError(f"unsupported Go-template action {value!r}")
        return index

    out: list[str] = []
    if run(0, None, out, True) != len(tokens):
        raise ValueError("unbalanced Go template")
    return "".join(out)


def stop_strings(tokenizer, generation_config) -> list[str]:
    """The end-of-turn tokens as text: the tokenizer's EOS and the generation config's stop ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured])
    return sorted({tokenizer.convert_ids_to_tokens(token) for token in ids if token is not None})


def compare(tokenizer, template: str) -> tuple[int, int, Optional[str]]:
    """(conversations rendered equal, compared, the first that differs)."""
    compared = [c for c in CONVERSATIONS if c[-1]["role"] == "user"]
    equal, first = 0, None
    for conversation in compared:
        try:
            expected = _render(tokenizer, conversation, True)
        except Exception:  # noqa: BLE001 - the Jinja template refuses this conversation (e.g. a system turn)
            compared = [c for c in compared if c is not conversation]
            continue
        if bos_prefix(tokenizer) + render_go(template, conversation) == expected:
            equal += 1
        elif first is None:
            first = expected[:200]
    return equal, len(compared), first


def write_modelfile(folder: Path, gguf_name: str, tokenizer, generation_config, adapter: Optional[str] = None) -> dict:
    """Write folder/Modelfile for `gguf_name` (and a LoRA GGUF `adapter`); returns what went in and
    how the template compared."""
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [""]
    report: dict = {"file": NAME, "template": None, "stop": stop_strings(tokenizer, generation_config)}
    if getattr(tokenizer, "chat_template", None):
        try:
            template = go_template(template_parts(tokenizer))
            equal, compared, first = compare(tokenizer, template)
        except (ValueError, KeyError, IndexError) as exc:
            template, equal, compared, first = None, 0, 0, f"cannot derive a Go template: {exc}"
        report.update(conversations_equal=equal, conversations=compared)
        if template is not None and compared and equal == compared:
            lines += [f'TEMPLATE """{template}"""', ""]
            report["template"] = template
        else:
            report["template_skipped"] = f"the Go template does not reproduce the chat template ({first!r}); Ollama uses the GGUF's own"
    lines += [f'PARAMETER stop "{stop}"' for stop in report["stop"]]
    (folder / NAME).write_text("\n".join(lines) + "\n")
    return report
