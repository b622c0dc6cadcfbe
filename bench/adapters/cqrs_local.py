"""python-cqrs 5.x: the 'order' saga as a ``cqrs.Saga`` of three ``SagaStepHandler`` classes.

Run through ``Saga.transaction(context, container, storage)`` (the mediator adds a layer on top of the
same transaction). With ``SqlAlchemySagaStorage`` the transaction uses a storage run and commits a
checkpoint after every step, so each completed step is durable before the next one starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import typing

import cqrs
from cqrs.saga.models import SagaContext
from cqrs.saga.storage.memory import MemorySagaStorage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

FAIL = False


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: int
    data: dict[str, int] = dataclasses.field(default_factory=dict)


class Step1(cqrs.SagaStepHandler[OrderContext, None]):
    async def act(self, context: OrderContext) -> cqrs.SagaStepResult[OrderContext, None]:
        context.data["s1"] = context.order_id
        return self._generate_step_result(None)

    async def compensate(self, context: OrderContext) -> None:
        context.data.pop("s1", None)


class Step2(cqrs.SagaStepHandler[OrderContext, None]):
    async def act(self, context: OrderContext) -> cqrs.SagaStepResult[OrderContext, None]:
        context.data["s2"] = context.order_id
        return self._generate_step_result(None)

    async def compensate(self, context: OrderContext) -> None:
        context.data.pop("s2", None)


class Step3(cqrs.SagaStepHandler[OrderContext, None]):
    async def act(self, context: OrderContext) -> cqrs.SagaStepResult[OrderContext, None]:
        if FAIL:
            raise _proto.StepFailed("step 3")
        context.data["s3"] = context.order_id
        return self._generate_step_result(None)

    async def compensate(self, context: OrderContext) -> None:
        context.data.pop("s3", None)


class OrderSaga(cqrs.Saga[OrderContext]):
    steps = [Step1, Step2, Step3]


class Container:
    """The smallest container: steps have no dependencies."""

    @property
    def external_container(self) -> typing.Any:
        return None

    def attach_external_container(self, container: typing.Any) -> None:
        pass

    async def resolve(self, type_: type) -> typing.Any:
        return type_()


async def main() -> None:
    global FAIL
    cfg = _proto.config()
    FAIL = cfg["scenario"] == "fail"
    conc = int(cfg.get("concurrency", 1))
    engine = None
    if cfg["storage"] == "postgres":
        from cqrs.saga.storage.sqlalchemy import Base, SqlAlchemySagaStorage
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        url = cfg["dsn"].replace("postgresql://", "postgresql+asyncpg://")
        # As many pooled connections as sagas in flight (the same budget every library gets).
        engine = create_async_engine(url, pool_size=max(5, min(conc, 50)), max_overflow=0)
        async with engine.begin() as con:
            await con.run_sync(Base.metadata.create_all)
        storage: typing.Any = SqlAlchemySagaStorage(async_sessionmaker(engine, expire_on_commit=False))
    else:
        storage = MemorySagaStorage()
    saga = OrderSaga()
    container = Container()

    async def one(i: int) -> None:
        ctx = OrderContext(order_id=i)
        try:
            async with saga.transaction(context=ctx, container=container, storage=storage) as tx:
                async for _ in tx:
                    pass
        except _proto.StepFailed:
            if not FAIL:
                raise
            assert not ctx.data, ctx.data
        else:
            assert len(ctx.data) == 3

    await _proto.run_local_async(cfg, one)
    if engine is not None:
        await engine.dispose()


asyncio.run(main())
