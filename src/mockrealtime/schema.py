"""Build a small valid instance of a JSON Schema, for the fake model's function calls.

Covers what tool definitions use in practice: object/array/string/number/integer/
boolean/null, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf`` (first branch),
bounds and ``required``. Deterministic for a given ``random.Random``.
"""

from __future__ import annotations

import random
from typing import Any, Final

_WORDS: Final = ("paris", "blue", "lighthouse", "cat", "tuesday", "seven", "river", "tea")
_MAX_DEPTH: Final = 8


def instance_of(schema: Any, rng: random.Random, _depth: int = 0) -> Any:
    """Return a JSON value that validates against ``schema`` (a dict; ``{}`` means any)."""
    if not isinstance(schema, dict) or _depth > _MAX_DEPTH:
        return None if _depth > _MAX_DEPTH else "value"
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][rng.randrange(len(schema["enum"]))]
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return instance_of(branches[0], rng, _depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        return {name: instance_of(sub, rng, _depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1) or 0), 1)
        count = min(count, int(schema.get("maxItems", count)))
        return [instance_of(schema.get("items", {}), rng, _depth + 1) for _ in range(count)]
    if kind == "integer":
        lo = int(schema.get("minimum", 0))
        hi = int(schema.get("maximum", lo + 10))
        return rng.randint(lo, max(lo, hi))
    if kind == "number":
        low = float(schema.get("minimum", 0.0))
        high = float(schema.get("maximum", low + 10.0))
        return round(rng.uniform(low, max(low, high)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    word = _WORDS[rng.randrange(len(_WORDS))]
    min_len = int(schema.get("minLength", 0))
    max_len = int(schema.get("maxLength", max(len(word), min_len)))
    word = (word * (min_len // len(word) + 1))[: max(min_len, min(len(word), max_len))]
    return word
