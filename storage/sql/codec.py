"""Conversions between records and rows: parameters going in, records coming out.

Kept apart from the statements so the hot path's per-row work is plain attribute access and tuple
unpacking, in one place. JSON columns arrive already decoded (see `storage.sql.types.JsonDocument`);
only the step history needs turning back into `StepRecord`s, with ``datetime.fromisoformat`` for the
timestamps orjson wrote as RFC 3339 text.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from storage.records import (
    ExecutionRecord,
    OutboxClaim,
    OutboxMessage,
    OutboxRecord,
    ReplyRecord,
    StepRecord,
)
from storage.status import SagaStatus

__all__ = [
    "as_uuid",
    "execution_from_row",
    "insert_params",
    "outbox_arrays",
    "outbox_from_row",
    "outbox_params",
    "reply_from_row",
    "reply_params",
    "save_params",
    "steps_from_json",
]

_fromiso = datetime.fromisoformat


def as_uuid(value: Any) -> uuid.UUID:
    # asyncpg returns its own UUID subclass; normalise so records compare and hash like the caller's.
    return value if type(value) is uuid.UUID else uuid.UUID(str(value))


def steps_from_json(steps: Sequence[Mapping[str, Any]] | None) -> tuple[StepRecord, ...]:
    """Rebuild the step history from its JSON form."""
    if not steps:
        return ()
    return tuple(
        StepRecord(
            name=s["name"],
            kind=s["kind"],
            phase=s["phase"],
            status=s["status"],
            attempts=s["attempts"],
            started_at=_fromiso(s["started_at"]),
            finished_at=None if s.get("finished_at") is None else _fromiso(s["finished_at"]),
            request_id=None if s.get("request_id") is None else uuid.UUID(s["request_id"]),
            error=s.get("error"),
        )
        for s in steps
    )


def execution_from_row(row: Sequence[Any]) -> ExecutionRecord:
    """Build a record from a row selected with every column of ``saga_executions``, in table order."""
    (
        id_,
        name,
        definition_version,
        status,
        state,
        steps,
        version,
        recovery_attempts,
        idempotency_key,
        user,
        reply_deadline,
        owner,
        lease_until,
        error,
        created_at,
        updated_at,
        awaiting_request,
    ) = row
    return ExecutionRecord(
        id=as_uuid(id_),
        name=name,
        definition_version=definition_version,
        status=SagaStatus(status),
        state=bytes(state),
        steps=steps_from_json(steps),
        version=version,
        recovery_attempts=recovery_attempts,
        idempotency_key=idempotency_key,
        user=user,
        reply_deadline=reply_deadline,
        owner=owner,
        lease_until=lease_until,
        error=error,
        created_at=created_at,
        updated_at=updated_at,
        awaiting_request=None if awaiting_request is None else as_uuid(awaiting_request),
    )


def save_params(record: ExecutionRecord) -> dict[str, Any]:
    """Parameters of the optimistic ``UPDATE`` (the columns `save` may change, plus id and version).

    No owner means no lease either: a save that drops the claim clears both.
    """
    owner = record.owner
    return {
        "p_id": record.id,
        "p_version": record.version,
        "p_status": SagaStatus(record.status).value,
        "p_state": record.state,
        "p_steps": record.steps,
        "p_recovery_attempts": record.recovery_attempts,
        "p_user": record.user,
        "p_reply_deadline": record.reply_deadline,
        "p_error": record.error,
        "p_owner": owner,
        "p_lease_until": None if owner is None else record.lease_until,
        "p_awaiting_request": record.awaiting_request,
    }


def insert_params(record: ExecutionRecord) -> dict[str, Any]:
    """Parameters of the ``INSERT`` of a new execution."""
    params = save_params(record)
    del params["p_version"]
    params["p_name"] = record.name
    params["p_definition_version"] = record.definition_version
    params["p_idempotency_key"] = record.idempotency_key
    params["p_lease_until"] = record.lease_until
    return params


def outbox_claims(
    outbox: Sequence[OutboxMessage], claim: OutboxClaim | None
) -> tuple[list[str | None], list[float | None]]:
    """Each row's claim owner and the seconds from now its ``claimed_until`` lies (``None``: no claim).

    A claimed write claims its rows for the claim's lease; a delayed row (a retry's backoff) is written
    unclaimed but not due before its delay has passed (``claimed_until`` is also "not before").
    """
    owners: list[str | None] = []
    leases: list[float | None] = []
    for m in outbox:
        if m.delay is not None:
            owners.append(None)
            leases.append(m.delay)
        elif claim is None:
            owners.append(None)
            leases.append(None)
        else:
            owners.append(claim.owner)
            leases.append(claim.lease_seconds)
    return owners, leases


def outbox_params(execution_id: uuid.UUID, outbox: Sequence[OutboxMessage]) -> list[dict[str, Any]]:
    """One parameter set per outbox row (an executemany), claim columns left to the caller."""
    return [
        {
            "p_execution_id": execution_id,
            "p_topic": m.topic,
            "p_key": m.key,
            "p_value": m.value,
            "p_headers": m.headers,
            "p_request_id": m.request_id,
        }
        for m in outbox
    ]


def outbox_arrays(outbox: Sequence[OutboxMessage], claim: OutboxClaim | None) -> dict[str, Any]:
    """The rows as one array per column, for the one-statement writes (`storage.sql.combined`)."""
    owners, leases = outbox_claims(outbox, claim)
    return {
        "p_outbox_topics": [m.topic for m in outbox],
        "p_outbox_keys": [m.key for m in outbox],
        "p_outbox_values": [m.value for m in outbox],
        "p_outbox_headers": [m.headers for m in outbox],
        "p_outbox_request_ids": [m.request_id for m in outbox],
        "p_outbox_owners": owners,
        "p_outbox_leases": [None if s is None else timedelta(seconds=s) for s in leases],
    }


def outbox_from_row(row: Sequence[Any]) -> OutboxRecord:
    """An outbox row as returned by the relay's claiming ``UPDATE``."""
    id_, execution_id, topic, key, value, headers, created_at, request_id, attempts = row
    return OutboxRecord(
        id=id_,
        execution_id=as_uuid(execution_id),
        topic=topic,
        key=None if key is None else bytes(key),
        value=bytes(value),
        headers=dict(headers),
        created_at=created_at,
        request_id=None if request_id is None else as_uuid(request_id),
        attempts=attempts,
    )


def reply_params(reply: ReplyRecord, prefix: str = "p_") -> dict[str, Any]:
    """Parameters of the reply ``INSERT`` (storage sets ``received_at`` when the reply has none).

    ``prefix`` keeps them apart from the execution's own (``status``) where both are in one statement.
    """
    return {
        f"{prefix}execution_id": reply.execution_id,
        f"{prefix}request_id": reply.request_id,
        f"{prefix}status": reply.status,
        f"{prefix}outcome": reply.outcome,
        f"{prefix}reason": reply.reason,
        f"{prefix}received_at": reply.received_at,
    }


def reply_from_row(row: Sequence[Any]) -> ReplyRecord:
    """A stored reply."""
    execution_id, request_id, status, outcome, reason, received_at = row
    return ReplyRecord(
        execution_id=as_uuid(execution_id),
        request_id=as_uuid(request_id),
        status=status,
        outcome=outcome,
        reason=reason,
        received_at=received_at,
    )
