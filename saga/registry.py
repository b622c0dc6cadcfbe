"""`SagaRegistry`: definitions by ``(name, version)``.

Stored executions name their definition; the registry is the only way back from that name to code. Nothing
is ever imported from a name found in a message or a database row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from saga.definitions import Saga
from saga.errors import SagaDefinitionError, UnknownSagaDefinitionError

__all__ = ["SagaRegistry"]


class SagaRegistry:
    """Committed saga definitions, keyed by ``(name, version)``."""

    def __init__(self) -> None:
        self._definitions: dict[tuple[str, int], Saga] = {}

    def register(self, saga: Saga, *, name: str | None = None) -> Saga:
        """Add ``saga`` (naming and committing it if needed) and return it.

        A nameless saga takes ``name``, or a stable name derived from its step names. Registering the same
        object twice is a no-op.

        Raises:
            SagaDefinitionError: Another definition holds ``(name, version)``, ``name`` contradicts the
                saga's own name, or the definition is invalid.
        """
        if not isinstance(saga, Saga):
            raise SagaDefinitionError(f"expected a Saga, got {saga!r}")
        if name is not None:
            saga._set_name(name)
        if not saga.committed:
            saga.commit()
        if saga.name is None:
            saga._set_name(saga.derived_name())
        assert saga.name is not None
        key = (saga.name, saga.version)
        existing = self._definitions.get(key)
        if existing is not None and existing is not saga:
            raise SagaDefinitionError(
                f"saga {saga.name!r} version {saga.version} is already registered with another definition"
            )
        self._definitions[key] = saga
        return saga

    def get(self, name: str, version: int, *, execution_id: uuid.UUID | None = None) -> Saga:
        """The definition registered as ``(name, version)``.

        Raises:
            UnknownSagaDefinitionError: Nothing is registered under that key.
        """
        try:
            return self._definitions[(name, version)]
        except KeyError:
            raise UnknownSagaDefinitionError(name, version, execution_id=execution_id) from None

    def __contains__(self, key: object) -> bool:
        return key in self._definitions

    def __iter__(self) -> Iterator[Saga]:
        return iter(list(self._definitions.values()))

    def __len__(self) -> int:
        return len(self._definitions)

    def keys(self) -> list[tuple[str, int]]:
        """Registered ``(name, version)`` pairs, in registration order."""
        return list(self._definitions)
