#!/usr/bin/env python3
"""Wait until a Kafka broker really serves clients: produce, consume and commit one message.

Used by ``scripts/services.sh`` after it starts the development broker. An open port is not
enough (the broker binds its socket before it serves requests) and neither is the "Kafka Server
started" log line on its own (the group coordinator may still be loading), so this check does what
the saga orchestrator does: an idempotent producer with ``acks=all`` sends one message, and a
consumer in a consumer group reads it back and commits its offset.

Usage::

    python3 scripts/kafka_ready.py 127.0.0.1:19092 [--timeout 90] [--quick] [--replicas 3]

``--quick`` only fetches cluster metadata (used to tell whether something already answers on a
port). Exit status 0 when ready; 1 with a message on stderr when the deadline passes; 2 when
aiokafka is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid

TOPIC = "kafka-saga-ready"
GROUP = "kafka-saga-ready"


def _log(message: str) -> None:
    print(f"kafka_ready: {message}", file=sys.stderr, flush=True)


async def _metadata(bootstrap: str, request_timeout_s: float) -> int:
    """Returns the number of brokers in the cluster metadata."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(request_timeout_s * 1000))
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        return len(cluster.get("brokers", []))
    finally:
        await admin.close()


async def _ensure_topic(bootstrap: str, replicas: int) -> str:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    topic = TOPIC if replicas == 1 else f"{TOPIC}-rf{replicas}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        if replicas > 1:
            brokers = len((await admin.describe_cluster()).get("brokers", []))
            if brokers < replicas:
                raise RuntimeError(f"{brokers} of {replicas} brokers in the cluster metadata")
        if topic in await admin.list_topics():
            return topic
        try:
            response = await admin.create_topics(
                [NewTopic(topic, num_partitions=1, replication_factor=replicas)]
            )
        except TopicAlreadyExistsError:
            return topic
        for _topic, code, *_rest in getattr(response, "topic_errors", []):
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS
                raise RuntimeError(f"CreateTopics for {topic!r} failed with error code {code}")
        return topic
    finally:
        await admin.close()


async def _round_trip(bootstrap: str, replicas: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = await _ensure_topic(bootstrap, replicas)
    payload = uuid.uuid4().hex.encode()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", request_timeout_ms=10_000
    )
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, payload, key=b"ready")
    finally:
        await producer.stop()

    tp = TopicPartition(topic, metadata.partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        enable_auto_commit=False,
        request_timeout_ms=10_000,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, metadata.offset)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=1_000)
            for record in batches.get(tp, []):
                if record.value == payload:
                    await consumer.commit({tp: record.offset + 1})
                    return
        raise TimeoutError(f"produced offset {metadata.offset} on {tp} but could not consume it back")
    finally:
        await consumer.stop()


async def _wait(bootstrap: str, limit_s: float, quick: bool, replicas: int = 1) -> None:
    deadline = time.monotonic() + limit_s
    attempt = 0
    last_error: BaseException | None = None
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            if quick:
                await asyncio.wait_for(_metadata(bootstrap, max(remaining, 1.0)), max(remaining, 1.0))
            else:
                await asyncio.wait_for(_round_trip(bootstrap, replicas), max(remaining, 1.0))
            return
        except Exception as exc:  # any failure means "not ready yet": retry until the deadline
            last_error = exc
        if time.monotonic() + 1 >= deadline:
            what = "answer a metadata request" if quick else "produce, consume and commit a message"
            raise TimeoutError(
                f"Kafka at {bootstrap} did not {what} within {limit_s:.0f} s "
                f"({attempt} attempts); last error: {type(last_error).__name__}: {last_error}"
            ) from last_error
        if attempt == 1 or attempt % 10 == 0:
            _log(f"not ready yet ({type(last_error).__name__}: {last_error}); retrying")
        await asyncio.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="host:port of the broker, e.g. 127.0.0.1:19092")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds before giving up (90)")
    parser.add_argument("--quick", action="store_true", help="only check that metadata is served")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="cluster check: this many brokers in the metadata and a topic replicated on all of them (1)",
    )
    args = parser.parse_args(argv)
    try:
        import aiokafka  # noqa: F401
    except ImportError:
        _log("aiokafka is not installed for this Python; run: pip install 'aiokafka>=0.14'")
        return 2
    # aiokafka logs every refused connection at ERROR while the broker is still starting.
    logging.basicConfig(level=logging.CRITICAL)
    try:
        asyncio.run(_wait(args.bootstrap, args.timeout, args.quick, args.replicas))
    except TimeoutError as exc:
        _log(f"ERROR: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
