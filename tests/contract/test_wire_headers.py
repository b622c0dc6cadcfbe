"""Every header name the code writes or reads is in docs/protocol.md and docs/asyncapi.yaml, and the reverse.

The code's names are the ``H_*`` constants of every module of the ``saga`` package plus any header-like
string literal its source uses as a header (a header written without a constant is caught too).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import saga
from tests.contract import wire

#: A header-like literal used as a header: ``headers["x"]``, ``headers.get("x")`` or a ``"x":`` dict key
#: (task and logger names that look alike are none of these).
_LITERAL = re.compile(
    r"""(?:headers\[|headers\.get\()\s*["'](saga-[a-z]+(?:-[a-z]+)*|traceparent|tracestate)["']"""
    r"""|["'](saga-[a-z]+(?:-[a-z]+)*|traceparent|tracestate)["']\s*:"""
)


def code_header_names() -> set[str]:
    names: set[str] = set()
    for info in pkgutil.walk_packages(saga.__path__, "saga."):
        if info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for attribute, value in vars(module).items():
            if attribute.startswith("H_") and isinstance(value, str):
                names.add(value)
    for path in Path(saga.__path__[0]).rglob("*.py"):
        for match in _LITERAL.finditer(path.read_text()):
            names.add(match.group(1) or match.group(2))
    assert all(wire.HEADER_NAME.match(name) for name in names), sorted(names)
    return names


def test_code_headers_are_all_documented_and_documented_headers_all_exist() -> None:
    code = code_header_names()
    protocol = wire.protocol_header_names()
    asyncapi = wire.asyncapi_header_names()
    assert code - protocol == set(), "used by the code, missing from docs/protocol.md"
    assert code - asyncapi == set(), "used by the code, missing from docs/asyncapi.yaml"
    assert protocol - code == set(), "in docs/protocol.md, unknown to the code"
    assert asyncapi - code == set(), "in docs/asyncapi.yaml, unknown to the code"


def test_the_header_list_is_what_the_protocol_defines() -> None:
    # Guards the scan itself: a regex that matched nothing would make the test above pass vacuously.
    assert {
        "saga-protocol-version",
        "saga-kind",
        "saga-execution-id",
        "saga-request-id",
        "saga-reply-topic",
        "saga-idempotency-key",
        "saga-user",
        "saga-name",
        "saga-step",
        "saga-phase",
        "saga-status",
        "saga-service",
        "traceparent",
        "tracestate",
        "saga-dead-letter-reason",
        "saga-dead-letter-code",
        "saga-dead-letter-topic",
    } == code_header_names()
