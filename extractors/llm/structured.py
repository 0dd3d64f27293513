"""Structured output: the schema sent to the server, parsing the reply, and the repair prompt."""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError

MALFORMED_JSON = "MALFORMED_JSON"
SCHEMA_INVALID = "SCHEMA_INVALID"

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def strict_json_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the form OpenAI's ``strict`` mode accepts (a fresh copy).

    Strict mode wants every property listed in ``required`` (optional ones stay nullable
    through their ``anyOf [..., null]``), ``additionalProperties: false`` on every object,
    and no ``default`` keywords. Pydantic still validates the reply against the original model.
    """
    return copy.deepcopy(_strict_json_schema(schema))


@lru_cache(maxsize=64)  # schema generation costs ~1 ms a call; the result never changes for a class
def _strict_json_schema(schema: type[BaseModel]) -> dict[str, Any]:
    root = copy.deepcopy(schema.model_json_schema())

    def fix(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                fix(item)
            return
        if not isinstance(node, dict):
            return
        node.pop("default", None)
        if node.get("type") == "object" and isinstance(node.get("properties"), dict):
            node["required"] = list(node["properties"])
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in ("properties", "$defs") and isinstance(value, dict):
                for sub in value.values():  # a map of schemas: its keys are names, not keywords
                    fix(sub)
            else:
                fix(value)

    fix(root)
    return root


@lru_cache(maxsize=128)
def json_schema_response_format(schema: type[BaseModel], strict: bool) -> dict[str, Any]:
    """Cached and shared between calls: it is only serialised, never mutated."""
    body = _strict_json_schema(schema) if strict else schema.model_json_schema()
    return {"type": "json_schema", "json_schema": {"name": schema.__name__, "schema": body, "strict": strict}}


@lru_cache(maxsize=64)
def _schema_text(schema: type[BaseModel]) -> str:
    return json.dumps(schema.model_json_schema(), separators=(",", ":"))


def json_mode_instruction(schema: type[BaseModel]) -> dict[str, str]:
    """System message added in JSON mode, where the server does not see the schema.

    It also satisfies OpenAI's rule that a json_object request mention JSON in its messages.
    """
    text = (
        "Reply with exactly one JSON object, and nothing else, that validates against this JSON Schema:\n"
        + _schema_text(schema)
    )
    return {"role": "system", "content": text}


def strip_code_fence(text: str) -> str:
    """Models in JSON mode sometimes wrap the object in a ```json fence; accept that."""
    m = _FENCE.match(text.strip())
    return m.group(1) if m else text.strip()


def parse_structured(text: str | None, schema: type[BaseModel]) -> tuple[BaseModel | None, str | None, str | None]:
    """(parsed, error_code, detail): parsed is set when the reply is JSON that fits the schema."""
    body = strip_code_fence(text or "")
    if not body:
        return None, MALFORMED_JSON, "the reply was empty"
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return None, MALFORMED_JSON, f"the reply is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    try:
        return schema.model_validate(data), None, None
    except ValidationError as e:
        return None, SCHEMA_INVALID, validation_summary(e)


def validation_summary(error: ValidationError, limit: int = 20) -> str:
    """Pydantic errors as short 'path: message' lines (no input values: they can be long)."""
    lines = []
    for item in error.errors(include_url=False, include_input=False)[:limit]:
        path = ".".join(str(p) for p in item["loc"]) or "(root)"
        lines.append(f"{path}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        lines.append(f"... and {more} more errors")
    return "the reply does not match the schema:\n" + "\n".join(lines)


def repair_message(detail: str) -> dict[str, str]:
    """The one follow-up turn that sends the parse/validation error back to the model."""
    return {
        "role": "user",
        "content": (
            "Your previous reply could not be used because "
            + detail
            + "\nReply again with only the corrected JSON object: no prose, no code fences."
        ),
    }
