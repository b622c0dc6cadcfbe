"""Security: nothing read from a message or a row is ever unpickled, evaluated or imported; SQL is bound
parameters only; credentials are never shown in logs, error messages or reprs.

Three kinds of evidence:

* the source itself (an AST scan of ``saga/``, ``broker/`` and ``storage/``): no pickle/marshal/shelve, no
  ``eval``/``exec``/``compile``/``__import__``, ``importlib`` only where ``module:attribute`` names come from
  the configuration file, YAML through ``safe_load`` only, and no SQL text built from values;
* behaviour with planted input: a module that *could* be imported sits on ``sys.path``, and its name is
  planted in a stored execution, in message headers and in payloads; every path refuses it (unknown
  definition, dead letter, plain data) and the module never appears in ``sys.modules``;
* credentials: a configuration carrying passwords, run at DEBUG level against services that do not
  answer; the passwords appear in no log record, no output and no error.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import logging
import pickle
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker import BrokerMessage, InMemoryBrokerPool
from saga import (
    CommandContext,
    Saga,
    SagaContext,
    SagaManager,
    SagaParticipant,
    SagaRecoveryWorker,
    SagaRequest,
    SagaResponse,
    SagaStatus,
    UnknownSagaDefinitionError,
)
from saga.cli import main
from saga.config import build_storage, load_config
from saga.consumer import H_DEAD_LETTER_REASON
from saga.context import decode_context
from saga.execution import SagaExecution
from saga.messages import (
    H_EXECUTION_ID,
    H_KIND,
    H_REQUEST_ID,
    H_SAGA,
    H_STATUS,
    H_STEP,
    SagaCommand,
)
from storage import ExecutionQuery, MemorySagaStorage, ReplyRecord, SqlAlchemySagaStorage, StorageError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("saga", "broker", "storage")


def package_files() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            yield relative, ast.parse(path.read_text(encoding="utf-8"), filename=relative)


def call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    """Every node -> the name of the function (or class) it sits in, for allow-lists."""
    owner: dict[ast.AST, str] = {}

    def walk(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = name
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = child.name
            owner[child] = inner
            walk(child, inner)

    walk(tree, "<module>")
    return owner


# -- the source ----------------------------------------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
#: Where dynamic import is allowed, and why: ``sagas: [module:attribute]`` entries of the configuration
#: file (trusted, written by the operator) are imported there, and nowhere else.
IMPORTLIB_ALLOWED = {"saga/config/build.py"}
#: ``importlib.metadata`` reads the installed distribution's version; it imports nothing.
IMPORTLIB_METADATA_ONLY = {"saga/cli/app.py"}


def test_no_pickle_eval_exec_or_dynamic_import_outside_the_config_package() -> None:
    problems: list[str] = []
    scanned = 0
    for relative, tree in package_files():
        scanned += 1
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    root = name.split(".")[0]
                    if root in FORBIDDEN_MODULES:
                        problems.append(f"{relative}:{node.lineno} imports {name}")
                    if root == "importlib" and relative not in IMPORTLIB_ALLOWED:
                        metadata = name == "importlib.metadata" or (
                            isinstance(node, ast.ImportFrom)
                            and node.module == "importlib"
                            and all(a.name == "metadata" for a in node.names)
                        )
                        if not (metadata and relative in IMPORTLIB_METADATA_ONLY):
                            problems.append(f"{relative}:{node.lineno} imports {name}")
            elif isinstance(node, ast.Call):
                name = call_name(node)
                if isinstance(node.func, ast.Name) and name in FORBIDDEN_CALLS:
                    problems.append(f"{relative}:{node.lineno} calls {name}()")
                if name == "import_module" and relative not in IMPORTLIB_ALLOWED:
                    problems.append(f"{relative}:{node.lineno} calls import_module()")
                if (
                    isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "yaml"
                    and name not in ("safe_load", "safe_dump", "YAMLError")
                ):
                    problems.append(f"{relative}:{node.lineno} calls yaml.{name}() (only safe_load)")
    assert scanned > 40, "the scan found too few files: is the repository layout unchanged?"
    assert not problems, "\n".join(problems)


#: Calls whose first argument is SQL text.
SQL_TEXT_CALLS = {"text", "literal_column", "exec_driver_sql", "execute", "executemany", "fetch", "fetchrow"}
#: (file, enclosing function): SQL built with an f-string whose parts are constants, each one justified.
SQL_FORMAT_ALLOWED = {
    # The recoverable status values are inlined as literals so PostgreSQL can match its partial index;
    # they come from the SagaStatus enum (checked below to be plain identifiers), never from input.
    ("storage/sql/statements.py", "_recoverable"),
}


def _builds_text(arg: ast.expr) -> bool:
    if isinstance(arg, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in arg.values)
    if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod | ast.Add):
        return True
    return isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "format"


def test_sql_text_is_never_built_from_values() -> None:
    problems: list[str] = []
    allowed_seen: set[tuple[str, str]] = set()
    for relative, tree in package_files():
        owners = enclosing_functions(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or call_name(node) not in SQL_TEXT_CALLS or not node.args:
                continue
            if not _builds_text(node.args[0]):
                continue
            where = (relative, owners.get(node, "<module>"))
            if where in SQL_FORMAT_ALLOWED:
                allowed_seen.add(where)
                continue
            problems.append(f"{relative}:{node.lineno} ({where[1]}) builds SQL text for {call_name(node)}()")
    assert not problems, "\n".join(problems)
    assert allowed_seen == SQL_FORMAT_ALLOWED, "an allow-list entry is stale: remove it"
    statuses = [s.value for s in SagaStatus]
    assert all(v.isidentifier() and v.islower() for v in statuses), statuses


# -- planted names ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Planted:
    """A module that would leave a mark if anything imported it."""

    module: str
    marker: Path

    @property
    def names(self) -> list[str]:
        return [f"{self.module}:saga", f"{self.module}.system", self.module, "os:system"]

    def assert_untouched(self) -> None:
        assert self.module not in sys.modules, f"{self.module} was imported"
        assert not self.marker.exists(), "code of the planted module ran"


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Planted]:
    module = f"kafka_saga_planted_{uuid.uuid4().hex[:10]}"
    marker = tmp_path / f"{module}.ran"
    (tmp_path / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "saga = None\n\ndef system(*args):\n    raise SystemExit('planted code ran')\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.util

    assert importlib.util.find_spec(module) is not None  # importable: refusing it means something
    yield Planted(module, marker)
    sys.modules.pop(module, None)


class Evil:
    """Unpickling this would create a file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def planted_record(name: str, status: SagaStatus = SagaStatus.RUNNING, state: bytes | None = None) -> Any:
    """A stored execution naming ``name`` as its definition, as a tampered database would hold it."""
    saga = Saga("innocent").local_step(lambda ctx: None, name="noop").commit()
    execution = SagaExecution.start(saga, {"x": 1}, reply_topic="orchReply", now=_now())
    record = execution.to_record()
    return dataclasses.replace(record, name=name, status=status, state=state or record.state)


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
async def wired() -> AsyncIterator[tuple[SagaManager, MemorySagaStorage, InMemoryBrokerPool]]:
    storage = MemorySagaStorage()
    pool = InMemoryBrokerPool()
    manager = SagaManager(storage, pool, service_name="orch", owner="sec", relay_interval=0.02)
    await manager.setup()
    try:
        yield manager, storage, pool
    finally:
        await manager.destroy()


async def wait_for_messages(pool: InMemoryBrokerPool, topic: str, count: int) -> list[BrokerMessage]:
    for _ in range(500):
        messages = pool.topic_messages(topic)
        if len(messages) >= count:
            return messages
        await asyncio.sleep(0.01)
    raise AssertionError(f"{topic}: {len(pool.topic_messages(topic))} messages, expected {count}")


async def test_a_stored_row_naming_a_module_is_refused_everywhere(
    planted: Planted, wired: tuple[SagaManager, MemorySagaStorage, InMemoryBrokerPool]
) -> None:
    manager, storage, pool = wired
    ids = []
    for name in planted.names:
        record = await storage.create(planted_record(name))
        ids.append(record.id)
        with pytest.raises(UnknownSagaDefinitionError) as info:
            await manager.get(record.id)
        assert info.value.name == name
        with pytest.raises(UnknownSagaDefinitionError):
            await manager.recover(record.id)
        with pytest.raises(UnknownSagaDefinitionError):
            await manager.run(response=SagaResponse(None, 200, record.id, uuid.uuid4(), "svc"))
    # The recovery worker meets them too: each is skipped (not counted: no process registers such a
    # definition, so it waits for one), and nothing is imported.
    worker = SagaRecoveryWorker(manager, max_recovery_attempts=2)
    for _ in range(3):
        await worker.run_once()
    for saga_id in ids:
        stored = await storage.load(saga_id)
        assert stored.status is SagaStatus.RUNNING and stored.recovery_attempts == 0
    # A reply naming such an execution is kept with it, as data, for a process that registers the name.
    for saga_id in ids:
        reply = SagaResponse({"ok": True}, 200, saga_id, uuid.uuid4(), "svc").to_message(manager.reply_topic)
        await pool.publisher().send(reply)
    consumer = manager.consumer
    assert consumer is not None
    for _ in range(500):
        if consumer.stats["parked"] == len(ids):
            break
        await asyncio.sleep(0.01)
    assert consumer.stats["parked"] == len(ids)
    for saga_id in ids:
        assert b'"parked"' in (await storage.load(saga_id)).state
    assert pool.topic_messages(manager.dead_letter_topic) == []
    planted.assert_untouched()


async def test_module_names_and_pickles_in_messages_are_data_never_code(
    planted: Planted,
    tmp_path: Path,
    wired: tuple[SagaManager, MemorySagaStorage, InMemoryBrokerPool],
) -> None:
    manager, storage, pool = wired
    pickled_marker = tmp_path / "unpickled"
    payload = pickle.dumps(Evil(pickled_marker))
    saga = Saga("pay").remote_step(lambda ctx: SagaRequest("orders", {"n": 1}), name="order").commit()
    execution = await manager.run(saga, pause_on_disk=True)
    assert execution.awaiting is not None
    rid = str(execution.awaiting.request_id)

    # Replies: a pickle as payload, and module names in every header the consumer reads or ignores.
    base = {H_KIND: "reply", H_EXECUTION_ID: str(execution.id), H_REQUEST_ID: rid, H_STATUS: "200"}
    named = orjson.dumps({"class": planted.names[0]})
    bad = [
        ({**base}, payload, "malformed: value: invalid JSON"),
        ({**base, H_KIND: f"{planted.module}:saga"}, named, "malformed: saga-kind: expected 'reply'"),
        ({**base, H_STATUS: f"{planted.module}.system"}, named, "malformed: saga-status: not an integer"),
        ({**base, H_EXECUTION_ID: planted.names[0]}, named, "malformed: saga-execution-id: not a UUID"),
    ]
    for headers, value, _ in bad:
        await pool.publisher().send(BrokerMessage(manager.reply_topic, b"k", value, headers))
    letters = await wait_for_messages(pool, manager.dead_letter_topic, len(bad))
    reasons = [m.headers[H_DEAD_LETTER_REASON] for m in letters]
    assert all(got.startswith(want) for got, (_, _, want) in zip(reasons, bad, strict=True)), reasons
    assert (await storage.load(execution.id)).status is SagaStatus.PAUSED  # untouched

    # Commands to a participant: module names in the informational headers are carried, never resolved;
    # a pickled command is dead-lettered as invalid JSON.
    handled: list[CommandContext] = []
    participant = SagaParticipant("svc", pool)

    @participant.command("charge")
    def charge(request: CommandContext) -> dict[str, bool]:
        handled.append(request)
        return {"ok": True}

    command = SagaCommand(
        "charge",
        {"module": planted.names[0]},
        uuid.uuid4(),
        uuid.uuid4(),
        "elsewhereReply",
        "key-1",
        saga=planted.names[0],
        step=planted.names[1],
    ).to_message()
    async with participant:
        await pool.publisher().send(command)
        await pool.publisher().send(dataclasses.replace(command, value=payload))
        await wait_for_messages(pool, "svcDeadLetter", 1)
        await wait_for_messages(pool, "elsewhereReply", 1)
    assert [h.saga for h in handled] == [planted.names[0]] and handled[0].step == planted.names[1]
    (letter,) = pool.topic_messages("svcDeadLetter")
    assert "invalid JSON" in letter.headers[H_DEAD_LETTER_REASON]
    assert letter.headers[H_SAGA] == planted.names[0] and letter.headers[H_STEP] == planted.names[1]
    assert not pickled_marker.exists(), "a pickle was loaded"
    planted.assert_untouched()


async def test_tag_like_context_values_and_a_pickled_state_never_resolve_code(
    planted: Planted, tmp_path: Path, wired: tuple[SagaManager, MemorySagaStorage, InMemoryBrokerPool]
) -> None:
    manager, storage, _ = wired
    lookalikes = {
        "a": {"$obj": planted.names[0]},
        "b": {"py/object": planted.names[1]},
        "c": {"__class__": planted.names[3], "args": ["true"]},
        "d": {"$type": planted.module},
    }
    assert dict(decode_context(lookalikes)) == lookalikes
    saga = Saga("ctx").local_step(lambda ctx: ctx.update(lookalikes), name="fill").commit()
    done = await manager.run(saga)
    stored = await manager.get(done.id)
    assert {k: stored.context[k] for k in lookalikes} == lookalikes

    marker = tmp_path / "state-unpickled"
    manager.register(Saga("innocent").local_step(lambda ctx: None, name="noop").commit())
    record = await storage.create(
        planted_record("innocent", SagaStatus.RUNNING, state=pickle.dumps(Evil(marker)))
    )
    with pytest.raises(orjson.JSONDecodeError):
        await manager.get(record.id)
    assert not marker.exists()
    planted.assert_untouched()


async def test_cli_inspects_a_planted_row_without_importing_it(
    planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "planted.sqlite3"
    config = tmp_path / "planted.yml"
    config.write_text(f"storage:\n  url: sqlite+aiosqlite:///{database}\nlogging:\n  level: ERROR\n")
    storage = SqlAlchemySagaStorage(f"sqlite+aiosqlite:///{database}")
    async with storage:
        record = await storage.create(planted_record(planted.names[0], SagaStatus.DEAD_LETTER))
    for argv in (["show", str(record.id)], ["list"], ["dead-letter"], ["retry", str(record.id)]):
        code = await asyncio.to_thread(main, [*argv, "--config", str(config)])
        assert code == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert planted.names[0] in out
    planted.assert_untouched()


# -- bound parameters ---------------------------------------------------------------------------------

EVIL = "o'rder\"; DROP TABLE saga_executions; --"
EVIL_KEY = "k' OR '1'='1"
EVIL_USER = "robert'); DELETE FROM saga_outbox; --"


@pytest.fixture
async def sqlite_storage(tmp_path: Path) -> AsyncIterator[SqlAlchemySagaStorage]:
    storage = SqlAlchemySagaStorage(f"sqlite+aiosqlite:///{tmp_path / 'bound.sqlite3'}")
    async with storage:
        yield storage


async def test_hostile_strings_round_trip_intact_through_sql(sqlite_storage: SqlAlchemySagaStorage) -> None:
    storage = sqlite_storage
    pool = InMemoryBrokerPool()
    manager = SagaManager(storage, pool, service_name="orch", owner=EVIL, consume_replies=False)

    def fill(context: SagaContext) -> None:
        context[EVIL] = [EVIL, {EVIL_KEY: EVIL_USER}]

    saga = (
        Saga(EVIL)
        .local_step(fill, name=EVIL_KEY)
        .remote_step(lambda ctx: SagaRequest(f"topic-{uuid.uuid4().hex}", {EVIL: EVIL}), name=EVIL_USER)
        .commit()
    )
    await manager.setup()
    try:
        paused = await manager.run(saga, user=EVIL_USER, idempotency_key=EVIL_KEY, pause_on_disk=True)
        again = await manager.run(saga, idempotency_key=EVIL_KEY, pause_on_disk=True)
        assert again.id == paused.id
        assert paused.awaiting is not None
        await manager.handle_reply(SagaResponse({EVIL: 1}, 200, paused.id, paused.awaiting.request_id, EVIL))
        stale = SagaResponse(None, 299, paused.id, uuid.uuid4(), EVIL)
        await manager.handle_reply(stale)
    finally:
        await manager.destroy()
    async with SqlAlchemySagaStorage(storage.engine.url) as fresh:
        record = await fresh.load(paused.id)
        assert (record.name, record.user, record.idempotency_key) == (EVIL, EVIL_USER, EVIL_KEY)
        assert [s.name for s in record.steps] == [EVIL_KEY, EVIL_USER]
        assert record.status is SagaStatus.FINISHED
        found = await fresh.find_by_idempotency_key(EVIL_KEY)
        assert found is not None and found.id == paused.id
        assert await fresh.find_by_idempotency_key("' OR '1'='1") is None
        result = await fresh.query(ExecutionQuery(names=[EVIL]))
        assert [r.id for r in result.rows] == [paused.id]
        assert (await fresh.query(ExecutionQuery(names=["x' OR '1'='1"]))).total == 0
        assert await fresh.get_sagas_for_recovery(10, saga_name=EVIL) == []
        assert [r.outcome for r in await fresh.list_replies(paused.id)] == ["applied", "stale"]
        await fresh.record_reply(ReplyRecord(paused.id, uuid.uuid4(), 1, "stale", reason=EVIL))
        assert (await fresh.list_replies(paused.id))[-1].reason == EVIL
        await fresh.put_command_reply(EVIL_KEY, EVIL.encode())
        assert await fresh.get_command_reply(EVIL_KEY) == EVIL.encode()
        assert await fresh.get_command_reply("' OR ''='") is None
        assert sum((await fresh.count_by_status()).values()) == 1  # every table still there


# -- credentials ----------------------------------------------------------------------------------------

DB_SECRET = f"pg-S3cret-{uuid.uuid4().hex[:8]}"
KAFKA_SECRET = f"kafka-S3cret-{uuid.uuid4().hex[:8]}"


def secrets_config(tmp_path: Path, *, storage_url: str, broker: str) -> Path:
    path = tmp_path / "secrets.yml"
    path.write_text(
        f"""
service:
  name: secrets
broker:
  type: {broker}
  kafka:
    bootstrap_servers: 127.0.0.1:1
    security_protocol: SASL_PLAINTEXT
    sasl_mechanism: PLAIN
    sasl_plain_username: saga
    sasl_plain_password: ${{KS_TEST_KAFKA_PASSWORD}}
    connect_timeout: 1
storage:
  url: {storage_url}
logging:
  level: DEBUG
""",
        encoding="utf-8",
    )
    return path


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert DB_SECRET not in text and KAFKA_SECRET not in text, text[-2000:]


@pytest.mark.parametrize(
    ("argv", "broker", "storage_url", "expected"),
    [
        (["stats"], "memory", f"postgresql+asyncpg://saga:{DB_SECRET}@127.0.0.1:1/db", "127.0.0.1:1"),
        (["worker"], "memory", f"postgresql+asyncpg://saga:{DB_SECRET}@127.0.0.1:1/db", "127.0.0.1:1"),
        (["worker"], "kafka", "sqlite+aiosqlite:///{tmp}/w.sqlite3", "BrokerConnectionError"),
    ],
    ids=["stats-db-down", "worker-db-down", "worker-kafka-down"],
)
async def test_passwords_never_reach_logs_or_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    argv: list[str],
    broker: str,
    storage_url: str,
    expected: str,
) -> None:
    monkeypatch.setenv("KS_TEST_KAFKA_PASSWORD", KAFKA_SECRET)
    config = secrets_config(tmp_path, storage_url=storage_url.format(tmp=tmp_path), broker=broker)
    caplog.set_level(logging.DEBUG)
    code = await asyncio.to_thread(main, [*argv, "--config", str(config)])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert expected in err
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.exc_info[1] if r.exc_info else ''}" for r in caplog.records
    )
    assert caplog.records, "DEBUG logging captured nothing: the check would prove nothing"
    assert_no_secret(out, err, logged)


async def test_storage_and_broker_objects_hide_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_KAFKA_PASSWORD", KAFKA_SECRET)
    data = {
        "broker": {
            "type": "kafka",
            "kafka": {
                "bootstrap_servers": "127.0.0.1:1",
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_plain_username": "saga",
                "sasl_plain_password": "${KS_TEST_KAFKA_PASSWORD}",
            },
        },
        "storage": {"url": f"postgresql+asyncpg://saga:{DB_SECRET}@127.0.0.1:1/db"},
    }
    config = load_config(data)
    storage = build_storage(config)
    assert config.broker.kafka.sasl_plain_password == KAFKA_SECRET  # credentials come from the environment
    assert_no_secret(repr(storage), repr(config.broker), repr(config.broker.kafka))
    with pytest.raises(StorageError) as info:
        await storage.start()
    await storage.stop()
    assert "127.0.0.1:1" in str(info.value)
    assert_no_secret(str(info.value), repr(info.value))


def test_the_config_repr_hides_the_database_password() -> None:
    config = load_config({"storage": {"url": f"postgresql+asyncpg://saga:{DB_SECRET}@127.0.0.1:1/db"}})
    assert_no_secret(repr(config), repr(config.storage), str(config))
