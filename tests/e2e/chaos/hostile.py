"""Malformed and misplaced records for the hostile-input suite, and what must become of each.

Every record carries a ``hostile-id`` header (unique) and a ``hostile-kind`` header, so it can be found
again in a dead-letter topic, whose copies keep the original headers and add
``saga-dead-letter-reason``. What must become of a record depends on its kind (`Fate`):

* ``dead_letter``: copied to the consumer's dead-letter topic with a reason that starts as given;
* ``recorded``: a well-formed reply the orchestrator cannot apply (a request it does not await, a copy of
  a reply already applied): recorded in ``saga_replies`` as ``stale`` or ``duplicate`` and ignored, as
  DESIGN §4 says (``applied`` at most once per request);
* ``dead_letter_or_recorded``: an unknown status sent to the request a saga awaits: dead-lettered
  (``unknown_status``) if the saga still awaits it when it arrives, else recorded as ignored; never
  applied;
* ``answered``: a redelivered command: answered from the participant's dedup store, its handler not run
  again (the effect counts of the e2e checks prove it);
* ``reply_dead_lettered``: a well-formed command for an execution that does not exist: the participant
  runs it (it cannot know), and the orchestrator dead-letters the reply as ``unknown execution``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Literal

import orjson

from saga.messages import H_EXECUTION_ID, H_IDEMPOTENCY_KEY, H_KIND, H_REPLY_TOPIC, H_REQUEST_ID, H_STATUS

H_HOSTILE_ID = "hostile-id"
H_HOSTILE_KIND = "hostile-kind"

Fate = Literal["dead_letter", "recorded", "dead_letter_or_recorded", "answered", "reply_dead_lettered"]
Headers = list[tuple[str, bytes]]


@dataclass
class Bad:
    """One hostile record and what must become of it."""

    kind: str
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    fate: Fate
    reason: str = ""  # prefix of the dead-letter reason
    execution_id: uuid.UUID | None = None
    request_id: uuid.UUID | None = None
    outcomes: frozenset[str] = frozenset()  # acceptable saga_replies outcomes
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def wire_headers(self) -> Headers:
        return [*self.headers, (H_HOSTILE_ID, self.id.encode()), (H_HOSTILE_KIND, self.kind.encode())]


def _h(**values: str | bytes) -> Headers:
    names = {
        "kind": H_KIND,
        "execution": H_EXECUTION_ID,
        "request": H_REQUEST_ID,
        "status": H_STATUS,
        "reply_topic": H_REPLY_TOPIC,
        "key": H_IDEMPOTENCY_KEY,
    }
    return [(names[k], v if isinstance(v, bytes) else v.encode()) for k, v in values.items()]


def _uuid() -> str:
    return str(uuid.uuid4())


class Factory:
    """Builds the hostile records of one run (seeded, so a failing run can be replayed)."""

    def __init__(self, rng: random.Random, reply_topic: str, command_topic: str) -> None:
        self.rng = rng
        self.reply_topic = reply_topic
        self.command_topic = command_topic

    def junk(self, size: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, size))

    def bad_json(self) -> bytes:
        # The random tail starts with a byte no JSON text starts with, so it never parses by chance.
        return self.rng.choice([b"{", b"{'a': 1}", b"[1, 2,", b"NaN", b'{"a": }', b"\xff" + self.junk()])

    # -- reply topic ----------------------------------------------------------------------------------

    def reply_malformed(self) -> Bad:
        """Random bytes, bad JSON, missing or forged headers: dead-lettered as malformed."""
        valid = {"kind": "reply", "execution": _uuid(), "request": _uuid(), "status": "200"}
        choice = self.rng.randrange(9)
        if choice == 0:
            return self._reply("random_bytes", self.junk(), [], "malformed: saga-kind: header missing")
        if choice == 1:
            return self._reply("bad_json", self.bad_json(), _h(**valid), "malformed: value: invalid JSON")
        if choice in (2, 3, 4):
            missing = ("execution", "request", "status")[choice - 2]
            header = {"execution": H_EXECUTION_ID, "request": H_REQUEST_ID, "status": H_STATUS}[missing]
            headers = _h(**{k: v for k, v in valid.items() if k != missing})
            return self._reply(f"missing_{missing}", b"{}", headers, f"malformed: {header}: header missing")
        if choice == 5:
            headers = _h(**{**valid, "kind": "command"})
            return self._reply("forged_kind", b"{}", headers, "malformed: saga-kind: expected 'reply'")
        if choice == 6:
            headers = _h(**{**valid, "status": "OK"})
            return self._reply("forged_status", b"{}", headers, "malformed: saga-status: not an integer")
        if choice == 7:
            headers = _h(**{**valid, "execution": "1; DROP TABLE saga_executions"})
            return self._reply("forged_uuid", b"{}", headers, "malformed: saga-execution-id: not a UUID")
        headers = _h(**{**valid, "request": b"\xff\xfe\xfa"})
        return self._reply(
            "non_utf8_header", b"{}", headers, "malformed: saga-request-id: header value is not valid UTF-8"
        )

    def _reply(self, kind: str, value: bytes, headers: Headers, reason: str) -> Bad:
        key = self.rng.choice([None, self.junk(16), _uuid().encode()])
        return Bad(f"reply_{kind}", self.reply_topic, key, value, headers, "dead_letter", reason)

    def reply_unknown_execution(self) -> Bad:
        execution = _uuid()
        headers = _h(kind="reply", execution=execution, request=_uuid(), status="200")
        return Bad(
            "reply_unknown_execution",
            self.reply_topic,
            execution.encode(),
            orjson.dumps({"charge": "forged"}),
            headers,
            "dead_letter",
            f"unknown execution {execution}",
        )

    def reply_stale(self, execution_id: uuid.UUID, status: int = 200) -> Bad:
        """A well-formed reply to a request the saga never sent (an old or forged request id)."""
        request = uuid.uuid4()
        headers = _h(kind="reply", execution=str(execution_id), request=str(request), status=str(status))
        return Bad(
            "reply_stale" if status == 200 else "reply_stale_unknown_status",
            self.reply_topic,
            str(execution_id).encode(),
            orjson.dumps({"reservation": "forged", "charge": "forged"}),
            headers,
            "recorded",
            execution_id=execution_id,
            request_id=request,
            outcomes=frozenset({"stale"}),
        )

    def reply_unknown_status(self, execution_id: uuid.UUID, request_id: uuid.UUID) -> Bad:
        """Status 299 for the request the saga awaits (as read from its stored state a moment ago)."""
        headers = _h(kind="reply", execution=str(execution_id), request=str(request_id), status="299")
        return Bad(
            "reply_unknown_status",
            self.reply_topic,
            str(execution_id).encode(),
            orjson.dumps({"charge": "not really"}),
            headers,
            "dead_letter_or_recorded",
            "unknown_status: status 299",
            execution_id=execution_id,
            request_id=request_id,
            outcomes=frozenset({"duplicate", "stale"}),
        )

    def copy(self, kind: str, topic: str, key: bytes | None, value: bytes, headers: Headers) -> Bad:
        """A copy of a real record (a redelivery, or out of order when re-keyed)."""
        fate: Fate = "answered" if topic == self.command_topic else "recorded"
        decoded = dict(headers)
        execution = decoded.get(H_EXECUTION_ID)
        request = decoded.get(H_REQUEST_ID)
        return Bad(
            kind,
            topic,
            key,
            value,
            list(headers),
            fate,
            execution_id=uuid.UUID(execution.decode()) if execution else None,
            request_id=uuid.UUID(request.decode()) if request else None,
            outcomes=frozenset({"duplicate", "stale"}),
        )

    # -- command topic --------------------------------------------------------------------------------

    def command_malformed(self) -> Bad:
        valid = {
            "kind": "command",
            "execution": _uuid(),
            "request": _uuid(),
            "reply_topic": self.reply_topic,
            "key": _uuid(),
        }
        choice = self.rng.randrange(8)
        if choice == 0:
            return self._command(
                "random_bytes", self.junk(), [], "malformed message: saga-kind: header missing"
            )
        if choice == 1:
            return self._command(
                "bad_json", self.bad_json(), _h(**valid), "malformed message: value: invalid JSON"
            )
        if choice in (2, 3, 4):
            missing = ("reply_topic", "key", "execution")[choice - 2]
            header = {"reply_topic": H_REPLY_TOPIC, "key": H_IDEMPOTENCY_KEY, "execution": H_EXECUTION_ID}[
                missing
            ]
            headers = _h(**{k: v for k, v in valid.items() if k != missing})
            return self._command(
                f"missing_{missing}", b'{"order": 1}', headers, f"malformed message: {header}: header missing"
            )
        if choice == 5:
            headers = _h(**{**valid, "kind": "reply"})
            return self._command(
                "forged_kind", b'{"order": 1}', headers, "malformed message: saga-kind: expected 'command'"
            )
        if choice == 6:
            headers = _h(**{**valid, "execution": "../../etc/passwd"})
            return self._command(
                "forged_uuid", b'{"order": 1}', headers, "malformed message: saga-execution-id: not a UUID"
            )
        headers = _h(**{**valid, "key": b"\xc3\x28"})
        return self._command(
            "non_utf8_header",
            b'{"order": 1}',
            headers,
            "malformed message: saga-idempotency-key: header value is not valid UTF-8",
        )

    def _command(self, kind: str, value: bytes, headers: Headers, reason: str) -> Bad:
        key = self.rng.choice([None, self.junk(16), _uuid().encode()])
        return Bad(f"command_{kind}", self.command_topic, key, value, headers, "dead_letter", reason)

    def command_unknown_execution(self) -> Bad:
        """Well-formed, for an execution nobody runs; its content makes the handler fail before any effect."""
        execution = uuid.uuid4()
        headers = _h(
            kind="command",
            execution=str(execution),
            request=_uuid(),
            reply_topic=self.reply_topic,
            key=_uuid(),
        )
        return Bad(
            "command_unknown_execution",
            self.command_topic,
            str(execution).encode(),
            orjson.dumps({"sku": "forged"}),
            headers,
            "reply_dead_lettered",
            f"unknown execution {execution}",
            execution_id=execution,
        )
