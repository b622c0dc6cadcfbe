"""`KafkaBrokerPool.start()` against an address where no broker answers fails fast and says where."""

from __future__ import annotations

import asyncio

import pytest

from broker import BrokerConnectionError, KafkaBrokerPool

CONNECT_TIMEOUT = 2.0


@pytest.mark.parametrize(
    "bootstrap",
    [
        "127.0.0.1:1",  # closed port: connection refused at once, retried until the deadline
        "10.255.255.1:9092",  # unroutable: the SYN is never answered (or the network is unreachable)
    ],
)
async def test_start_fails_within_connect_timeout_naming_the_address(bootstrap: str) -> None:
    pool = KafkaBrokerPool(bootstrap_servers=bootstrap, connect_timeout=CONNECT_TIMEOUT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BrokerConnectionError) as caught:
        await pool.start()
    elapsed = loop.time() - started
    assert bootstrap in str(caught.value)
    assert caught.value.retriable
    assert caught.value.__cause__ is not None
    assert elapsed < CONNECT_TIMEOUT + 1.5
    await pool.stop()


async def test_start_can_be_cancelled_while_waiting_for_the_broker() -> None:
    pool = KafkaBrokerPool(bootstrap_servers="127.0.0.1:1", connect_timeout=30)
    task = asyncio.create_task(pool.start())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await pool.stop()
