"""Observability: Prometheus metrics, OpenTelemetry tracing and structured logs.

Imported lazily: ``import saga.observability`` loads neither prometheus-client nor OpenTelemetry; each name
loads its module on first use, and tracing needs the ``kafka-saga[otel]`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saga.observability.metrics import SagaMetrics, combine_hooks

__all__ = ["SagaMetrics", "combine_hooks"]


def __getattr__(name: str) -> Any:
    if name in ("SagaMetrics", "combine_hooks"):
        from saga.observability import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
