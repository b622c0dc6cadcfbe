"""The embedded default configuration, used when no file is given and ``config/default.yml`` is absent.

It is the content of the repository's ``config/default.yml`` (a test keeps the two equal), kept in the
package so an installed ``kafka-saga`` works from any directory.
"""

from __future__ import annotations

import os

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG_PATH", "EMBEDDED_CONFIG", "default_config_path"]

#: Environment variable naming the configuration file when ``--config`` is not given.
CONFIG_ENV = "SAGA_CONFIG"
#: Configuration file used when neither ``--config`` nor ``SAGA_CONFIG`` is given.
DEFAULT_CONFIG_PATH = "config/default.yml"

EMBEDDED_CONFIG = """\
# kafka-saga — embedded default configuration.
#
# Everything runs in one process and nothing needs installing: the in-memory broker (so orchestrator
# and participants must share the process, as `kafka-saga demo` does), executions in a SQLite file, and
# the demo order saga registered. `kafka-saga --config config/kafka.yml ...` runs the same across real
# Kafka and PostgreSQL.
#
# String values may use ${VAR} (must be set) and ${VAR:default}. The reference of every key is in the
# README ("Configuration").

service:
  name: ${SAGA_SERVICE_NAME:orders}

broker:
  type: memory
  memory:
    partitions: 4

storage:
  url: sqlite+aiosqlite:///${SAGA_SQLITE_PATH:./kafka-saga.sqlite3}
  auto_migrate: true

sagas:
  - saga.demo:ORDER_SAGA

outbox:
  relay_interval: 0.2

recovery:
  enabled: true
  interval: 1.0
  batch_size: 50
  max_recovery_attempts: 5
  lease_seconds: 10.0

timeouts:
  default_reply_seconds: 30.0

logging:
  level: ${SAGA_LOG_LEVEL:WARNING}
  format: text
"""


def default_config_path() -> str:
    """``$SAGA_CONFIG`` when set, else ``config/default.yml``."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
