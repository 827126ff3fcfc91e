"""Tool calling (OpenAI `tools` / `tool_choice`): how tools reach the prompt, which grammar enforces a
required or named call, and how the model's output becomes `tool_calls`.

Prompt: a chat template that takes `tools` (Hermes/Qwen, Llama 3.1+ templates do) gets them as they
are; for a template without tool support (SmolLM2's) they are written into the system prompt in the
Hermes format: the function signatures inside <tools></tools>, and the instruction to answer with
<tool_call>{"name": ..., "arguments": ...}</tool_call>.

Output formats parsed (`tool_format` picks one from the template):
- "hermes": <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated for parallel calls (also
  a JSON list inside one tag, as SmolLM2 writes); Hermes 2/3, Qwen 2/2.5/3, and our own rendering.
- "llama3_json": the whole reply is {"name": ..., "parameters": {...}} (or "arguments"), optionally
  after <|python_tag|>, several separated by ";"; Llama 3.1/3.2/3.3 JSON tool calling.

tool_choice "required" and a named function are enforced with a grammar, so the call is always valid
JSON for the function's parameters: a named call generates the arguments object alone (its schema is
the function's `parameters`); "required" generates a JSON list of {"name", "arguments"} objects, one
schema per function (at most one when parallel_tool_calls is false). "auto" parses whatever the model
wrote; "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.errors import bad_request

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ANY_OBJECT = {"type": "object"}

_HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_supports_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def tool_format(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, str) and (PYTHON_TAG in template or "ipython" in template) and TOOL_CALL_OPEN not in template:
        return LLAMA3_JSON
    return HERMES


def hermes_system_prompt(functions: list[dict]) -> str:
    return _HERMES_SYSTEM.format(tools="\n".join(json.dumps({"type": "function", "function": f}) for f in functions))


def hermes_call_text(name: str, arguments: str) -> str:
    """An earlier assistant tool call, written back into a conversation for a template without tools."""
    try:
        args = json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        args = arguments
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args})}\n{TOOL_CALL_CLOSE}"


# ---- grammars ------------------------------------------------------------------------------------


def named_call_schema(function: dict) -> dict:
    return function.get("parameters") or ANY_OBJECT


def required_calls_schema(functions: list[dict], parallel: bool) -> dict:
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [f["name"]]}, "arguments": named_call_schema(f)},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required_calls(text: str) -> list[ParsedCall]:
    """The output of a `required` call (a JSON list, as its grammar makes it)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [ParsedCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls
            if isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c]


# ---- parsing free output ("auto") ----------------------------------------------------------------


def _as_call(value, names: set[str]) -> ParsedCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(value["name"], json.dumps(args, ensure_ascii=False))


def _calls_in(value, names: set[str]) -> list[ParsedCall] | None:
    """A call or a list of calls; None if any of it is not a call to a known function."""
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, names) for item in items]
    return calls if calls and all(calls) else None


def tool_call_start(text: str, fmt: str) -> int | None:
    """Where a tool call starts in `text` (the reply so far), or None if none has started."""
    if fmt == LLAMA3_JSON:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(("{", "[", PYTHON_TAG)) else None
    index = text.find(TOOL_CALL_OPEN)
    return index if index >= 0 else None


def may_start_tool_call(text: str, fmt: str) -> int:
    """How many characters at the end of `text` could be the start of a tool call (held back while streaming)."""
    if fmt == LLAMA3_JSON:
        return len(text) if not text.strip() else 0
    for size in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0


def parse_tool_calls(text: str, fmt: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a reply. A reply whose calls do not parse, or name unknown functions, is all
    content and no calls."""
    start = tool_call_start(text, fmt)
    if start is None:
        return text, []
    content = text[:start] if text[:start].strip() else None
    rest = text[start:]
    decoder = json.JSONDecoder()
    calls: list[ParsedCall] = []
    if fmt == LLAMA3_JSON:
        body = rest.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].strip()
        position = 0
        while position < len(body):
            try:
                value, position = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return text, []
            found = _calls_in(value, names)
            if found is None:
                return text, []
            calls += found
            position = len(body) - len(body[position:].lstrip().lstrip(";").lstrip())
        return content, calls
    for block in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", rest, re.S):
        body = block.group(1).strip()
        try:
            value, end = decoder.raw_decode(body)
        except json.JSONDecodeError:
            return text, []
        found = _calls_in(value, names)
        if found is None or body[end:].strip():
            return text, []
        calls += found
    return content, calls


def check_tool_choice(tool_choice, functions: list[dict]) -> str | None:
    """The named function of a named tool_choice (None for the string choices); 400s for choices that
    cannot be honoured."""
    names = [f["name"] for f in functions]
    if isinstance(tool_choice, str):
        if tool_choice in ("required",) and not functions:
            raise bad_request('tool_choice "required" needs tools', "tool_choice")
        return None
    name = tool_choice.function.name
    if name not in names:
        raise bad_request(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return name
