"""The wire documents as test data: docs/asyncapi.yaml's schemas and the header names of both documents.

Shared by the wire contract tests and the conformance tests, so every check reads the same schemas.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI = ROOT / "docs" / "asyncapi.yaml"
PROTOCOL = ROOT / "docs" / "protocol.md"

#: A header name as both documents write it: ``saga-...`` or the two W3C trace headers.
HEADER_NAME = re.compile(r"^(saga-[a-z]+(?:-[a-z]+)*|traceparent|tracestate)$")
_BACKTICKED = re.compile(r"`(saga-[a-z]+(?:-[a-z]+)*|traceparent|tracestate)`")


@cache
def asyncapi() -> dict[str, Any]:
    """docs/asyncapi.yaml, parsed."""
    document: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text())
    return document


def _validator(pointer: str) -> Draft7Validator:
    """A validator for the schema at ``pointer`` (``#/components/...``), resolving refs in the document."""
    root = dict(asyncapi())
    root["$ref"] = pointer
    return Draft7Validator(root)


def _message(name: str) -> dict[str, Any]:
    message: dict[str, Any] = asyncapi()["components"]["messages"][name]
    return message


def header_validator(message: str) -> Draft7Validator:
    """Validates a `BrokerMessage.headers` mapping against message ``message``'s header schema."""
    return _validator(_message(message)["headers"]["$ref"])


def payload_validator(message: str) -> Draft7Validator:
    """Validates a decoded value against message ``message``'s payload schema."""
    return _validator(_message(message)["payload"]["$ref"])


def _schema(pointer: str) -> dict[str, Any]:
    node: Any = asyncapi()
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    result: dict[str, Any] = node
    return result


def declared_headers(message: str) -> set[str]:
    """The header names message ``message``'s schema declares (through ``allOf`` too)."""
    names: set[str] = set()
    pending = [_schema(_message(message)["headers"]["$ref"])]
    while pending:
        schema = pending.pop()
        if "$ref" in schema:
            pending.append(_schema(schema["$ref"]))
        names.update(schema.get("properties", {}))
        pending.extend(schema.get("allOf", []))
    return names


def asyncapi_header_names() -> set[str]:
    """Every header name any message of the AsyncAPI document declares."""
    names: set[str] = set()
    for message in asyncapi()["components"]["messages"]:
        names |= declared_headers(message)
    return names


def protocol_header_names() -> set[str]:
    """Every header name docs/protocol.md mentions (written as code, in backticks)."""
    return set(_BACKTICKED.findall(PROTOCOL.read_text()))


def dead_letter_codes() -> set[str]:
    """The dead-letter codes the AsyncAPI document lists."""
    schema = _schema("#/components/schemas/DeadLetterHeaders")
    return set(schema["properties"]["saga-dead-letter-code"]["enum"])


def problems(validator: Draft7Validator, instance: Any) -> list[str]:
    """The validation errors of ``instance``, each with its path, for an assertion message."""
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]
