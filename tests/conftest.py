"""Shared fixtures: the real services for integration tests.

The addresses come from ``KAFKA_BOOTSTRAP_SERVERS`` / ``SAGA_DATABASE_URL`` when set, else from
testcontainers when a Docker engine answers, else from ``scripts/services.sh`` (see ``tests/services.py``).
With ``CI=true`` a service that cannot be had fails the test instead of skipping it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of the real Kafka broker."""
    from tests import services

    return services.kafka_bootstrap()


@pytest.fixture(scope="session")
def database_url() -> str:
    """SQLAlchemy URL (``postgresql+asyncpg://...``) of the real PostgreSQL test database."""
    from tests import services

    return services.database_url()
