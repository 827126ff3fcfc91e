"""Structured outputs at the HTTP edge: which grammar a request asks for (OpenAI's `response_format`,
vLLM's `structured_outputs` and `guided_*`), and its validation before anything reaches the engine: a
grammar that does not compile is a 400 naming the field that holds it."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from hexcore.grammar import choice_spec, closed_objects, grammar_error, json_schema_spec
from hexcore.sampling_params import MAX_LOGIT_BIAS, GrammarSpec
from server.errors import bad_request
from server.protocol import ResponseFormat, SamplingRequest

MAX_VALIDATED = 512  # validation results kept, by spec


def _json_schema(value: dict | bool | str, param: str, strict: bool = False) -> GrammarSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise bad_request(f"{param} is not valid JSON: {err}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"{param} must be a JSON Schema (an object)", param)
    return json_schema_spec(closed_objects(value) if strict else value)


def response_format_grammar(response_format: ResponseFormat | None, param: str = "response_format"
                            ) -> tuple[GrammarSpec, str] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema.schema_ is None:
        return GrammarSpec("json_object"), param
    json_schema = response_format.json_schema
    return _json_schema(json_schema.schema_, f"{param}.json_schema.schema", bool(json_schema.strict)), \
        f"{param}.json_schema.schema"


def requested_grammar(request: SamplingRequest, response_format: ResponseFormat | None = None
                      ) -> tuple[GrammarSpec, str] | None:
    """The one grammar `request` asks for and the parameter that holds it, or None; two ways of asking
    at once are a 400."""
    asked: list[tuple[GrammarSpec, str]] = []
    from_format = response_format_grammar(response_format)
    if from_format is not None:
        asked.append(from_format)
    structured = request.structured_outputs
    if structured is not None:
        fields = {"json": structured.json_, "regex": structured.regex, "choice": structured.choice,
                  "grammar": structured.grammar, "json_object": structured.json_object or None}
        for name, value in fields.items():
            if value is not None:
                asked.append((_spec(name, value, f"structured_outputs.{name}"), f"structured_outputs.{name}"))
    for name, value in (("json", request.guided_json), ("regex", request.guided_regex),
                        ("choice", request.guided_choice), ("grammar", request.guided_grammar)):
        if value is not None:
            asked.append((_spec(name, value, f"guided_{name}"), f"guided_{name}"))
    if len(asked) > 1:
        raise bad_request(f"ask for one kind of structured output at a time (got {', '.join(p for _, p in asked)})",
                          asked[1][1])
    return asked[0] if asked else None


def _spec(name: str, value: Any, param: str) -> GrammarSpec:
    if name == "json":
        return _json_schema(value, param)
    if name == "regex":
        return GrammarSpec("regex", value)
    if name == "choice":
        if not value or not all(choice for choice in value):
            raise bad_request(f"{param} must be a non-empty list of non-empty strings", param)
        return choice_spec(value)
    if name == "grammar":
        return GrammarSpec("lark", value)
    return GrammarSpec("json_object")


class GrammarValidator:
    """Compiles each new grammar once (no tokenizer needed: milliseconds) and remembers the verdict."""

    def __init__(self):
        self._verdicts: OrderedDict[GrammarSpec, str | None] = OrderedDict()

    def error(self, spec: GrammarSpec) -> str | None:
        if spec in self._verdicts:
            self._verdicts.move_to_end(spec)
            return self._verdicts[spec]
        verdict = self._verdicts[spec] = grammar_error(spec)
        while len(self._verdicts) > MAX_VALIDATED:
            self._verdicts.popitem(last=False)
        return verdict

    def check(self, spec: GrammarSpec, param: str) -> None:
        error = self.error(spec)
        if error is not None:
            what = {"json_schema": "JSON Schema", "regex": "regex", "lark": "grammar", "choice": "choice list"}
            raise bad_request(f"invalid {what.get(spec.kind, spec.kind)} in {param}: {error}", param)


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token ids as text) as pairs; an id out of the vocabulary or a value out of
    [-100, 100] is a 400 naming logit_bias."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (got {key!r})", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"token id {token_id} in 'logit_bias' is out of range: token ids must be in "
                              f"[0, {vocab_size})", "logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", "logit_bias")
        pairs.append((token_id, float(value)))
    return tuple(pairs)
