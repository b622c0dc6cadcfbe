"""`SagaRegistry`: definitions by ``(name, version)``.

Stored executions name their definition; the registry is the only way back from that name to code. Nothing
is ever imported from a name found in a message or a database row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from saga.definitions import Saga
from saga.errors import SagaDefinitionError, UnknownSagaDefinitionError
from saga.steps import not_a_saga

__all__ = ["SagaRegistry"]


class SagaRegistry:
    """Committed saga definitions, keyed by ``(name, version)``."""

    def __init__(self) -> None:
        self._definitions: dict[tuple[str, int], Saga] = {}

    def register(self, saga: Saga, *, name: str | None = None) -> Saga:
        """Add ``saga`` (naming it if needed) and return the definition registered under its key.

        A nameless saga takes ``name``, or a stable name derived from its step names; a nameless saga
        built the same way as one already registered (`Saga.same_definition`) is that definition, so two
        equal Minos-style ``Saga()`` definitions share one registration and the first is returned.
        Registering the same object twice is a no-op.

        Raises:
            SagaNotCommittedException: The saga is not committed (``Saga("x")`` followed by statements
                ``S.local_step(f)`` needs a final ``S.commit()``).
            SagaDefinitionError: ``saga`` is not a Saga (a step of an unfinished chain, say), another
                definition holds ``(name, version)``, or ``name`` contradicts the saga's own name.
        """
        if not isinstance(saga, Saga):
            raise SagaDefinitionError(f"expected a Saga, got {not_a_saga(saga)}")
        if not saga.committed:
            saga.validate()  # an incomplete step is the more useful error
        derived = name is None and saga.name is None
        if name is not None:
            saga._set_name(name)
        key = (saga.name or saga.derived_name(), saga.version)
        existing = self._definitions.get(key)
        if existing is not None and existing is not saga:
            if derived and existing.same_definition(saga):
                return existing  # left nameless: it stays a copy of the registered one
            hint = " (give it another name with register(saga, name=...))" if derived else ""
            raise SagaDefinitionError(
                f"saga {saga.name!r} version {saga.version} is already registered with another "
                f"definition{hint}"
            )
        if saga.name is None:
            saga._set_name(key[0])
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
