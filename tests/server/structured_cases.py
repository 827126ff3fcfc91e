"""Fifty varied JSON Schemas (nested objects, arrays, enums, required and optional fields, numbers with
bounds), each with a prompt that asks for it: the cases of the structured-output tests and benchmark."""

from __future__ import annotations

import json
import random

_SUBJECTS = [
    ("person", {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    ("book", {"title": {"type": "string"}, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}}),
    ("city", {"name": {"type": "string"}, "population": {"type": "integer", "minimum": 0}}),
    ("recipe", {"dish": {"type": "string"}, "minutes": {"type": "integer", "minimum": 1, "maximum": 600}}),
    ("planet", {"name": {"type": "string"}, "moons": {"type": "integer", "minimum": 0, "maximum": 200}}),
    ("movie", {"title": {"type": "string"}, "rating": {"type": "number", "minimum": 0, "maximum": 10}}),
    ("product", {"name": {"type": "string"}, "price": {"type": "number", "minimum": 0}}),
    ("animal", {"species": {"type": "string"}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}}),
    ("song", {"title": {"type": "string"}, "artist": {"type": "string"}}),
    ("country", {"name": {"type": "string"}, "capital": {"type": "string"}}),
]
_ENUMS = [
    ("color", ["red", "green", "blue"]),
    ("size", ["small", "medium", "large"]),
    ("status", ["active", "inactive"]),
    ("genre", ["fiction", "science", "history", "poetry"]),
    ("mood", ["happy", "sad", "neutral"]),
]
_EXTRAS = [
    ("tags", {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4}),
    ("scores", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 5}),
    ("available", {"type": "boolean"}),
    ("address", {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["street", "zip"], "additionalProperties": False}),
    ("owner", {"type": "object", "properties": {"name": {"type": "string"},
                                                "contact": {"type": "object", "properties": {"email": {"type": "string"}},
                                                            "required": ["email"]}},
               "required": ["name", "contact"]}),
    ("items", {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string"}},
                                          "required": ["id", "label"], "additionalProperties": False},
               "minItems": 1, "maxItems": 3}),
    ("note", {"type": ["string", "null"]}),
]


def _bounded(schema: dict, max_length: int) -> dict:
    """Every free string (no enum, pattern or bound) gets a maxLength: a 135M model greedily decoding a
    free string can repeat itself until max_tokens, which no grammar can prevent."""
    schema = dict(schema)
    if schema.get("type") in ("string", ["string", "null"]) and not {"enum", "pattern", "maxLength"} & set(schema):
        schema["maxLength"] = max_length
    if "properties" in schema:
        schema["properties"] = _bounded_properties(schema["properties"], max_length)
    if "items" in schema:
        schema["items"] = _bounded(schema["items"], max_length)
    return schema


def _bounded_properties(properties: dict, max_length: int) -> dict:
    return {name: _bounded(schema, max_length) for name, schema in properties.items()}


def schema_cases(count: int = 50, seed: int = 0, max_string_length: int | None = 40) -> list[tuple[dict, str]]:
    """(schema, user prompt) pairs, the same every run; free strings at most `max_string_length`
    characters (None: unbounded)."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        subject, base = _SUBJECTS[index % len(_SUBJECTS)]
        properties = dict(base)
        enum_name, values = _ENUMS[rng.randrange(len(_ENUMS))]
        if index % 3 != 2:
            properties[enum_name] = {"type": "string", "enum": values}
        for name, extra in rng.sample(_EXTRAS, k=1 + index % 3):
            properties[name] = extra
        names = list(properties)
        required = names if index % 2 == 0 else names[: max(1, len(names) - 1)]
        if max_string_length is not None:
            properties = _bounded_properties(properties, max_string_length)
        schema = {"type": "object", "properties": properties, "required": required}
        if index % 4 != 3:
            schema["additionalProperties"] = False
        if index % 5 == 4:  # the object inside another
            schema = {"type": "object", "properties": {subject: schema, "source": {"type": "string", "enum": ["web", "book"]}},
                      "required": [subject, "source"], "additionalProperties": False}
        prompt = (f"Describe a {subject} as a JSON object that follows this JSON Schema, and reply with the JSON only.\n"
                  f"Schema: {json.dumps(schema)}")
        cases.append((schema, prompt))
    return cases


def first_json_value(text: str):
    """The first JSON object in a reply (models often wrap it in prose or a ``` fence), or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            continue
    return None
