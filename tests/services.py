"""Where the integration tests find a real Kafka broker and a real PostgreSQL server.

Plain helpers, no fixtures: ``tests/conftest.py`` wraps them in session fixtures named
``kafka_bootstrap`` and ``database_url``. Each returns an address, found in this order:

1. the environment: ``KAFKA_BOOTSTRAP_SERVERS`` (``host:port[,host:port]``) and ``SAGA_DATABASE_URL``
   (an SQLAlchemy async URL such as ``postgresql+asyncpg://saga:saga@127.0.0.1:15432/saga_test``);
2. a Docker engine, when one answers ``docker info``: testcontainers starts ``apache/kafka`` and
   ``postgres:15`` for this test process (set ``KAFKA_SAGA_USE_DOCKER=0`` to skip this step);
3. ``scripts/services.sh``, which starts (or finds already running) a broker from Maven Central's
   Kafka jars and a private PostgreSQL cluster from Debian's packages, on 127.0.0.1:19092 and
   127.0.0.1:15432 by default. They keep running after the tests, so the next run starts warm;
   ``scripts/services.sh stop`` ends them.

When none of these gives the service, the test is skipped with the reason, except under ``CI=true``,
where it fails: CI must not pass by skipping its integration tests.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICES_SH = REPO_ROOT / "scripts" / "services.sh"
KAFKA_READY_PY = REPO_ROOT / "scripts" / "kafka_ready.py"

KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"
DATABASE_ENV = "SAGA_DATABASE_URL"
USE_DOCKER_ENV = "KAFKA_SAGA_USE_DOCKER"

# Keep in sync with scripts/services.sh (DEFAULT_KAFKA_VERSION) and docker-compose.yml.
KAFKA_IMAGE = "apache/kafka:4.3.1"
POSTGRES_IMAGE = "postgres:15"
PG_USER = PG_PASSWORD = "saga"
PG_DATABASE = "saga_test"

# Cold local start resolves ~45 jars with Maven and may apt-get install PostgreSQL.
SERVICES_SH_TIMEOUT = 900

_lock = threading.Lock()
# service name -> address, or the reason it could not be had (an Exception instance)
_resolved: dict[str, str | Exception] = {}
_docker_ok: bool | None = None
_containers: list[Any] = []


class ServiceUnavailable(RuntimeError):
    """A service could not be found or started; the message says why."""


def kafka_bootstrap() -> str:
    """Bootstrap servers of a Kafka broker that serves produce, consume and group commits."""
    return _get("kafka", KAFKA_ENV)


def database_url() -> str:
    """SQLAlchemy async URL (``postgresql+asyncpg://...``) of a PostgreSQL database for tests."""
    return _get("postgres", DATABASE_ENV)


# ---------------------------------------------------------------------------------------------


def _get(service: str, env_var: str) -> str:
    value = os.environ.get(env_var, "").strip()
    if value:
        return value
    with _lock:
        if service not in _resolved:
            try:
                _resolved[service] = _provide(service)
            except Exception as exc:  # remembered: one failed start per process, not one per test
                _resolved[service] = exc
        result = _resolved[service]
    if isinstance(result, Exception):
        _unavailable(f"{service}: {result}")
    return result


def _provide(service: str) -> str:
    if _docker_available():
        return _start_container(service)
    return _start_local(service)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"integration service unavailable (CI=true, so this fails): {reason}", pytrace=False)
    pytest.skip(f"integration service unavailable: {reason}")


def _docker_available() -> bool:
    global _docker_ok
    if _docker_ok is None:
        opted_out = os.environ.get(USE_DOCKER_ENV, "").lower() in {"0", "false", "no"}
        if opted_out or shutil.which("docker") is None:
            _docker_ok = False
        else:
            try:
                result = subprocess.run(
                    ["docker", "info"], capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL
                )
                _docker_ok = result.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _docker_ok = False
    return _docker_ok


# --- local services: scripts/services.sh --------------------------------------------------------


def _start_local(service: str) -> str:
    command = {"kafka": "start-kafka", "postgres": "start-postgres"}[service]
    if not SERVICES_SH.exists():
        raise ServiceUnavailable(f"{SERVICES_SH} is missing")
    try:
        result = subprocess.run(
            ["bash", str(SERVICES_SH), command],
            capture_output=True,
            text=True,
            timeout=SERVICES_SH_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "KAFKA_SAGA_PYTHON": os.environ.get("KAFKA_SAGA_PYTHON", sys.executable)},
        )
    except subprocess.TimeoutExpired as exc:
        raise ServiceUnavailable(
            f"scripts/services.sh {command} did not finish in {SERVICES_SH_TIMEOUT} s"
        ) from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ServiceUnavailable(f"scripts/services.sh {command} exited {result.returncode}:\n{tail}")
    env = _services_env()
    return env[KAFKA_ENV if service == "kafka" else DATABASE_ENV]


def _services_env() -> dict[str, str]:
    """Parses ``scripts/services.sh env`` (lines ``export NAME=value``)."""
    out = subprocess.run(
        ["bash", str(SERVICES_SH), "env"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    env = {}
    for line in out.splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            env[name.strip()] = value.strip().strip("'\"")
    return env


# --- Docker: testcontainers ---------------------------------------------------------------------


def _start_container(service: str) -> str:
    try:
        if service == "kafka":
            container = _apache_kafka_container(KAFKA_IMAGE)
            container.start()
            _containers.append(container)
            bootstrap = str(container.get_bootstrap_server())
            _check_kafka(bootstrap)
            return bootstrap
        postgres = _postgres_container()
        postgres.start()
        _containers.append(postgres)
        return str(postgres.get_connection_url())
    except ImportError as exc:
        raise ServiceUnavailable(
            f"a Docker engine answers but testcontainers is not installed ({exc}); "
            f"pip install 'testcontainers>=4' or set {USE_DOCKER_ENV}=0"
        ) from exc
    except ServiceUnavailable:
        raise
    except Exception as exc:
        raise ServiceUnavailable(
            f"testcontainers could not start {service}: {type(exc).__name__}: {exc}"
        ) from exc


def _postgres_container() -> Any:
    try:
        from testcontainers.community.postgres import PostgresContainer  # testcontainers >= 4.14
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        POSTGRES_IMAGE, username=PG_USER, password=PG_PASSWORD, dbname=PG_DATABASE, driver="asyncpg"
    )
    # Same settings as the local cluster: pg_stat_statements for the benchmarks, fsync stays on.
    container.with_command("postgres -c shared_preload_libraries=pg_stat_statements -c max_connections=200")
    return container


def _check_kafka(bootstrap: str) -> None:
    """Runs the same produce/consume/commit check as scripts/services.sh."""
    result = subprocess.run(
        [sys.executable, str(KAFKA_READY_PY), bootstrap, "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceUnavailable(
            f"Kafka container at {bootstrap} does not serve clients: {result.stderr.strip()}"
        )


def _stop_containers() -> None:
    while _containers:
        container = _containers.pop()
        try:
            container.stop()
        except Exception as exc:  # best effort at interpreter exit; Ryuk reaps leftovers
            print(f"tests/services.py: could not stop {container!r}: {exc}", file=sys.stderr)


atexit.register(_stop_containers)


def _apache_kafka_container(image: str) -> Any:
    """A single-node KRaft broker from the official ``apache/kafka`` image (imports lazily).

    testcontainers' own KafkaContainer drives the Confluent image's scripts, so this follows the
    pattern Testcontainers for Java uses for ``apache/kafka``: the container waits for a start
    script, which is copied in once the mapped port is known, because the advertised listener
    must name the address clients on the host use.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    class ApacheKafkaContainer(DockerContainer):
        CLIENT_PORT = 19092
        START_SCRIPT = "/tmp/testcontainers_start.sh"

        def __init__(self, image: str) -> None:
            super().__init__(image)
            self.with_exposed_ports(self.CLIENT_PORT)
            for key, value in {
                "CLUSTER_ID": "a2Fma2Etc2FnYS10ZXN0cw",
                "KAFKA_NODE_ID": "1",
                "KAFKA_PROCESS_ROLES": "broker,controller",
                "KAFKA_LISTENERS": f"PLAINTEXT://0.0.0.0:{self.CLIENT_PORT},BROKER://0.0.0.0:9092,"
                "CONTROLLER://0.0.0.0:9093",
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
                    "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT"
                ),
                "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
                "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
                "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
                "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
                "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "1",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "1",
                "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
                "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
                "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
                "KAFKA_NUM_PARTITIONS": "4",
                "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
                "KAFKA_LOG_CLEANER_DEDUPE_BUFFER_SIZE": "16777216",
                "KAFKA_HEAP_OPTS": "-Xms128m -Xmx384m",
            }.items():
                self.with_env(key, value)
            self.with_command(
                f'sh -c "while [ ! -f {self.START_SCRIPT} ]; do sleep 0.1; done; . {self.START_SCRIPT}"'
            )

        def get_bootstrap_server(self) -> str:
            return f"{self.get_container_host_ip()}:{self.get_exposed_port(self.CLIENT_PORT)}"

        def start(self) -> ApacheKafkaContainer:
            super().start()
            advertised = f"PLAINTEXT://{self.get_bootstrap_server()},BROKER://localhost:9092"
            script = (
                f"#!/bin/sh\nexport KAFKA_ADVERTISED_LISTENERS='{advertised}'\nexec /etc/kafka/docker/run\n"
            ).encode()
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w") as tar:
                info = tarfile.TarInfo(self.START_SCRIPT.lstrip("/"))
                info.size = len(script)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(script))
            self.get_wrapped_container().put_archive("/", archive.getvalue())
            wait_for_logs(self, "Kafka Server started", timeout=120)
            return self

    return ApacheKafkaContainer(image)
