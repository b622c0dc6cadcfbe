"""Message transport: `BrokerMessage`, the pool protocols, and the Kafka and in-memory adapters."""

from broker.errors import BrokerClosedError, BrokerConfigError, BrokerConnectionError, BrokerError
from broker.kafka import KafkaBrokerPool
from broker.memory import InMemoryBrokerPool
from broker.message import BrokerMessage
from broker.pool import BrokerClientPool, BrokerPublisher, BrokerSubscriber
from broker.settings import KafkaSettings

__all__ = [
    "BrokerClientPool",
    "BrokerClosedError",
    "BrokerConfigError",
    "BrokerConnectionError",
    "BrokerError",
    "BrokerMessage",
    "BrokerPublisher",
    "BrokerSubscriber",
    "InMemoryBrokerPool",
    "KafkaBrokerPool",
    "KafkaSettings",
]
