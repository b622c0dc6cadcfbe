"""The ``participant`` section of the configuration and `build_participant`."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from broker import InMemoryBrokerPool
from saga import CommandContext, SagaConfigError, SagaParticipant, load_config
from saga.config.participant import ParticipantConfig, build_participant, build_participant_store
from storage.participant import SqlParticipantStore

MODULE = "participant_config_fixture_app"


@pytest.fixture
def app_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType(MODULE)

    def factory(*, broker_pool: Any, store: Any, concurrency: int, lease_seconds: float) -> SagaParticipant:
        participant = SagaParticipant(
            "inventory", broker_pool, store=store, concurrency=concurrency, lease_seconds=lease_seconds
        )
        participant.command("Reserve")(lambda request: {"ok": True})
        return participant

    def broken(**kwargs: Any) -> SagaParticipant:
        raise RuntimeError("no database")

    def handlerless(*, broker_pool: Any, store: Any) -> SagaParticipant:
        return SagaParticipant("inventory", broker_pool)

    module.factory = factory  # type: ignore[attr-defined]
    module.broken = broken  # type: ignore[attr-defined]
    module.handlerless = handlerless  # type: ignore[attr-defined]
    module.number = 3  # type: ignore[attr-defined]
    module.wrong_service = lambda *, broker_pool, store: factory(  # type: ignore[attr-defined]
        broker_pool=broker_pool, store=store, concurrency=1, lease_seconds=1
    )
    sys.modules[MODULE] = module
    try:
        yield module
    finally:
        del sys.modules[MODULE]


def config(**participant: Any) -> Any:
    return load_config({"participant": {"service": "inventory", "app": f"{MODULE}:factory", **participant}})


def test_the_section_is_absent_by_default() -> None:
    assert load_config({}).participant is None


def test_the_section_reads_every_key() -> None:
    section = config(
        store_url="sqlite+aiosqlite:///x.db",
        concurrency=7,
        group="g",
        lease_seconds=3,
        grace_seconds=0,
        max_reply_bytes=2048,
        store_pool_size=3,
    ).participant
    assert section == ParticipantConfig(
        service="inventory",
        app=f"{MODULE}:factory",
        store_url="sqlite+aiosqlite:///x.db",
        concurrency=7,
        group="g",
        lease_seconds=3.0,
        grace_seconds=0.0,
        max_reply_bytes=2048,
        store_pool_size=3,
    )


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ({"app": "m:a"}, "participant.service", "missing value"),
        ({"service": "in ventory", "app": "m:a"}, "participant.service", "topic name"),
        ({"service": "inventory"}, "participant.app", "missing value"),
        ({"service": "inventory", "app": "nocolon"}, "participant.app", "module:attribute"),
        ({"service": "s", "app": "m:a", "store_url": "mysql://x/y"}, "participant.store_url", "unsupported"),
        ({"service": "s", "app": "m:a", "store_url": "postgresql://x/y"}, "participant.store_url", "asyncpg"),
        ({"service": "s", "app": "m:a", "store_url": "::"}, "participant.store_url", "not a database URL"),
        ({"service": "s", "app": "m:a", "concurrency": 0}, "participant.concurrency", "at least 1"),
        ({"service": "s", "app": "m:a", "lease_seconds": 0}, "participant.lease_seconds", "greater than 0"),
        (
            {"service": "s", "app": "m:a", "lease_seconds": float("inf")},
            "participant.lease_seconds",
            "finite",
        ),
        (
            {"service": "s", "app": "m:a", "grace_seconds": float("nan")},
            "participant.grace_seconds",
            "finite",
        ),
        (
            {"service": "s", "app": "m:a", "max_reply_bytes": 10},
            "participant.max_reply_bytes",
            "at least 1024",
        ),
        ({"service": "s", "app": "m:a", "concurrency": "many"}, "participant.concurrency", "integer"),
        ({"service": "s", "app": "m:a", "colour": 1}, "participant.colour", "unknown key"),
    ],
)
def test_bad_values_name_the_key(section: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(SagaConfigError) as info:
        load_config({"participant": section})
    assert key in str(info.value)
    assert problem in str(info.value)


def test_the_repr_hides_the_store_password() -> None:
    section = config(store_url="postgresql+asyncpg://u:secret@h/db").participant
    assert "secret" not in repr(section)


def test_a_factory_gets_the_pool_the_store_and_the_options_it_takes(app_module: types.ModuleType) -> None:
    cfg = config(store_url="sqlite+aiosqlite:///x.db", concurrency=7, lease_seconds=3)
    store = build_participant_store(cfg)
    assert isinstance(store, SqlParticipantStore)
    pool = InMemoryBrokerPool()
    participant = build_participant(cfg, pool, store)
    assert participant.broker_pool is pool and participant.store is store
    assert participant.command_topics == ("Reserve",)
    assert participant._concurrency == 7 and participant._lease == 3.0


def test_no_store_url_means_no_store() -> None:
    assert build_participant_store(config()) is None


@pytest.mark.parametrize(
    ("app", "problem"),
    [
        ("no_such_module_here:factory", "cannot import module"),
        (f"{MODULE}:missing", "has no attribute"),
        (f"{MODULE}:number", "not a SagaParticipant or a factory"),
        (f"{MODULE}:broken", "failed (RuntimeError: no database)"),
        (f"{MODULE}:handlerless", "no command handlers"),
    ],
)
def test_an_app_that_cannot_serve_is_a_config_error(
    app_module: types.ModuleType, app: str, problem: str
) -> None:
    with pytest.raises(SagaConfigError, match=r"participant\.app") as info:
        build_participant(config(app=app), InMemoryBrokerPool(), None)
    assert problem in str(info.value)


def test_the_app_must_serve_the_configured_service(app_module: types.ModuleType) -> None:
    cfg = load_config({"participant": {"service": "payments", "app": f"{MODULE}:wrong_service"}})
    with pytest.raises(SagaConfigError, match=r"participant\.service"):
        build_participant(cfg, InMemoryBrokerPool(), None)


def test_a_participant_object_is_used_as_it_is(app_module: types.ModuleType) -> None:
    pool = InMemoryBrokerPool()
    ready = SagaParticipant("inventory", pool)

    @ready.command("Reserve")
    def reserve(request: CommandContext) -> None:
        return None

    app_module.ready = ready  # type: ignore[attr-defined]
    assert build_participant(config(app=f"{MODULE}:ready"), InMemoryBrokerPool(), None) is ready


def test_the_cli_exits_2_naming_the_key(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from saga.cli import main

    path = tmp_path / "p.yml"
    path.write_text("participant:\n  service: inventory\n  app: nope\n")
    assert main(["participant", "--config", str(path)]) == 2
    assert "participant.app" in capsys.readouterr().err
    path.write_text("service:\n  name: x\n")
    assert main(["participant", "--config", str(path)]) == 2
    assert "participant: missing section" in capsys.readouterr().err
