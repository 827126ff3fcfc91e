"""Structured outputs: a request's GrammarSpec as an llguidance grammar, and its validation.

The grammar engine is llguidance (MIT; a Rust library with no Python dependencies; it computes a
token mask in tens of microseconds on a CPU, from a lexer and an Earley parser over the tokenizer's
token trie). xgrammar (Apache-2.0) was the other candidate; its wheel pulls in triton and
apache-tvm-ffi, and it brings nothing more for the grammars served here.

The HTTP edge validates a spec with `grammar_error` (no tokenizer needed, milliseconds); the worker
that samples compiles it against the model's tokenizer (hexcore/worker/grammar.py).

JSON is generated in one fixed layout, `{"a": 1, "b": [2, 3]}`: no free whitespace (a small model
cannot loop on newlines) and the separators every tokenizer has seen most. A schema is followed as
written: an object schema without `additionalProperties` allows other properties, as JSON Schema says,
except in OpenAI's strict mode (`strict: true`), where objects are closed (`closed_objects`): OpenAI
requires `additionalProperties: false` on every object there; here a strict schema that leaves it out
gets it. Either way the output always follows the schema.
"""

from __future__ import annotations

import json

from hexcore.sampling_params import GrammarSpec

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar (its JSON form) that `spec` stands for. Raises ValueError on a source
    that is not even well-formed (a schema that is not a JSON object, choices that are not strings)."""
    from llguidance import LLMatcher

    if spec.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec.source, overrides=JSON_LAYOUT)
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, overrides=JSON_LAYOUT)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    if spec.kind == "lark":
        return LLMatcher.grammar_from_lark(spec.source)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def grammar_error(spec: GrammarSpec) -> str | None:
    """Why `spec` cannot be compiled (llguidance's message), or None when it can."""
    from llguidance import LLMatcher

    try:
        grammar = llguidance_grammar(spec)
    except (ValueError, TypeError) as err:
        return str(err)
    return LLMatcher.validate_grammar(grammar) or None


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "contains")


def closed_objects(schema):
    """The schema with `additionalProperties: false` on every object schema that does not say (strict
    mode). Objects under allOf are left open: closing each part of a conjunction would refuse them all."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and "allOf" not in schema \
            and "patternProperties" not in schema:
        schema["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            schema[key] = {name: closed_objects(sub) for name, sub in schema[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            schema[key] = [closed_objects(sub) for sub in schema[key]]
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict):
            schema[key] = closed_objects(schema[key])
    return schema


def json_schema_spec(schema: dict | bool) -> GrammarSpec:
    """A JSON Schema as a spec. Its keys keep their order: properties are generated in the order the
    schema lists them (as OpenAI does), so two orders are two grammars."""
    return GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))


def choice_spec(choices: list[str]) -> GrammarSpec:
    return GrammarSpec("choice", json.dumps(list(choices), ensure_ascii=False))
